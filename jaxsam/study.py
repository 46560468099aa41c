"""The study: a grid of training runs, each final minimum measured, turned into a report.

`run_study(study, study_dir)` trains every (model, arm, seed) of the grid
(`jaxsam.grid`: the arms, `plan`, `run_config`) in
its own run folder through `train_and_evaluate` (as submitit jobs, see
`jaxsam.jobs`: in this process, as local processes or on SLURM), measures each final
checkpoint with `measure_run` (sharpness, λmax, trace, preconditioned λmax
for Adam, the interpolation from each base minimum to its SAM minimum, and
for the first seed(s) the spectral density and a 2-D surface), then writes

    <study_dir>/study.json           the study config, the command that made it, each run's code version
    <study_dir>/runs/<model>/<arm>/seed<k>/   each run (config.json, metrics.jsonl, checkpoints/, geometry/,
                                              provenance.json: commit, host, devices, seconds)
    <study_dir>/report.md            tables (mean ± std over seeds; paired SAM − base differences with 95% CIs), figures, findings
    <study_dir>/summary.json         every run's numbers, the aggregates, the timings
    <study_dir>/figures/*.png

Rerunning resumes: finished runs are not trained again, measured ones not
measured again, an interrupted run continues from its last checkpoint, and
a run killed while measuring is measured again (geometry.json is written
only when all its measures are done). `write_report(study_dir)` remakes the
report from the saved files alone; it holds no timings and no dates, so the
same files give the same report.md byte for byte.

The question (the original PyTorch study, 2022): does SAM (Foret et al.
2021) find flatter minima that generalize better for Adam as well as SGD?
Measures: Foret et al. 2021, Andriushchenko et al. 2023 (worst-case,
adaptive and average-case sharpness), Keskar et al. 2017, Ghorbani et al.
2019 (Hessian spectrum), Cohen et al. 2022 (preconditioned sharpness of Adam).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import ml_collections
import numpy as np

from jaxsam import files
from jaxsam.config import base_config, changed_fields, flatten
# The grid (arms, runs, their configs) lives in jaxsam.grid; these names are part of this module's interface too.
from jaxsam.grid import (  # noqa: F401
    ARMS,
    MODEL_LABELS,
    MODELS,
    Arm,
    RunSpec,
    check_study,
    extra_runs,
    interpolation_partner,
    measure_options,
    pair_epochs,
    plan,
    run_config,
    run_overrides,
)


# ---------------------------------------------------------------------------
# State of a run folder.


def _epoch_records(workdir: str) -> list[dict[str, Any]]:
    return [r for r in files.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "test_accuracy" in r]


def training_finished(workdir: str, config: ml_collections.ConfigDict) -> bool:
    """True when the run's last epoch is logged (its checkpoints may be elsewhere: a run copied from another machine)."""
    records = _epoch_records(workdir)
    return bool(records) and records[-1]["epoch"] == config.train.num_epochs and bool(records[-1].get("epoch_done"))


def is_trained(workdir: str, config: ml_collections.ConfigDict) -> bool:
    """True when training is finished and its final checkpoint is on disk (so the run can be measured)."""
    if not training_finished(workdir, config):
        return False
    step_dir = os.path.join(workdir, "checkpoints", str(_epoch_records(workdir)[-1]["step"]))
    return os.path.isdir(step_dir)


def _geometry(workdir: str) -> dict[str, Any] | None:
    path = os.path.join(workdir, "geometry", "geometry.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def measured_differently(workdir: str, options: ml_collections.ConfigDict) -> str:
    """How the run's saved geometry.json differs from `options` ("eigen_method: 'lanczos' -> 'restarted', ..."),
    "" when it does not (or there is none): for error messages."""
    from jaxsam.measure import same_options

    saved = (_geometry(workdir) or {}).get("options")
    current = options.to_dict()
    if saved is None or same_options(saved, current):
        return ""
    def without(k):  # saved with one option as `options` has it
        return {**saved, k: current[k]} if k in current else {key: v for key, v in saved.items() if key != k}

    keys = [k for k in sorted(set(saved) | set(current))
            if saved.get(k) != current.get(k) and not same_options(without(k), saved)]  # fmt: skip
    return ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys[:4]) or "options differ"


def is_measured(workdir: str, options: ml_collections.ConfigDict, compare_to: str | None) -> bool:
    """True when geometry.json was made with these options (and interpolation partner)."""
    from jaxsam.measure import same_options

    saved = _geometry(workdir)
    if saved is None or not same_options(saved.get("options", {}), options.to_dict()):
        return False
    # The partner is the same run of the study wherever the folder now is (runs copied between machines):
    # compare its runs/<model>/<arm>/seed<k> tail, not the absolute path the measurement was made at.
    theirs, ours = saved.get("compare_to"), compare_to
    tail = lambda path: os.path.normpath(path).split(os.sep)[-4:]  # noqa: E731
    return theirs == ours or (theirs is not None and ours is not None and tail(theirs) == tail(ours))


# ---------------------------------------------------------------------------
# Running the study.


def _check_or_write_study(study: ml_collections.ConfigDict, study_dir: str, command: str) -> None:
    """study.json: written on the first start; a later start may change the grid, not the settings."""
    path = os.path.join(study_dir, "study.json")
    current = json.loads(study.to_json_best_effort())
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved["study"] == current:
            return
        changed = changed_settings(saved["study"], study)
        if changed:
            raise ValueError(
                f"{study_dir} holds a study with other {', '.join(changed)} settings: use a new --workdir "
                f"(only the grid, models/arms/extra_arms/pair_epochs/seeds/figure_*, may change between starts)"
            )
    files.write_json(path, {"study": current, "command": command})


def changed_settings(saved: dict[str, Any], study: ml_collections.ConfigDict) -> list[str]:
    """The top-level groups ("run", "measure", ...) whose settings differ between a saved study.json's "study"
    and `study`, the grid (models, arms, seeds, ...) aside: [] when `study` may continue the saved one."""
    from jaxsam.measure import measure_options as measure_defaults

    if saved == json.loads(study.to_json_best_effort()):
        return []
    # pair_epochs is grid-like: a run trained with other epochs is refused by its own settings check.
    grid = ("models", "arms", "extra_arms", "pair_epochs", "seeds", "figure_seeds", "figure_measures")
    old, new = flatten(saved), flatten(study)
    # A run or measure field the saved study predates counts as its default (older study folders resume).
    size = old.get("run.size", "full")
    defaults = {f"run.{k}": v for k, v in flatten(base_config(size)).items()}
    defaults.update({f"measure.{k}": v for k, v in flatten(measure_defaults(size)).items()})
    return sorted({k.split(".")[0] for k in changed_fields(old, new, defaults, grid)})


def read_study(study_dir: str) -> tuple[ml_collections.ConfigDict, str]:
    """The study config and command saved in <study_dir>/study.json."""
    path = os.path.join(study_dir, "study.json")
    if not os.path.exists(path):
        raise ValueError(f"{study_dir} has no study.json: pass the folder made by scripts/study.py")
    with open(path) as f:
        saved = json.load(f)
    return ml_collections.ConfigDict(saved["study"]), saved.get("command", "")


def _minutes(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"  # fmt: skip


def _timings(study_dir: str) -> dict[str, dict[str, float]]:
    """{run path: {"train_seconds", "measure_seconds"}}: each run's provenance.json (timings.json of older studies)."""
    out: dict[str, dict[str, float]] = {}
    path = os.path.join(study_dir, "timings.json")
    if os.path.exists(path):
        with open(path) as f:
            out = json.load(f)
    study, _ = read_study(study_dir)
    for spec in plan(study):
        provenance = os.path.join(study_dir, spec.path, "provenance.json")
        if os.path.exists(provenance):
            with open(provenance) as f:
                seconds = {k: v for k, v in json.load(f).items() if k.endswith("_seconds")}
            out.setdefault(spec.path, {}).update(seconds)
    return out


def run_study(study: ml_collections.ConfigDict, study_dir: str, **options: Any) -> dict[str, Any]:
    """Trains and measures every run of the study that is not done yet, then writes the report.

    See `jaxsam.jobs.run_study` for the options (executor "inline", "local"
    or "slurm", parallel jobs, SLURM resources).
    """
    from jaxsam import jobs

    return jobs.run_study(study, study_dir, **options)


def _measured(spec: RunSpec, specs: list[RunSpec], study, workdirs) -> bool:
    partner = interpolation_partner(specs, spec)
    compare = workdirs[partner] if partner else None
    return is_measured(workdirs[spec], measure_options(study, spec), compare)


def _measure_headline(results: dict[str, Any]) -> str:
    train = results["splits"].get("train", {})
    parts = []
    if "worst_case" in train:
        parts.append(f"worst-case {train['worst_case']['value']:.4g}")
    if "lambda_max" in train:
        parts.append(f"λmax {train['lambda_max']['eigenvalues'][0]:.4g}")
    return ", ".join(parts) or f"{len(train)} measures"


# ---------------------------------------------------------------------------
# Collecting the saved numbers.

# (key in a row, label in the report, how it is read from geometry.json's train split)
MEASURE_COLUMNS = (
    ("worst_case", "worst-case sharpness", lambda g: g["worst_case"]["value"]),
    ("worst_case_adaptive", "adaptive worst-case", lambda g: g["worst_case_adaptive"]["value"]),
    ("average_case", "average-case sharpness", lambda g: g["average_case"]["value"]),
    ("first_order", "ρ‖∇L‖ (original proxy)", lambda g: g["first_order"]["value"]),
    ("lambda_max", "λmax", lambda g: g["lambda_max"]["eigenvalues"][0]),
    ("trace", "Hessian trace", lambda g: g["trace"]["trace"]),
    ("preconditioned", "preconditioned λmax (Adam)", lambda g: g["preconditioned"]["eigenvalue"]),
)
TRACKED = (("track_worst_case", "tracked worst-case sharpness"), ("track_lambda_max", "tracked λmax"),
           ("track_first_order", "tracked ρ‖∇L‖"), ("track_average_case", "tracked average-case sharpness"),
           ("track_preconditioned", "tracked preconditioned λmax"))  # fmt: skip
THRESHOLD = "track_adam_threshold"  # Adam's (2 + 2β₁)/((1 − β₁)η_t), beside the tracked preconditioned λmax


FITS = 0.98  # train accuracy at which a run counts as fitting its training subset


def _number(value: Any) -> float:
    return float("nan") if value is None else float(value)


def collect(study_dir: str) -> list[dict[str, Any]]:
    """One row per run of the saved plan that has finished training: its numbers, from its files."""
    from jaxsam.train import read_config

    study, _ = read_study(study_dir)
    rows = []
    for spec in plan(study):
        workdir = os.path.join(study_dir, spec.path)
        if not os.path.exists(os.path.join(workdir, "config.json")):
            continue
        config = read_config(workdir)
        if not training_finished(workdir, config):
            continue
        epochs = _epoch_records(workdir)
        row: dict[str, Any] = {
            "model": spec.model, "arm": spec.arm, "seed": spec.seed, "seed_index": spec.seed_index, "path": spec.path,
            "test_accuracy": epochs[-1]["test_accuracy"], "test_loss": epochs[-1]["test_loss"],
            "epochs": {"epoch": [r["epoch"] for r in epochs],
                       "test_accuracy": [r["test_accuracy"] for r in epochs],
                       **{key: [r.get(key) for r in epochs] for key in [k for k, _ in TRACKED] + [THRESHOLD]
                          if any(key in r for r in epochs)}},
        }  # fmt: skip
        geometry = _geometry(workdir)
        if geometry is not None:
            train = geometry["splits"].get("train", {})
            if "accuracy" in train:
                row["train_accuracy"] = train["accuracy"]["accuracy"]
                row["train_loss"] = train["accuracy"]["loss"]
                row["train_subset"] = train["accuracy"]["info"]["subset"]
                row["gap"] = row["train_accuracy"] - row["test_accuracy"]
                row["fits"] = bool(row["train_accuracy"] >= FITS)
            if "lambda_max" in train:
                row["lambda_max_converged"] = bool(train["lambda_max"]["converged"])
            if "worst_case" in train and "converged" in train["worst_case"]:
                row["worst_case_converged"] = bool(train["worst_case"]["converged"])
            for key, _, read in MEASURE_COLUMNS:
                if key in train:
                    row[key] = _number(read(train))
            for key in ("interpolation", "density", "surface_2d"):
                if key in train:
                    row[key] = train[key]
            row["measure_subset"] = next((r["info"]["subset"] for k, r in train.items()
                                          if isinstance(r, dict) and k != "accuracy" and "info" in r), None)  # fmt: skip
        rows.append(row)
    return rows


def _mean_std(values: list[float]) -> tuple[float, float, int]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return float("nan"), float("nan"), 0
    std = float(np.std(finite, ddof=1)) if len(finite) > 1 else float("nan")
    return float(np.mean(finite)), std, len(finite)


def aggregate(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{model: {arm: {column: {"mean", "std", "n"}}}} over seeds."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    columns = ["test_accuracy", "train_accuracy", "gap"] + [key for key, _, _ in MEASURE_COLUMNS]
    for row in rows:
        out.setdefault(row["model"], {}).setdefault(row["arm"], {})
    for model, arms in out.items():
        for arm in arms:
            mine = [r for r in rows if (r["model"], r["arm"]) == (model, arm)]
            for column in columns:
                values = [r[column] for r in mine if column in r]
                if values:
                    mean, std, n = _mean_std(values)
                    arms[arm][column] = {"mean": mean, "std": std, "n": n}
    return out


def _one_line_summary(summary: dict[str, Any], seconds: float) -> str:
    parts = []
    for model, arms in summary["aggregate"].items():
        for arm, cols in arms.items():
            if "test_accuracy" in cols:
                parts.append(f"{model} {arm} {100 * cols['test_accuracy']['mean']:.1f}%")
    return (f"study done: {summary['runs_done']}/{summary['runs_planned']} runs in {_minutes(seconds)}; "
            f"test accuracy {', '.join(parts)}; report {summary['report']}")  # fmt: skip


# ---------------------------------------------------------------------------
# The report.


def write_report(study_dir: str) -> dict[str, Any]:
    """Writes report.md, summary.json and figures/ from the study's saved files; returns the summary.

    Args:
      study_dir: the study folder (with study.json and runs/).

    Returns:
      The summary written to summary.json: the runs, their aggregates over seeds, "kendall_tau" (each
      measure against the gap, with a bootstrap 95 % interval) and "paired": {model: {"<base>-><sam>":
      {column: {mean, ci_low, ci_high, n, positive, negative, verdict, level}}}}, SAM − base over the
      seeds both arms have, with the Student-t 95 % interval (`jaxsam.stats.paired_difference`);
      accuracy and gap columns there are in percentage points, the aggregates' in fractions.
    """
    from jaxsam import dose, report, report_figures

    study, command = read_study(study_dir)
    rows = collect(study_dir)
    planned = plan(study)
    summary = {
        "study": study.to_dict(),
        "command": command,
        "runs_planned": len(planned),
        "runs_done": len(rows),
        "runs": [{k: v for k, v in r.items() if k not in ("interpolation", "density", "surface_2d")} for r in rows],
        "aggregate": aggregate(rows),
        "timings": _timings(study_dir),
        "report": os.path.join(study_dir, "report.md"),
    }
    summary["kendall_tau"] = report.kendall_taus(rows)
    summary["paired"] = report.paired(study, rows)
    summary["dose"] = dose.dose_response(study, rows)
    figures = report_figures.figures(study, rows, os.path.join(study_dir, "figures"))
    if dose.figure(summary["dose"], os.path.join(study_dir, "figures", "dose_response.png")):
        figures["dose_response"] = "figures/dose_response.png"
    text = report.markdown(study, command, rows, summary, figures, planned)
    section = dose.markdown(summary["dose"], figures.get("dose_response"))
    if section:
        text = text.rstrip("\n") + "\n\n" + "\n".join(section)
    files.write_atomic(os.path.join(study_dir, "report.md"), text)
    files.write_json(os.path.join(study_dir, "summary.json"), _json_safe(summary))
    return summary


def _json_safe(value: Any) -> Any:
    from jaxsam.geometry.records import to_json

    return to_json(value)
