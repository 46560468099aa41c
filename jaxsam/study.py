"""The study: a grid of training runs, each final minimum measured, turned into a report.

`run_study(study, study_dir)` trains every (model, arm, seed) of the grid in
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

import dataclasses
import json
import math
import os
from typing import Any, Callable, Iterable

import ml_collections
import numpy as np

from jaxsam import files
from jaxsam.config import base_config, changed_fields, flatten, use_adam, use_sam

# ---------------------------------------------------------------------------
# Arms: what each one changes in the run's config.


def _sgd(c):
    return c


def _original(c, optimizer: str):
    # The original study: lr 1e-3 for SGD and Adam alike, label smoothing 0.1.
    c.optimizer.name = optimizer
    c.optimizer.learning_rate = 1e-3
    c.train.label_smoothing = 0.1
    return c


def _asam(c, rho: float):
    c.sam.name = "asam"
    c.sam.rho = rho
    return c


def _variant(c, name: str, rho: float | None = None):
    c.sam.name = name
    if rho is not None:
        c.sam.rho = rho
    return c


@dataclasses.dataclass(frozen=True)
class Arm:
    """One optimizer setting of the grid."""

    label: str  # as the report prints it
    apply: Callable[[ml_collections.ConfigDict], ml_collections.ConfigDict]
    base: str | None = None  # the arm without SAM it is compared with (None: it is a base)


ARMS: dict[str, Arm] = {
    "sgd": Arm("SGD", _sgd),
    "sgd_sam": Arm("SGD + SAM", use_sam, base="sgd"),
    "sgd_asam": Arm("SGD + ASAM", lambda c: _asam(c, 0.5), base="sgd"),
    "sgd_gsam": Arm("SGD + GSAM", lambda c: _variant(c, "gsam"), base="sgd"),
    "sgd_looksam": Arm("SGD + LookSAM", lambda c: _variant(c, "looksam"), base="sgd"),
    "adam": Arm("Adam", use_adam),
    "adam_sam": Arm("Adam + SAM", lambda c: use_sam(use_adam(c)), base="adam"),
    "adam_asam": Arm("Adam + ASAM", lambda c: _asam(use_adam(c), 0.5), base="adam"),
    "adam_gsam": Arm("Adam + GSAM", lambda c: _variant(use_adam(c), "gsam"), base="adam"),
    "adam_looksam": Arm("Adam + LookSAM", lambda c: _variant(use_adam(c), "looksam"), base="adam"),
    # Li et al. 2024, Li & Giannakis 2023 (SAM's ρ); Becker et al. 2024 (ρ = 3, their setting).
    "sgd_fsam": Arm("SGD + F-SAM", lambda c: _variant(c, "fsam"), base="sgd"),
    "sgd_vasso": Arm("SGD + VaSSO", lambda c: _variant(c, "vasso"), base="sgd"),
    "sgd_msam": Arm("SGD + Momentum-SAM", lambda c: _variant(c, "msam", rho=3.0), base="sgd"),
    "adam_fsam": Arm("Adam + F-SAM", lambda c: _variant(use_adam(c), "fsam"), base="adam"),
    "adam_vasso": Arm("Adam + VaSSO", lambda c: _variant(use_adam(c), "vasso"), base="adam"),
    "adam_msam": Arm("Adam + Momentum-SAM", lambda c: _variant(use_adam(c), "msam", rho=3.0), base="adam"),
    "original_sgd": Arm("SGD (original study)", lambda c: _original(c, "sgd")),
    "original_sgd_asam": Arm("SGD + ASAM ρ=2 (original)", lambda c: _asam(_original(c, "sgd"), 2.0),
                             base="original_sgd"),  # fmt: skip
    "original_adam": Arm("Adam (original study)", lambda c: _original(c, "adam")),
    "original_adam_asam": Arm("Adam + ASAM ρ=2 (original)", lambda c: _asam(_original(c, "adam"), 2.0),
                              base="original_adam"),  # fmt: skip
}
MODELS = ("resnet18", "vgg16")
MODEL_LABELS = {"resnet18": "ResNet18", "vgg16": "VGG16"}


# ---------------------------------------------------------------------------
# The plan: which runs, where, with which config.


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training run of the grid."""

    model: str
    arm: str
    seed: int
    seed_index: int

    @property
    def path(self) -> str:
        """The run folder, relative to the study folder."""
        return os.path.join("runs", self.model, self.arm, f"seed{self.seed}")

    @property
    def name(self) -> str:
        return f"{self.model} {self.arm} seed {self.seed}"


def _names(value: str, known: Iterable[str], field: str) -> list[str]:
    chosen = [n.strip() for n in value.split(",") if n.strip()]
    known = list(known)
    unknown = [n for n in chosen if n not in known]
    if unknown or not chosen:
        raise ValueError(f"study.{field} has unknown {unknown or value!r}: choose from {', '.join(known)}")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"study.{field} names an entry twice ({value!r}): list each once")
    return chosen


def check_study(study: ml_collections.ConfigDict) -> None:
    """Raises ValueError (one line, naming the fix) for a study config that cannot run.

    Checks the grid, the measure options (`jaxsam.validate.check_measure_options`)
    and the training config of every (model, arm) as `run_config` makes it
    (`jaxsam.validate.check_config`).
    """
    from jaxsam import validate
    from jaxsam.measure import MEASURES

    models = _names(study.models, MODELS, "models")
    arms = _names(study.arms, ARMS, "arms")
    if int(study.seeds) < 1:
        raise ValueError(f"study.seeds must be >= 1 (got {study.seeds})")
    pairs = extra_runs(study)
    pair_epochs(study)
    for field in ("measures", "figure_measures"):
        value = study.measure.measures if field == "measures" else study.figure_measures
        if value.strip():
            _names(value, MEASURES, field)
    if study.run.size != study.size:
        raise ValueError(f"study.run is a {study.run.size!r} config but the study is {study.size!r}: use one size")
    validate.check_measure_options(study.measure, flag="--config.measure")
    for model, arm in [(m, a) for m in models for a in arms] + pairs:
        try:
            validate.check_config(run_config(study, RunSpec(model, arm, 0, 0)), flag="--config.run")
        except ValueError as err:
            raise ValueError(f"study run {model} {arm}: {err}") from None


def extra_runs(study: ml_collections.ConfigDict) -> list[tuple[str, str]]:
    """The (model, arm) pairs of `study.extra_arms` ("resnet18:original_adam,..."), run for every seed too."""
    pairs = []
    for item in [i.strip() for i in study.get("extra_arms", "").split(",") if i.strip()]:
        model, _, arm = item.partition(":")
        if model not in MODELS or arm not in ARMS:
            raise ValueError(f"study.extra_arms has {item!r}: use model:arm with a model of {', '.join(MODELS)} "
                             f"and an arm of {', '.join(ARMS)} (e.g. resnet18:original_adam)")  # fmt: skip
        if (model, arm) in pairs:
            raise ValueError(f"study.extra_arms names {item!r} twice: list each once")
        pairs.append((model, arm))
    return pairs


def pair_epochs(study: ml_collections.ConfigDict) -> dict[tuple[str, str], int]:
    """{(model, base arm): epochs} from `study.pair_epochs` ("vgg16:sgd=80,resnet18:original_adam=150").

    Each entry sets the number of epochs of a base arm on one model and of every
    SAM arm compared with it (`Arm.base`), so a SAM − base difference always
    compares runs of the same length. Entries for pairs the grid does not hold
    change nothing.
    """
    out: dict[tuple[str, str], int] = {}
    for item in [i.strip() for i in study.get("pair_epochs", "").split(",") if i.strip()]:
        pair, _, epochs = item.partition("=")
        model, _, arm = pair.strip().partition(":")
        model, arm = model.strip(), arm.strip()
        usage = "use model:base_arm=epochs, e.g. vgg16:sgd=80"
        if model not in MODELS or arm not in ARMS:
            raise ValueError(f"study.pair_epochs has {item!r}: {usage} (models {', '.join(MODELS)})")
        if ARMS[arm].base is not None:
            raise ValueError(f"study.pair_epochs has {item!r}: name the base arm {ARMS[arm].base!r}, which sets "
                             f"the epochs of its SAM arms too ({usage})")  # fmt: skip
        if not epochs.strip().isdigit() or int(epochs) < 1:
            raise ValueError(f"study.pair_epochs has {item!r}: the epochs must be a whole number >= 1 ({usage})")
        if (model, arm) in out:
            raise ValueError(f"study.pair_epochs names {model}:{arm} twice: list each pair once")
        out[(model, arm)] = int(epochs)
    return out


def plan(study: ml_collections.ConfigDict) -> list[RunSpec]:
    """Every run of the grid, seed by seed (all arms of seed 0 first), so a partial study is balanced.

    The grid is models x arms, then the `extra_arms` pairs (model:arm) not already in it.
    """
    check_study(study)
    models = _names(study.models, MODELS, "models")
    arms = _names(study.arms, ARMS, "arms")
    grid = [(model, arm) for model in models for arm in arms]
    grid += [pair for pair in extra_runs(study) if pair not in grid]
    return [RunSpec(model, arm, seed, index) for index, seed in enumerate(range(int(study.seeds))) for model, arm in grid]


def run_overrides(study: ml_collections.ConfigDict) -> dict[str, Any]:
    """The fields of `study.run` that differ from the size's defaults: applied to every arm."""
    defaults = flatten(base_config(study.size))
    return {k: v for k, v in flatten(study.run).items() if defaults.get(k) != v}


def run_config(study: ml_collections.ConfigDict, spec: RunSpec) -> ml_collections.ConfigDict:
    """The training config of one run: size defaults, then the arm, the study's overrides, its pair's epochs."""
    c = ARMS[spec.arm].apply(base_config(study.size))
    c.model.name = spec.model
    c.seed = spec.seed
    c.update_from_flattened_dict(run_overrides(study))
    epochs = pair_epochs(study).get((spec.model, ARMS[spec.arm].base or spec.arm))
    if epochs is not None:
        c.train.num_epochs = epochs
    return c


def measure_options(study: ml_collections.ConfigDict, spec: RunSpec) -> ml_collections.ConfigDict:
    """The measure options of one run: the study's, plus the figure-only measures on the first seeds."""
    from jaxsam.measure import MEASURES

    options = ml_collections.ConfigDict(study.measure.to_dict())
    if spec.seed_index < int(study.figure_seeds) and study.figure_measures.strip():
        chosen = options.measures.split(",")
        extra = [m for m in _names(study.figure_measures, MEASURES, "figure_measures") if m not in chosen]
        options.measures = ",".join(chosen + extra)
    return options


def interpolation_partner(specs: list[RunSpec], spec: RunSpec) -> RunSpec | None:
    """For a base arm: the first SAM arm of the plan paired with it (same model, seed), else None."""
    if ARMS[spec.arm].base is not None:
        return None
    for other in specs:
        if (other.model, other.seed) == (spec.model, spec.seed) and ARMS[other.arm].base == spec.arm:
            return other
    return None


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
        from jaxsam.measure import measure_options as measure_defaults
        # pair_epochs is grid-like: a run trained with other epochs is refused by its own settings check.
        grid = ("models", "arms", "extra_arms", "pair_epochs", "seeds", "figure_seeds", "figure_measures")
        old, new = flatten(saved["study"]), flatten(study)
        # A run or measure field the saved study predates counts as its default (older study folders resume).
        size = old.get("run.size", "full")
        defaults = {f"run.{k}": v for k, v in flatten(base_config(size)).items()}
        defaults.update({f"measure.{k}": v for k, v in flatten(measure_defaults(size)).items()})
        changed = sorted({k.split(".")[0] for k in changed_fields(old, new, defaults, grid)})
        if changed:
            raise ValueError(
                f"{study_dir} holds a study with other {', '.join(changed)} settings: use a new --workdir "
                f"(only the grid, models/arms/extra_arms/pair_epochs/seeds/figure_*, may change between starts)"
            )
    files.write_json(path, {"study": current, "command": command})


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
           ("track_first_order", "tracked ρ‖∇L‖"), ("track_average_case", "tracked average-case sharpness"))  # fmt: skip


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
                       **{key: [r.get(key) for r in epochs] for key, _ in TRACKED if any(key in r for r in epochs)}},
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
    from jaxsam import report, report_figures

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
    figures = report_figures.figures(study, rows, os.path.join(study_dir, "figures"))
    text = report.markdown(study, command, rows, summary, figures, planned)
    files.write_atomic(os.path.join(study_dir, "report.md"), text)
    files.write_json(os.path.join(study_dir, "summary.json"), _json_safe(summary))
    return summary


def _json_safe(value: Any) -> Any:
    from jaxsam.geometry.records import to_json

    return to_json(value)
