"""User input checked once, before anything is written: training configs, measure options, command lines.

`check_config(config)` checks every field of a training config (`jaxsam.config.base_config`),
`check_measure_options(options)` every measure option (`jaxsam.measure.measure_options`):
names against the known ones, numbers against their ranges. Each problem raises `ValueError` with
one line naming the field and the fix, with "did you mean ...?" for a near miss. `flags_parser`
makes a bad command line (unknown flag or config field, wrong type, missing config file, unknown
size, positional argument) one `error: ...` line on stderr and exit code 2 in the scripts.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import os
import sys
from typing import Any, Callable, Iterable, Optional

from jaxsam.config import flatten

DTYPES = ("float32", "bfloat16")
SCHEDULES = ("cosine", "constant")
MASKS = ("all", "kernels")
SPLITS = ("train", "test")
OPTIONAL_FIELDS = ("data.url", "data.sha256")  # strings, accepted whether or not base_config has them


# The ranges: (what the value must be, its test); `type(v) is int` leaves out bools.
INT0 = ("an integer >= 0", lambda v: type(v) is int and v >= 0)
INT1 = ("an integer >= 1", lambda v: type(v) is int and v >= 1)
INT2 = ("an integer >= 2", lambda v: type(v) is int and v >= 2)
POSITIVE = ("a finite number > 0", lambda v: type(v) in (int, float) and math.isfinite(v) and v > 0)
NONNEGATIVE = ("a finite number >= 0", lambda v: type(v) in (int, float) and math.isfinite(v) and v >= 0)
UNIT = ("a number in [0, 1)", lambda v: type(v) in (int, float) and 0 <= v < 1)
UNIT_RIGHT = ("a number in (0, 1]", lambda v: type(v) in (int, float) and 0 < v <= 1)
PAIRS = ("an even integer >= 4 (samples/2 antithetic pairs)", lambda v: type(v) is int and v >= 4 and v % 2 == 0)
BOOL = ("true or false", lambda v: isinstance(v, bool))
STRING = ("a string", lambda v: isinstance(v, str))

CONFIG_RANGES = {
    "seed": INT0, "model.width": POSITIVE, "data.path": STRING, "data.url": STRING, "data.sha256": STRING,
    "data.n_train": INT0, "data.n_validation": INT0, "data.n_test": INT0, "data.crop_padding": INT0,
    "data.synthetic_train": INT1, "data.synthetic_test": INT1,
    "optimizer.learning_rate": POSITIVE, "optimizer.warmup_epochs": NONNEGATIVE, "optimizer.momentum": UNIT,
    "optimizer.nesterov": BOOL, "optimizer.b1": UNIT, "optimizer.b2": UNIT, "optimizer.eps": POSITIVE,
    "optimizer.weight_decay": NONNEGATIVE,
    "sam.rho": NONNEGATIVE, "sam.rho_min": NONNEGATIVE, "sam.eta": NONNEGATIVE, "sam.alpha": NONNEGATIVE,
    "sam.k": INT1, "sam.per_device": BOOL, "sam.sigma": NONNEGATIVE, "sam.lmbda": UNIT, "sam.theta": UNIT_RIGHT,
    "train.num_epochs": INT1, "train.max_steps": INT0, "train.batch_size": INT1, "train.eval_batch_size": INT1,
    "train.label_smoothing": UNIT, "train.log_every_steps": INT1, "train.checkpoint_every_epochs": INT1,
    "train.keep_checkpoints": INT1, "train.progress": BOOL, "train.tensorboard": BOOL,
    "track.every_epochs": INT0, "track.n_examples": INT1, "track.batch_size": INT1, "track.lanczos_iters": INT1,
    "track.rho": POSITIVE, "track.ascent_steps": INT1, "track.sigma": POSITIVE, "track.samples": PAIRS,
}  # fmt: skip
EIGEN_METHODS = ("restarted", "lanczos")
MEASURE_RANGES = {
    "n_examples": INT1, "accuracy_examples": INT0, "batch_size": INT1, "seed": INT0, "rho": POSITIVE,
    "rho_adaptive": POSITIVE, "ascent_steps": INT1, "sigma": POSITIVE, "antithetic": BOOL, "top_k": INT1,
    "preconditioned_floor": UNIT, "eigen_tol": POSITIVE, "eigen_max_matvecs": INT1, "lanczos_iters": INT1, "trace_probes": INT2, "density_order": INT1,
    "density_probes": INT1, "interpolation_points": INT2, "slice_points": INT2, "surface_points": INT2,
    "span": POSITIVE, "recalibrate": BOOL, "interpolation_recalibrate": BOOL, "calibration_examples": INT1,
}  # fmt: skip


def did_you_mean(value: Any, choices: Iterable[Any]) -> Optional[str]:
    """The closest of `choices` to `value` (difflib), or None when none is close."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    return close[0] if close else None


# Names users type for a field, by its name (the field is suggested only where it exists).
ALIASES = {"lr": "learning_rate", "learningrate": "learning_rate", "wd": "weight_decay", "epochs": "num_epochs",
           "bs": "batch_size", "batch": "batch_size", "beta1": "b1", "beta2": "b2", "epsilon": "eps",
           "smoothing": "label_smoothing", "steps": "max_steps", "arch": "name", "optimizer": "name"}  # fmt: skip


def _suggested_field(path: str, fields: list[str]) -> Optional[str]:
    """The field `path` most likely meant: an alias or a close name beside it, or the one field of that name."""
    parent, _, leaf = path.rpartition(".")
    beside = {f.rpartition(".")[2]: f for f in fields if f.rpartition(".")[0] == parent}
    meant = ALIASES.get(leaf.lower().replace("-", "_"), leaf)
    if meant in beside:
        return beside[meant]
    anywhere = [f for f in fields if f.rpartition(".")[2] in (leaf, meant)]
    if len(anywhere) == 1:
        return anywhere[0]
    close = difflib.get_close_matches(leaf, list(beside), n=1, cutoff=0.75)
    return beside[close[0]] if close else None


def unknown_field(path: str, fields: Iterable[str], flag: str) -> str:
    """The one-line error for `{flag}.{path}` when `path` names none of `fields` (flattened names).

    It suggests a field only where one is likely meant (a known alias such as
    lr -> learning_rate, or a close spelling of a field beside it), else lists
    the fields there.
    """
    fields = sorted(fields)
    best = _suggested_field(path, fields)
    if best:
        return f"{flag}.{path} is not a field; did you mean {flag}.{best}?"
    parent = path.rpartition(".")[0]
    inside = [f[len(parent) + 1 :] for f in fields if f.startswith(parent + ".")] if parent else []
    names = sorted({f.split(".")[0] for f in (inside or fields)})
    return f"{flag}.{path} is not a field: the fields of {flag[2:]}{'.' + parent if inside else ''} are {', '.join(names)}"


class _Fields(dict):
    """A config's flattened values (its defaults where it lacks a field) and the checks that raise."""

    def __init__(self, config: Any, defaults: dict[str, Any], flag: str, shown: str = ""):
        values = flatten(config)
        unknown = sorted(set(values) - set(defaults) - set(OPTIONAL_FIELDS))
        if unknown:
            raise ValueError(unknown_field(unknown[0], defaults, flag))
        super().__init__({**defaults, **values})
        self.defaults, self.flag, self.shown = defaults, flag, shown

    def fix(self, field: str, value: Any = "...") -> str:
        return f"{self.flag}.{field}={str(value).lower() if isinstance(value, bool) else value}"

    def choice(self, field: str, choices: Iterable[str], label: Optional[str] = None) -> None:
        value, choices = self[field], list(choices)
        if value not in choices:
            best = did_you_mean(value, choices)
            listed = " or ".join(choices) if len(choices) == 2 else "one of " + ", ".join(choices)
            hint = f"; did you mean {best}? ({self.fix(field, best)})" if best else f" ({self.fix(field)})"
            raise ValueError(f"unknown {label or self.shown + field} {value!r}: use {listed}{hint}")

    def names(self, field: str, known: Iterable[str], label: str) -> None:
        """A comma-separated list of `known` names, each once."""
        value, known = self[field], list(known)
        chosen = [n.strip() for n in str(value).split(",") if n.strip()]
        for name in (n for n in chosen if n not in known):
            best = did_you_mean(name, known)
            fixed = ",".join(best if n == name else n for n in chosen) if best else "..."
            hint = f"; did you mean {best}? ({self.fix(field, fixed)})" if best else f" ({self.fix(field)})"
            raise ValueError(f"unknown {label} {name!r} in {self.shown}{field}: choose from {', '.join(known)}{hint}")
        if not chosen or len(set(chosen)) < len(chosen):
            raise ValueError(f"{self.shown}{field} must name each {label} once, at least one (got {value!r}): "
                             f"e.g. {self.fix(field, self.defaults[field])}")  # fmt: skip

    def ranges(self, ranges: dict[str, tuple[str, Callable[[Any], bool]]]) -> None:
        for field, (rule, ok) in ranges.items():
            if field in self and not ok(self[field]):
                example = self.fix(field, self.defaults.get(field, "..."))
                raise ValueError(f"{self.shown}{field} must be {rule} (got {self[field]!r}): e.g. {example}")


def check_config(config: Any, *, flag: str = "--config") -> None:
    """Raises `ValueError` (one line naming the field and the fix) for a training config that cannot run.

    Args:
      config: a `jaxsam.config.base_config` config, as configs/*.py make it and --config.x.y=v change it.
      flag: how the fixes name the config on the command line (a study's runs: "--config.run").

    Example:
      >>> from jaxsam.config import base_config
      >>> config = base_config("smoke")
      >>> config.optimizer.name = "adma"
      >>> check_config(config)
      Traceback (most recent call last):
      ValueError: unknown optimizer 'adma': use one of adam, adamw, sgd; did you mean adam? (--config.optimizer.name=adam)
    """
    from jaxsam import config as config_lib, data, models, sam, train
    from jaxsam.track import TRACKABLE
    from jaxsam.models.layers import CONV_IMPLS

    size, sizes = flatten(config).get("size", "full"), config_lib.SIZES
    if size not in sizes:
        best = did_you_mean(size, sizes)
        hint = f"; did you mean {best}? (e.g. --config configs/sgd.py:{best})" if best else ""
        raise ValueError(f"unknown config size {size!r}: use one of {', '.join(sizes)}{hint}")
    c = _Fields(config, flatten(config_lib.base_config(size)), flag)
    c.choice("model.name", sorted(models.MODELS), "model")
    c.choice("model.dtype", DTYPES)
    c.choice("model.conv", CONV_IMPLS)
    if c["model.conv"] == "onednn":
        from jaxsam.models import onednn_conv

        if not onednn_conv.AVAILABLE:
            raise ValueError(f"model.conv=onednn needs the oneDNN extension: {onednn_conv.REASON}; "
                             f"or use {c.fix('model.conv', 'auto')}")  # fmt: skip
    c.choice("data.source", data.SOURCES)  # read now: another module may add sources
    c.choice("optimizer.name", train.OPTIMIZERS, "optimizer")
    c.choice("optimizer.schedule", SCHEDULES)
    c.choice("sam.name", train.SAM_VARIANTS)
    c.choice("sam.mask", MASKS)
    c.choice("sam.adaptive_leaves", sam.ADAPTIVE_LEAVES)
    c.choice("train.nan_policy", train.NAN_POLICIES)
    c.names("track.measures", TRACKABLE, "measure")
    c.ranges(CONFIG_RANGES)
    warmup, epochs = c["optimizer.warmup_epochs"], c["train.num_epochs"]
    if warmup and (c["optimizer.schedule"] != "cosine" or warmup >= epochs):  # else ignored, or no decay left
        raise ValueError(f"optimizer.warmup_epochs={warmup:g} needs the cosine schedule and fewer epochs than "
                         f"train.num_epochs={epochs}: e.g. {c.fix('optimizer.warmup_epochs', 0)}")  # fmt: skip
    if c["train.tensorboard"] and importlib.util.find_spec("tensorboardX") is None:
        raise ValueError(f"train.tensorboard=true writes through tensorboardX, which is not installed: "
                         f"pip install tensorboardX, or {c.fix('train.tensorboard', False)}")  # fmt: skip


def check_measure_options(options: Any, *, flag: str = "--options") -> None:
    """Raises `ValueError` (one line naming the option and the fix) for measure options that cannot run.

    Args:
      options: `jaxsam.measure.measure_options(size)`, as --options.x=v change it.
      flag: how the fixes name the options on the command line (a study's: "--config.measure").
    """
    from jaxsam.geometry.loss import BN_MODES
    from jaxsam.measure import MEASURES, measure_options

    o = _Fields(options, flatten(measure_options()), flag, shown=flag[2:] + ".")
    o.names("measures", MEASURES, "measure")
    o.names("splits", SPLITS, "split")
    o.choice("bn", BN_MODES)
    o.choice("eigen_method", EIGEN_METHODS)
    o.ranges(MEASURE_RANGES)
    o.ranges({"samples": PAIRS if o["antithetic"] else INT2})
    n, size = o["n_examples"], min(o["batch_size"], o["n_examples"])
    if o["bn"] == "train" and n % size:
        divisor = max(d for d in range(1, size + 1) if n % d == 0)
        raise ValueError(f"{o.shown}bn=train normalizes each microbatch by its own statistics, so batch_size="
                         f"{o['batch_size']} must divide n_examples={n}: e.g. {o.fix('batch_size', divisor)}")  # fmt: skip
    k, iters = o["top_k"], o["lanczos_iters"]
    if o["eigen_method"] == "lanczos" and k > iters:
        raise ValueError(f"{o.shown}top_k={k} needs as many Lanczos steps (lanczos_iters={iters}): "
                         f"e.g. {o.fix('lanczos_iters', max(k, o.defaults['lanczos_iters']))}")  # fmt: skip


# ---------------------------------------------------------------------------
# Command lines.


def flags_parser(*config_flags: str) -> Callable[[list[str]], list[str]]:
    """A `flags_parser` for `absl.app.run`: a bad command line is one `error:` line on stderr and exit code 2.

    Args:
      *config_flags: the script's ml_collections config flags ("config", "options").

    Returns:
      `parse(argv) -> [argv[0]]` (positional arguments are an error too).
    """

    def parse(argv: list[str]) -> list[str]:
        from absl import flags

        try:
            try:
                rest = flags.FLAGS(argv)  # --help prints the usage and exits here
            except SystemExit:
                if any(a in ("--help", "-h", "-?", "--helpshort", "--helpfull") for a in argv[1:]):
                    _print_fields(config_flags, argv)
                    sys.exit(0)  # absl exits 1 after the usage; asking for help is not an error
                raise
            for name in config_flags:  # a missing config file raises only when the config is read
                getattr(flags.FLAGS[name].value, "get", None)
        except (flags.Error, AttributeError, KeyError, OSError, TypeError, ValueError) as err:
            _exit(_flag_error(err, argv, config_flags))
        if len(rest) > 1:
            _exit(f"unexpected arguments {rest[1:]}: flags take the form --name=value (see --help)")
        return rest

    return parse


def _print_fields(config_flags: tuple[str, ...], argv: list[str]) -> None:
    """After --help's usage: every field of each config flag with its value in the chosen file and size."""
    for name in config_flags:
        argument = _argument(argv, name)
        fields = _fields_of(name, argument)
        if not fields:
            continue
        print(f"\n--{name} fields{f' of {argument}' if argument else ''} (set one with --{name}.<field>=<value>):")
        for field, value in fields.items():
            print(f"  --{name}.{field}={str(value).lower() if isinstance(value, bool) else value}")


def check_overrides(name: str, config: Any, argv: Optional[list[str]] = None) -> None:
    """Exits (one `error:` line, code 2) if a --name.x=v of `argv` (sys.argv) names no field of `config`: call
    it before `config_flags.DEFINE_config_dict`, which applies the overrides as it defines the flag."""
    problem = _override_problem(name, flatten(config), sys.argv if argv is None else argv)
    if problem:
        _exit(problem)


def _exit(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _override_problem(name: str, fields: dict[str, Any], argv: list[str]) -> Optional[str]:
    for path in [a[len(name) + 3 :].partition("=")[0] for a in argv if a.startswith(f"--{name}.")]:
        if path not in fields and not any(f.startswith(path + ".") for f in fields):
            return unknown_field(path, fields, f"--{name}")
    return None


def _argument(argv: list[str], name: str) -> Optional[str]:
    """The value of --name in argv (--name=v or --name v), else None."""
    found = (a.partition("=")[2] if a != f"--{name}" else v for a, v in zip(argv, [*argv[1:], None])
             if a.split("=")[0] == f"--{name}")  # fmt: skip
    return next(found, None)


def _fields_of(name: str, argument: Optional[str]) -> dict[str, Any]:
    """The fields of config flag `name` loaded from `argument` (its default without one); {} if it fails."""
    from absl import flags

    try:
        return flatten(flags.FLAGS[name].parser.parse(argument) if argument is not None else flags.FLAGS[name].value)
    except (AttributeError, OSError, TypeError, ValueError):
        return {}


def _config_file_problem(name: str, argument: str) -> Optional[str]:
    """A missing config file or an unknown size in `--name file.py:size`, else None."""
    from jaxsam.config import SIZES

    path, _, size = argument.partition(":")
    if not os.path.isfile(path):
        folder = os.path.dirname(path)
        names = sorted(f for f in os.listdir(folder or ".") if f.endswith(".py")) if os.path.isdir(folder or ".") else []
        best = did_you_mean(os.path.basename(path), names)
        files = ", ".join(os.path.join(folder, f) for f in names) or "your .py files"
        fix = f"did you mean {os.path.join(folder, best)}?" if best else f"pass one of {files}"
        return f"--{name} {argument}: no such config file; {fix}"
    if size and size not in SIZES:
        best = did_you_mean(size, SIZES)
        hint = f"; did you mean {best}? (--{name} {path}:{best})" if best else ""
        return f"unknown config size {size!r} in --{name} {argument}: use one of {', '.join(SIZES)}{hint}"
    return None


def _flag_error(err: Exception, argv: list[str], config_flags: tuple[str, ...]) -> str:
    """One line for what made parsing `argv` fail."""
    from absl import flags

    text, flagname = str(err), str(getattr(err, "flagname", ""))
    if isinstance(err, flags.UnrecognizedFlagError):
        fields = [f"{n}.{f}" for n in config_flags for f in _fields_of(n, _argument(argv, n))]
        best = next((f for f in fields if f.endswith("." + flagname)), None) or did_you_mean(flagname, [*flags.FLAGS, *fields])
        return f"unknown flag --{flagname}" + (f"; did you mean --{best}?" if best else ": see --help")
    for name in config_flags:
        argument = _argument(argv, name)
        fields = _fields_of(name, argument)
        problem = (argument and _config_file_problem(name, argument)) or (fields and _override_problem(name, fields, argv))
        if problem:
            return problem
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "Traceback" in text:  # raised inside a config file: the last line is the error
        return lines[-1].partition(": ")[2] or lines[-1]
    return " ".join(lines) or type(err).__name__

