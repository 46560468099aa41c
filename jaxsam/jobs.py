"""The study's jobs, run through submitit: in this process, as local processes, or on SLURM.

A job is one (model, seed) of the grid: a base arm together with the SAM arms
paired with it (sgd with sgd_sam, adam with adam_sam, ...), so the job that
measures the base minimum has its SAM partner's checkpoint for the
base -> SAM interpolation; an arm without a partner is a job of its own.
With `split_pairs` every run is a job of its own, so a pair's trainings run
at once (on two cores, two GPUs or two SLURM jobs) and no job is longer than
its longest run; the base is then measured by whichever of its pair's jobs
finishes training last (if both reach it, the one holding its measurement's
lock; the other goes on without waiting for it). `longest_first` starts the
longest jobs first (by epochs, a SAM run counting twice), which shortens the
whole grid when jobs run side by side. `run_job` trains and measures what its job has not
finished; `run_study` hands the unfinished jobs to an executor, logs each
finished step, and writes the report.

    inline   every job in this process, one after the other (the tests, a debugger)
    local    submitit's LocalExecutor: each job in its own process, `parallel` at a time
    slurm    submitit's SlurmExecutor: one SLURM job per study job (`SlurmOptions`)

A run folder's small files (config.json, metrics.jsonl, geometry/geometry.json,
provenance.json) are all the report needs, so runs finished on other machines
can be copied into a study folder: a copied run whose config is the study's
and whose measures were made with the study's options counts as done
without its checkpoints. Each run's provenance.json (code version, host,
devices, seconds) is gathered into study.json under "runs".
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shlex
import sys
import time
from typing import Any, Callable, Iterator, Sequence

import ml_collections
import numpy as np

from jaxsam import files, provenance
from jaxsam import study as study_lib
from jaxsam.study import RunSpec

EXECUTORS = ("inline", "local", "slurm")


@dataclasses.dataclass(frozen=True)
class SlurmOptions:
    """Resources of each SLURM job (submitit's `slurm_*` parameters).

    Attributes:
      partition: the SLURM partition ("" for the cluster's default).
      time_min: wall-clock limit of one job in minutes (a job is one base arm and its SAM arms).
      gpus_per_node: GPUs of the job (jaxsam uses every device it sees).
      cpus_per_task: CPU cores of the job.
      mem_gb: memory in GB (0: the partition's default).
      account: the SLURM account ("" for none).
      array_parallelism: at most this many jobs of the study run at once.
    """

    partition: str = ""
    time_min: int = 240
    gpus_per_node: int = 1
    cpus_per_task: int = 8
    mem_gb: int = 0
    account: str = ""
    array_parallelism: int = 64


def group_jobs(specs: Sequence[RunSpec], *, split_pairs: bool = False) -> list[tuple[RunSpec, ...]]:
    """The plan's runs as jobs: each base arm with the SAM arms paired with it (same model and seed).

    With `split_pairs`, one job per run (in plan order).
    """
    if split_pairs:
        return [(spec,) for spec in specs]
    jobs, placed = [], set()
    for spec in specs:
        if spec in placed:
            continue
        partners = tuple(o for o in specs if o not in placed and (o.model, o.seed) == (spec.model, spec.seed)
                         and study_lib.ARMS[o.arm].base == spec.arm)  # fmt: skip
        job = (spec, *partners) if study_lib.ARMS[spec.arm].base is None else (spec,)
        placed.update(job)
        jobs.append(job)
    return jobs


def job_cost(study: ml_collections.ConfigDict, job: Sequence[RunSpec]) -> int:
    """A job's length in epoch-equivalents, for ordering: its runs' epochs, a SAM run's counting twice."""
    return sum(study_lib.run_config(study, s).train.num_epochs * (2 if study_lib.ARMS[s.arm].base else 1)
               for s in job)  # fmt: skip


def longest_first(study: ml_collections.ConfigDict, jobs: Sequence[tuple[RunSpec, ...]]) -> list:
    """`jobs` by `job_cost`, longest first; ties keep their order (the plan's: seed by seed)."""
    return sorted(jobs, key=lambda job: -job_cost(study, job))


@contextlib.contextmanager
def _lock(study_dir: str, name: str, *, wait: bool = True) -> Iterator[bool]:
    """Holds the lock `name` of the study, e.g. a run still training from an earlier start.

    Waits for it, or with `wait=False` yields False at once where another process holds it.
    """
    with open(os.path.join(study_dir, "jobs", name.replace(os.sep, "_") + ".lock"), "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_job(study_dir: str, paths: Sequence[str], on_step: Callable[[str, float], None] | None = None) -> list:
    """Trains and measures the runs `paths` (one job of the study in `study_dir`) that are not done.

    Args:
      study_dir: a study folder with its study.json.
      paths: the runs' folders relative to it (`RunSpec.path`), a job of `group_jobs`.
      on_step: called with (what, seconds) after each training or measurement.

    Returns:
      [(what, seconds), ...] for each step done, in order.
    """
    from jaxsam.measure import measure_run
    from jaxsam.train import train_and_evaluate

    study, _ = study_lib.read_study(study_dir)
    specs = study_lib.plan(study)
    job = [s for s in specs if s.path in paths]
    steps: list[tuple[str, float]] = []

    def step(what: str, seconds: float) -> None:
        steps.append((what, seconds))
        if on_step is not None:
            on_step(what, seconds)

    workdir = {s: os.path.join(study_dir, s.path) for s in specs}
    config = {s: study_lib.run_config(study, s) for s in specs}
    # The job's runs, then the bases it completes: a base whose SAM partner trains in this job (split pairs).
    to_measure = job + [b for b in specs if b not in job and study_lib.interpolation_partner(specs, b) in job]
    os.makedirs(os.path.join(study_dir, "jobs"), exist_ok=True)
    for spec in job:
        # The run's lock (the file an older pair job held for its base): an earlier start still training it is
        # waited for.
        with _lock(study_dir, spec.path):
            provenance.count_interrupted_attempt(study_dir, spec.path)
            if not study_lib.training_finished(workdir[spec], config[spec]):
                start = time.time()
                provenance.begin_attempt(study_dir, spec.path, start)
                record = train_and_evaluate(config[spec], workdir[spec])
                seconds = time.time() - start
                provenance.record(workdir[spec], "train_seconds", seconds)
                provenance.end_attempt(study_dir, spec.path)
                step(f"trained {spec.name}: test accuracy {100 * record['test_accuracy']:.2f}%", seconds)
        for ready in to_measure:
            partner = study_lib.interpolation_partner(specs, ready)
            if (study_lib._measured(ready, specs, study, workdir)
                    or not study_lib.is_trained(workdir[ready], config[ready])
                    or (partner is not None and not study_lib.is_trained(workdir[partner], config[partner]))):
                continue  # done (perhaps by another job), or its (partner's) training is still to come
            # Its runs are trained, so whoever holds its measurement's lock measures it: a job that finds the
            # lock held (the base's job and its SAM partner's both reach the base) leaves it and goes on.
            with _lock(study_dir, ready.path + ".measure", wait=False) as held:
                if not held or study_lib._measured(ready, specs, study, workdir):
                    continue
                start = time.time()
                results = measure_run(
                    workdir[ready], study_lib.measure_options(study, ready), progress=False, log=lambda line: None,
                    compare_to=workdir[partner] if partner else None,
                )  # fmt: skip
                seconds = time.time() - start
                provenance.record(workdir[ready], "measure_seconds", seconds)
                step(f"measured {ready.name}: {study_lib._measure_headline(results)}", seconds)
    return steps


def is_done(study: ml_collections.ConfigDict, specs: Sequence[RunSpec], workdirs: dict, spec: RunSpec) -> bool:
    """The run finished training and is measured with the study's options (its checkpoints no longer needed)."""
    return study_lib.training_finished(workdirs[spec], study_lib.run_config(study, spec)) and study_lib._measured(
        spec, list(specs), study, workdirs)


def check_copied_runs(study: ml_collections.ConfigDict, study_dir: str, specs: Sequence[RunSpec]) -> None:
    """Raises a one-line ValueError for a run folder the study cannot use or finish as it is.

    A run folder of another config, or one whose training is finished but
    whose checkpoint is missing (copied from another machine) and whose
    measures are not those of the study, could only be redone by retraining
    on top of its records.
    """
    from jaxsam.workdir import write_or_check_config

    specs = list(specs)
    for spec in specs:
        workdir = os.path.join(study_dir, spec.path)
        if not os.path.exists(os.path.join(workdir, "config.json")):
            continue
        config = study_lib.run_config(study, spec)
        try:
            write_or_check_config(config, workdir, write=False)
        except ValueError as err:
            raise ValueError(f"{spec.name} in {study_dir} was made with other settings: {err}") from None
        finished = study_lib.training_finished(workdir, config)
        if finished and not study_lib.is_trained(workdir, config) and not study_lib._measured(
            spec, specs, study, {s: os.path.join(study_dir, s.path) for s in specs}
        ):
            differs = study_lib.measured_differently(workdir, study_lib.measure_options(study, spec))
            raise ValueError(
                f"{workdir} has finished training but no final checkpoint, and its geometry is not measured with "
                f"this study's options{f' ({differs})' if differs else ''}: copy its checkpoints/ too, measure "
                f"with the options it was made with, or remove the folder to train it again"
            )


def check_export(study: ml_collections.ConfigDict, study_dir: str, dest: str, specs: Sequence[RunSpec]) -> None:
    """Raises a one-line ValueError when exporting `study_dir` to `dest` would lose what `dest` holds.

    `dest` may be new, or a folder of the same study (its grid aside) whose
    finished runs `study_dir` has too: its report is replaced by the study's.
    """
    if not os.path.exists(os.path.join(dest, "study.json")):
        return
    saved, _ = study_lib.read_study(dest)
    changed = study_lib.changed_settings(saved.to_dict(), study)
    if changed:
        raise ValueError(f"--export folder {dest} holds a study with other {', '.join(changed)} settings: "
                         f"export to a new folder")  # fmt: skip
    ours = {s: os.path.join(study_dir, s.path) for s in specs}
    theirs = {s: os.path.join(dest, s.path) for s in specs}
    missing = [s.name for s in specs if is_done(study, specs, theirs, s) and not is_done(study, specs, ours, s)]
    if missing:
        raise ValueError(f"--export folder {dest} holds {len(missing)} finished run(s) that {study_dir} lacks "
                         f"({missing[0]}{', ...' if len(missing) > 1 else ''}): copy them in first "
                         f"(cp -r {os.path.join(dest, 'runs')} {study_dir}/), or export to a new folder")  # fmt: skip


def gather_provenance(study_dir: str, specs: Sequence[RunSpec]) -> None:
    """Copies each run's provenance.json into study.json under "runs" (the code version of every run)."""
    path = os.path.join(study_dir, "study.json")
    with open(path) as f:
        saved = json.load(f)
    runs = {s.path: provenance.read_provenance(os.path.join(study_dir, s.path)) for s in specs}
    saved["runs"] = {k: v for k, v in runs.items() if v}
    files.write_json(path, saved)


def make_executor(name: str, study_dir: str, *, parallel: int = 1, slurm: SlurmOptions | None = None):
    """A submitit executor for "local" or "slurm", its job logs under <study_dir>/jobs/."""
    import submitit

    folder = os.path.join(study_dir, "jobs", "%j")
    if name == "local":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=7 * 24 * 60)
        return executor
    slurm = slurm or SlurmOptions()
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    extra = {"slurm_partition": slurm.partition} if slurm.partition else {}
    if slurm.account:
        extra["slurm_account"] = slurm.account
    if slurm.mem_gb:
        extra["mem_gb"] = slurm.mem_gb
    executor.update_parameters(
        timeout_min=slurm.time_min, gpus_per_node=slurm.gpus_per_node, cpus_per_task=slurm.cpus_per_task,
        tasks_per_node=1, nodes=1, slurm_array_parallelism=slurm.array_parallelism, name="jaxsam-study", **extra,
    )  # fmt: skip
    return executor


def run_study(
    study: ml_collections.ConfigDict,
    study_dir: str,
    *,
    command: str | None = None,
    log: Callable[[str], None] = print,
    executor: str = "inline",
    parallel: int = 1,
    slurm: SlurmOptions | None = None,
    split_pairs: bool = False,
    longest_first_order: bool = False,
    export: str | None = None,
) -> dict[str, Any]:
    """Trains and measures every run of the study that is not done yet, then writes the report.

    Args:
      study: a configs/study.py config.
      study_dir: the study folder (created).
      command: the command line recorded in study.json and the report (default: sys.argv).
      log: where progress lines go (one per finished training or measurement).
      executor: "inline", "local" or "slurm" (see the module docstring).
      parallel: "local": jobs running at once.
      slurm: "slurm": the resources of each job.
      split_pairs: one job per run instead of one per base arm and its SAM arms.
      longest_first_order: start the longest jobs first (`job_cost`) instead of the plan's order.
      export: a folder that, after each job and at the end, gets the report and every finished run's small
        files (`export_small_files`), so a study stopped midway has its finished runs there.

    Returns:
      The summary written to summary.json.
    """
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}: use one of {', '.join(EXECUTORS)}")
    if int(parallel) < 1:
        raise ValueError(f"parallel must be >= 1 (got {parallel})")
    specs = study_lib.plan(study)
    check_copied_runs(study, study_dir, specs)
    if export:
        check_export(study, study_dir, export, specs)
    os.makedirs(study_dir, exist_ok=True)
    study_lib._check_or_write_study(study, study_dir, command or shlex.join(["python", *sys.argv]))
    workdirs = {s: os.path.join(study_dir, s.path) for s in specs}
    configs = {s: study_lib.run_config(study, s) for s in specs}
    steps = len(specs) * 2
    done = sum(study_lib.training_finished(workdirs[s], configs[s]) for s in specs)
    done += sum(study_lib._measured(s, specs, study, workdirs) for s in specs)
    spent: list[float] = []  # seconds of the steps done by this call, for the estimate
    study_start = time.time()
    extra = f" + {study.extra_arms}" if study.get("extra_arms") else ""
    log(f"study {study_dir}: {len(specs)} runs ({study.models} x {study.arms} x {study.seeds} seeds{extra}), "
        f"{done}/{steps} steps (trainings + measurements) already done")  # fmt: skip

    def report_progress(what: str, seconds: float) -> None:
        nonlocal done
        done += 1
        spent.append(seconds)
        left = steps - done
        eta = f", about {study_lib._minutes(left * np.mean(spent) / max(1, int(parallel)))} to go" if left else ""
        log(f"[{done}/{steps}] {what} ({study_lib._minutes(seconds)}){eta}")

    def report() -> dict[str, Any]:  # study.json's provenance, the report, and the export
        gather_provenance(study_dir, specs)
        summary = study_lib.write_report(study_dir)
        if export:
            copied = export_small_files(study_dir, export)
            log(f"exported {len(copied)} files to {export}")
        return summary

    on_job_done = report if export else None
    unfinished = [job for job in group_jobs(specs, split_pairs=split_pairs)
                  if not all(is_done(study, specs, workdirs, s) for s in job)]  # fmt: skip
    if longest_first_order:
        unfinished = longest_first(study, unfinished)
    if executor == "inline":
        for i, job in enumerate(unfinished):
            run_job(study_dir, [s.path for s in job], on_step=report_progress)
            if on_job_done is not None and i < len(unfinished) - 1:
                on_job_done()  # the last job's is the report below
    elif unfinished:
        _run_submitted(make_executor(executor, study_dir, parallel=parallel, slurm=slurm), unfinished, study_dir,
                       parallel=int(parallel) if executor == "local" else len(unfinished), log=log,
                       on_step=report_progress, stop_on_exit=executor == "local", on_job_done=on_job_done)  # fmt: skip
    summary = report()
    log(study_lib._one_line_summary(summary, time.time() - study_start))
    return summary


def _run_submitted(executor, jobs, study_dir: str, *, parallel: int, log, on_step, stop_on_exit: bool,
                   on_job_done: Callable[[], Any] | None = None) -> None:  # fmt: skip
    """Submits `jobs`, at most `parallel` running at once; logs their steps as each finishes.

    With `stop_on_exit` (local jobs), an interrupted wait (Ctrl-C, or SIGTERM
    through scripts/study.py) stops the running jobs before it propagates: a
    local job would otherwise go on training after the command is gone (submitit's
    jobs ignore SIGTERM), and the next start would wait for it.
    """
    waiting, running, failed = list(jobs), [], []
    try:
        _wait_for_jobs(executor, waiting, running, failed, study_dir, parallel=parallel, log=log, on_step=on_step,
                       on_job_done=on_job_done)  # fmt: skip
    except BaseException:
        if stop_on_exit and running:
            for _, handle in running:
                handle.cancel(check=False)
            log(f"interrupted: stopped {len(running)} running job(s); the same command resumes them")
        raise
    if failed:
        raise ValueError(f"{len(failed)} job(s) failed: " + "; ".join(failed))


def _wait_for_jobs(executor, waiting: list, running: list, failed: list, study_dir: str, *, parallel: int, log,
                   on_step, on_job_done=None) -> None:  # fmt: skip
    while waiting or running:
        while waiting and len(running) < parallel:
            job = waiting.pop(0)
            running.append((job, executor.submit(run_job, study_dir, [s.path for s in job])))
        time.sleep(1.0)
        for entry in [r for r in running if r[1].done()]:
            running.remove(entry)
            job, handle = entry
            try:
                for what, seconds in handle.result():
                    on_step(what, seconds)
            except Exception as err:  # a failed job: the others go on; all failures are reported at the end
                lines = [line for line in str(err).strip().splitlines() if line.strip()]
                failed.append(f"{job[0].name} (job {handle.job_id}: {lines[-1] if lines else err}; "
                              f"log {handle.paths.stderr})")  # fmt: skip
                log(f"failed: {failed[-1]}")
            if on_job_done is not None and (waiting or running):
                on_job_done()  # the last job's is run_study's own report and export


SMALL_FILES = ("config.json", "metrics.jsonl", provenance.PROVENANCE, os.path.join("geometry", "geometry.json"))


def export_small_files(study_dir: str, dest: str) -> list[str]:
    """Copies what the report needs (no checkpoints) to `dest`: a study folder another machine can continue.

    study.json, report.md, summary.json, figures/ and the SMALL_FILES of each
    run that is done (trained and measured with the study's options): a run
    still training or not yet measured would need its checkpoints to go on.
    Returns the copied paths, relative to `dest`.
    """
    import shutil

    copied = []

    def copy(relative: str) -> None:
        source, target = os.path.join(study_dir, relative), os.path.join(dest, relative)
        if os.path.isfile(source):
            os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
            shutil.copyfile(source, target)
            copied.append(relative)

    study, _ = study_lib.read_study(study_dir)
    for name in ("study.json", "report.md", "summary.json"):
        copy(name)
    figures = os.path.join(study_dir, "figures")
    for name in sorted(os.listdir(figures)) if os.path.isdir(figures) else []:
        copy(os.path.join("figures", name))
    specs = study_lib.plan(study)
    workdirs = {s: os.path.join(study_dir, s.path) for s in specs}
    for spec in specs:
        for name in SMALL_FILES if is_done(study, specs, workdirs, spec) else ():
            copy(os.path.join(spec.path, name))
    return copied
