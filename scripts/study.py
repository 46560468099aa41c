"""Run the study: python scripts/study.py --config configs/study.py[:fit|:cpu|:smoke] [--workdir DIR] [--report_only].

Trains every (model, arm, seed) of the grid in <workdir>/runs/..., measures
each final checkpoint, and writes <workdir>/report.md, summary.json and
figures/. Rerunning the same command skips what is done and resumes what was
interrupted; --report_only remakes the report from the saved files alone.
Default workdir: runs/study[_<size>].

Jobs (a base arm with its SAM arms, one seed) run through submitit:
    --executor=local [--parallel=2]      each job in its own process on this machine (default)
    --executor=slurm --slurm_partition=gpu --slurm_time=240 --slurm_gpus=1 [--slurm_cpus=8 --slurm_mem_gb=64]
    --executor=inline                    in this process, one job after the other
    --split_pairs                        one job per run instead (a base and its SAM arm train at once)
    --longest_first                      the longest jobs first (shortest grid when jobs run side by side)
"""

from __future__ import annotations

import os
import shlex
import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jaxsam import validate

_CONFIG = config_flags.DEFINE_config_file("config", None, "study config file, e.g. configs/study.py:cpu")
_WORKDIR = flags.DEFINE_string("workdir", None, "study folder (default: runs/study[_<size>])")
_CACHE = flags.DEFINE_string(
    "compilation_cache", "~/.cache/jaxsam/xla", "folder of JAX's persistent compilation cache ('' turns it off)"
)
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "remake report.md, summary.json and figures from saved files")
_EXPORT = flags.DEFINE_string("export", None, "copy the report and every finished run's small files (no checkpoints) "
                              "here, after each job and at the end")
_EXECUTOR = flags.DEFINE_enum("executor", "local", ["local", "slurm", "inline"], "where the jobs run (submitit)")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "local executor: jobs running at once")
_SPLIT_PAIRS = flags.DEFINE_bool("split_pairs", False, "one job per run: a base and its SAM arms train at once "
                                  "(the base is measured by the last of them to finish)")
_LONGEST_FIRST = flags.DEFINE_bool("longest_first", False, "start the longest jobs first (epochs, a SAM run counting "
                                   "twice) instead of seed by seed")
_SLURM_PARTITION = flags.DEFINE_string("slurm_partition", "", "SLURM partition ('' for the default)")
_SLURM_TIME = flags.DEFINE_integer("slurm_time", 240, "SLURM time limit of one job, minutes")
_SLURM_GPUS = flags.DEFINE_integer("slurm_gpus", 1, "GPUs per SLURM job")
_SLURM_CPUS = flags.DEFINE_integer("slurm_cpus", 8, "CPU cores per SLURM job")
_SLURM_MEM = flags.DEFINE_integer("slurm_mem_gb", 0, "memory per SLURM job in GB (0: the partition's default)")
_SLURM_ACCOUNT = flags.DEFINE_string("slurm_account", "", "SLURM account ('' for none)")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}: use --config=... --workdir=...")
    logging.set_verbosity(logging.WARNING)
    from jaxsam import data, jobs, parallel, study

    cache = parallel.use_compilation_cache(_CACHE.value)
    if cache:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = cache  # the jobs' processes use it too
    if _CONFIG.value is None and not (_REPORT_ONLY.value and _WORKDIR.value):
        print("error: --config is required (e.g. --config configs/study.py:cpu), "
              "or --report_only with --workdir", file=sys.stderr)  # fmt: skip
        return 2
    size = _CONFIG.value.size if _CONFIG.value is not None else ""
    workdir = _WORKDIR.value or os.path.join("runs", "study" if size == "full" else f"study_{size}")
    try:
        if _REPORT_ONLY.value:
            # The runs' provenance (code, host, seconds) into study.json, as a finished run_study leaves it.
            saved = study.read_study(workdir)[0]
            specs = study.plan(saved)
            if _EXPORT.value:
                jobs.check_export(saved, workdir, _EXPORT.value, specs)
            jobs.gather_provenance(workdir, specs)
            summary = study.write_report(workdir)
            print(f"report: {summary['report']} ({summary['runs_done']}/{summary['runs_planned']} runs)")
            _export(jobs, workdir)
            return 0
        slurm = jobs.SlurmOptions(partition=_SLURM_PARTITION.value, time_min=_SLURM_TIME.value,
                                  gpus_per_node=_SLURM_GPUS.value, cpus_per_task=_SLURM_CPUS.value,
                                  mem_gb=_SLURM_MEM.value, account=_SLURM_ACCOUNT.value)  # fmt: skip
        # SIGTERM (kill, a scheduler's stop) interrupts like Ctrl-C, so the local jobs are stopped with the command.
        signal.signal(signal.SIGTERM, _interrupt)
        study.run_study(_CONFIG.value, workdir, command=shlex.join(["python", "scripts/study.py", *sys.argv[1:]]),
                        executor=_EXECUTOR.value, parallel=_PARALLEL.value, slurm=slurm,
                        split_pairs=_SPLIT_PAIRS.value, longest_first_order=_LONGEST_FIRST.value,
                        export=_EXPORT.value)  # fmt: skip
    except (ValueError, FileNotFoundError, data.DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the same command resumes the study", file=sys.stderr)
        return 130
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _export(jobs, workdir: str) -> None:
    if _EXPORT.value:
        copied = jobs.export_small_files(workdir, _EXPORT.value)
        print(f"exported {len(copied)} files to {_EXPORT.value}")


if __name__ == "__main__":
    app.run(main, flags_parser=validate.flags_parser("config"))
