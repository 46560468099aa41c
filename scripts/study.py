"""Run the study: python scripts/study.py --config configs/study.py[:cpu|:smoke] [--workdir DIR] [--report_only].

Trains every (model, arm, seed) of the grid in <workdir>/runs/..., measures
each final checkpoint, and writes <workdir>/report.md, summary.json and
figures/. Rerunning the same command skips what is done and resumes what was
interrupted; --report_only remakes the report from the saved files alone.
Default workdir: runs/study[_<size>].
"""

from __future__ import annotations

import os
import shlex
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "study config file, e.g. configs/study.py:cpu")
_WORKDIR = flags.DEFINE_string("workdir", None, "study folder (default: runs/study[_<size>])")
_CACHE = flags.DEFINE_string(
    "compilation_cache", "~/.cache/jaxsam/xla", "folder of JAX's persistent compilation cache ('' turns it off)"
)
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "remake report.md, summary.json and figures from saved files")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}: use --config=... --workdir=...")
    logging.set_verbosity(logging.WARNING)
    from jaxsam import data, parallel, study

    parallel.use_compilation_cache(_CACHE.value)
    if _CONFIG.value is None and not (_REPORT_ONLY.value and _WORKDIR.value):
        print("error: --config is required (e.g. --config configs/study.py:cpu), "
              "or --report_only with --workdir", file=sys.stderr)  # fmt: skip
        return 2
    size = _CONFIG.value.size if _CONFIG.value is not None else ""
    workdir = _WORKDIR.value or os.path.join("runs", "study" if size == "full" else f"study_{size}")
    try:
        if _REPORT_ONLY.value:
            summary = study.write_report(workdir)
            print(f"report: {summary['report']} ({summary['runs_done']}/{summary['runs_planned']} runs)")
            return 0
        study.run_study(_CONFIG.value, workdir, command=shlex.join(["python", "scripts/study.py", *sys.argv[1:]]))
    except (ValueError, FileNotFoundError, data.DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    app.run(main)
