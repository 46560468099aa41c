"""The study's grid: its arms, the runs of a study config, and each run's training and measure options.

`plan(study)` lists every (model, arm, seed) of a study config (`configs/study.py`)
as a `RunSpec`; `run_config(study, spec)` is the training config of one run
(the size's defaults, the arm's optimizer and SAM settings, the study's
overrides, its pair's epochs) and `measure_options(study, spec)` the options
its final checkpoint is measured with. `jaxsam.study` runs, collects and
reports them.

Arms follow the original PyTorch study (2022) and Foret et al. 2021 (SAM),
Kwon et al. 2021 (ASAM), Zhuang et al. 2022 (GSAM), Liu et al. 2022 (LookSAM),
Li et al. 2024 (F-SAM), Li & Giannakis 2023 (VaSSO), Becker et al. 2024
(Momentum-SAM).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterable

import ml_collections

from jaxsam.config import base_config, flatten, use_adam, use_sam

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


def _smoothed(c, label_smoothing: float = 0.1):
    # The one factor of the original study's pair besides the ball, ρ, lr and epochs.
    c.train.label_smoothing = label_smoothing
    return c


def _with_rho(apply: Callable, rho: float) -> Callable:
    def arm(c):
        c = apply(c)
        c.sam.rho = rho
        return c

    return arm


@dataclasses.dataclass(frozen=True)
class Arm:
    """One optimizer setting of the grid."""

    label: str  # as the report prints it
    apply: Callable[[ml_collections.ConfigDict], ml_collections.ConfigDict]
    base: str | None = None  # the arm without SAM it is compared with (None: it is a base)


class ArmTable(dict):
    """The named arms, and every SAM arm at another ρ: `<sam arm>_rho<ρ>` (e.g. adam_sam_rho0.1, adam_asam_rho2).

    ρ is spelled as `f"{rho:g}"` prints it, so each (arm, ρ) has one name and
    one run folder. Iterating lists the named arms only.
    """

    def _at_rho(self, name: str) -> Arm | None:
        stem, sep, value = name.rpartition("_rho")
        if not sep or not dict.__contains__(self, stem) or dict.__getitem__(self, stem).base is None:
            return None
        try:
            rho = float(value)
        except ValueError:
            return None
        if not (0 < rho < float("inf")) or f"{rho:g}" != value:
            return None
        arm = dict.__getitem__(self, stem)
        return Arm(f"{arm.label} ρ={value}", _with_rho(arm.apply, rho), base=arm.base)

    def __missing__(self, name: str) -> Arm:
        arm = self._at_rho(name)
        if arm is None:
            raise KeyError(name)
        return arm

    def __contains__(self, name: object) -> bool:
        return dict.__contains__(self, name) or (isinstance(name, str) and self._at_rho(name) is not None)

    def get(self, name, default=None):
        return self[name] if name in self else default


ARMS: ArmTable = ArmTable({
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
    # Label smoothing 0.1 alone, and with a SAM arm (the dose study: configs/study.py:dose).
    "adam_ls": Arm("Adam + LS", lambda c: _smoothed(use_adam(c))),
    "adam_ls_sam": Arm("Adam + LS + SAM", lambda c: use_sam(_smoothed(use_adam(c))), base="adam_ls"),
    "adam_ls_asam": Arm("Adam + LS + ASAM", lambda c: _asam(_smoothed(use_adam(c)), 0.5), base="adam_ls"),
    "original_sgd": Arm("SGD (original study)", lambda c: _original(c, "sgd")),
    "original_sgd_asam": Arm("SGD + ASAM ρ=2 (original)", lambda c: _asam(_original(c, "sgd"), 2.0),
                             base="original_sgd"),  # fmt: skip
    "original_adam": Arm("Adam (original study)", lambda c: _original(c, "adam")),
    "original_adam_asam": Arm("Adam + ASAM ρ=2 (original)", lambda c: _asam(_original(c, "adam"), 2.0),
                              base="original_adam"),  # fmt: skip
})
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
    unknown = [n for n in chosen if n not in known]
    if unknown or not chosen:
        more = " (or a SAM arm at another ρ, e.g. adam_sam_rho0.1)" if known is ARMS else ""
        raise ValueError(f"study.{field} has unknown {unknown or value!r}: choose from {', '.join(known)}{more}")
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
