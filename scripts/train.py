"""Train one network: python scripts/train.py --config configs/adam_sam.py[:cpu|:smoke] [--workdir DIR] [--config.x.y=v].

Writes config.json, metrics.jsonl and checkpoints/ into the workdir (default
runs/<config name>[_<size>]); rerunning the same command resumes from the
latest checkpoint.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from jaxsam import validate

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file, e.g. configs/adam_sam.py:cpu")
_WORKDIR = flags.DEFINE_string("workdir", None, "run folder (default: runs/<config name>[_<size>])")
_CACHE = flags.DEFINE_string(
    "compilation_cache", "~/.cache/jaxsam/xla", "folder of JAX's persistent compilation cache ('' turns it off)"
)
_ALLOW_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "resume a workdir whose config.json differs (the old one is kept as config.<n>.json)"
)
# Several processes (one per host, or per GPU): jax.distributed, see README "Several GPUs and hosts".
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 of a multi-process run")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes of a multi-process run")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index (0 .. num_processes-1)")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "start a multi-process run from the cluster's environment (SLURM, Open MPI)"
)
flags.mark_flags_as_required(["config"])


def default_workdir(config_path: str, size: str) -> str:
    """runs/adam_sam for configs/adam_sam.py, runs/adam_sam_cpu for configs/adam_sam.py:cpu."""
    name = os.path.splitext(os.path.basename(config_path.partition(":")[0]))[0]
    return os.path.join("runs", name if size == "full" else f"{name}_{size}")


def main(argv):
    del argv  # validate.flags_parser refuses positional arguments
    # Orbax logs every checkpoint step at INFO; the progress bar and metrics.jsonl say what matters.
    logging.set_verbosity(logging.WARNING)
    from jaxsam import data, parallel
    from jaxsam.models.layers import conv_notice
    from jaxsam.train import train_and_evaluate

    try:
        validate.check_config(_CONFIG.value)  # before anything else
        parallel.start_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, auto=_DISTRIBUTED.value)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    parallel.use_compilation_cache(_CACHE.value)

    config = _CONFIG.value
    notice = conv_notice(config.model.conv)
    if notice and parallel.is_primary():
        print(f"notice: {notice}", file=sys.stderr)
    workdir = _WORKDIR.value or default_workdir(config_flags.get_config_filename(flags.FLAGS["config"]), config.size)
    start = time.time()
    try:
        record = train_and_evaluate(config, workdir, allow_config_change=_ALLOW_CHANGE.value, log=print)
    except (ValueError, data.DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not parallel.is_primary():
        return 0
    print(
        f"done: {workdir}: epoch {record['epoch']}/{config.train.num_epochs}, step {record['step']}, "
        f"test accuracy {record['test_accuracy']:.4f} (loss {record['test_loss']:.4f}), "
        f"train accuracy {record.get('train_accuracy', float('nan')):.4f}, {time.time() - start:.0f} s"
    )
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=validate.flags_parser("config"))
