"""Measure the geometry of a trained run: python scripts/measure.py --workdir runs/adam_sam_cpu [--options.measures=...].

Writes <workdir>/geometry/geometry.json (every measure, its settings, its
seconds) and PNG figures beside it. Defaults are sized by the run's config
(full | cpu | smoke); any option can be set, e.g. --options.n_examples=2048
--options.rho=0.1 --options.measures=worst_case,lambda_max.
"""

from __future__ import annotations

import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from jaxsam import validate

_WORKDIR = flags.DEFINE_string("workdir", None, "run folder made by scripts/train.py")
_COMPARE = flags.DEFINE_string(
    "compare_to", None, "another run of the same network: adds the interpolation between the two minima"
)
_SIZE = flags.DEFINE_enum("size", None, ["full", "fit", "cpu", "smoke"], "option defaults (default: the run's config size)")

def _all_options():
    from jaxsam.measure import measure_options

    return measure_options()


# ml_collections applies --options.x=v as the flag is defined: a misspelled field is one line here.
validate.check_overrides("options", _all_options())
_OPTIONS = config_flags.DEFINE_config_dict("options", _all_options(), "measure options (see measure_options)")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv  # validate.flags_parser refuses positional arguments
    logging.set_verbosity(logging.WARNING)
    from jaxsam import data
    from jaxsam.measure import measure_options, measure_run
    from jaxsam.train import read_config

    start = time.time()
    try:
        size = _SIZE.value or read_config(_WORKDIR.value).size
        # Options given on the command line override the size's defaults.
        options = measure_options(size)
        options.update_from_flattened_dict(config_flags.get_override_values(flags.FLAGS["options"]))
        validate.check_measure_options(options)  # before the run is loaded
        results = measure_run(_WORKDIR.value, options, compare_to=_COMPARE.value)
    except (ValueError, FileNotFoundError, data.DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"done: {_WORKDIR.value}/geometry/geometry.json, {len(results['figures'])} figures, {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=validate.flags_parser("options"))
