"""Validation before anything is written: every config field and measure option, and the scripts' bad input as one line."""

from __future__ import annotations

import ast
import importlib.util
import re

import pytest
from test_scripts import ROOT, _existing_run, _snapshot, assert_one_error_line, run_script

from jaxsam import study as study_lib
from jaxsam.config import SIZES, base_config
from jaxsam.measure import measure_options
from jaxsam.validate import check_config, check_measure_options


def _config_module(name):
    spec = importlib.util.spec_from_file_location(f"{name}_config", ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config(**changes):
    c = base_config("smoke")
    c.update_from_flattened_dict(changes)
    return c


def _options(**changes):
    o = measure_options("smoke")
    o.update_from_flattened_dict(changes)
    return o


@pytest.mark.parametrize("size", SIZES)
def test_every_shipped_config_and_study_passes(size):
    for name in ("sgd", "sgd_sam", "adam", "adam_sam", "default"):
        check_config(_config_module(name).get_config(size))
    check_measure_options(measure_options(size))
    study_lib.plan(_config_module("study").get_config(size))  # check_study: every run config and the options


# (field, bad value, the message: a regex searched in the one line).
ENUMS = [
    ("model.name", "resnet50", r"^unknown model 'resnet50': use resnet18 or vgg16; did you mean resnet18\?"),
    ("model.dtype", "float16", r"^unknown model.dtype 'float16': use float32 or bfloat16; did you mean bfloat16\? \(--config.model.dtype=bfloat16\)$"),
    ("model.conv", "fast", r"^unknown model.conv 'fast': use one of auto, xla, native, onednn \(--config.model.conv=...\)$"),
    ("data.source", "mnist", r"^unknown data.source 'mnist': use one of archive, auto, synthetic, tfds"),
    ("data.source", "synthtic", r"did you mean synthetic\? \(--config.data.source=synthetic\)$"),
    ("optimizer.name", "adma", r"^unknown optimizer 'adma': use one of adam, adamw, sgd; did you mean adam\? \(--config.optimizer.name=adam\)$"),
    ("optimizer.schedule", "linear", r"^unknown optimizer.schedule 'linear': use cosine or constant \(--config.optimizer.schedule=...\)$"),
    ("sam.name", "ssam", r"^unknown sam.name 'ssam': use one of asam, fsam, gsam, looksam, msam, none, sam, vasso; did you mean sam\? \(--config.sam.name=sam\)$"),
    ("sam.adaptive_leaves", "weight", r"^unknown sam.adaptive_leaves 'weight': use one of all, weights, kernels; did you mean weights\? \(--config.sam.adaptive_leaves=weights\)$"),
    ("sam.mask", "kernel", r"^unknown sam.mask 'kernel': use all or kernels; did you mean kernels\? \(--config.sam.mask=kernels\)$"),
    ("train.nan_policy", "ignore", r"^unknown train.nan_policy 'ignore': use stop or skip \(--config.train.nan_policy=...\)$"),
    ("track.measures", "lambda_max,foo", r"^unknown measure 'foo' in track.measures: choose from lambda_max, worst_case, average_case, first_order, preconditioned \(--config.track.measures=...\)$"),
    ("track.measures", "lambda_max,worst_cas", r"did you mean worst_case\? \(--config.track.measures=lambda_max,worst_case\)$"),
    ("track.measures", "worst_case,worst_case", r"^track.measures must name each measure once"),
    ("size", "smok", r"^unknown config size 'smok': use one of full, fit, cpu, smoke; did you mean smoke\?"),
]  # fmt: skip
MEASURE_ENUMS = [
    ("measures", "worst_case,flatness", r"^unknown measure 'flatness' in options.measures: choose from worst_case, "),
    ("measures", "worst_cas", r"did you mean worst_case\? \(--options.measures=worst_case\)$"),
    ("measures", "", r"^options.measures must name each measure once, at least one \(got ''\)"),
    ("splits", "tset", r"^unknown split 'tset' in options.splits: choose from train, test; did you mean test\? \(--options.splits=test\)$"),
    ("bn", "evl", r"^unknown options.bn 'evl': use eval or train; did you mean eval\? \(--options.bn=eval\)$"),
    ("eigen_method", "restart", r"^unknown options.eigen_method 'restart': use restarted or lanczos; did you mean restarted\? \(--options.eigen_method=restarted\)$"),
]  # fmt: skip


@pytest.mark.parametrize("field, value, message", ENUMS, ids=[f"{f}={v}" for f, v, _ in ENUMS])
def test_every_enum_field_refuses_an_unknown_name(field, value, message):
    with pytest.raises(ValueError, match=message) as err:
        check_config(_config(**{field: value}))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("field, value, message", MEASURE_ENUMS, ids=[f"{f}={v}" for f, v, _ in MEASURE_ENUMS])
def test_every_measure_name_option_refuses_an_unknown_name(field, value, message):
    with pytest.raises(ValueError, match=message):
        check_measure_options(_options(**{field: value}))


# (field, a value out of range, the rule the message states).
RANGES = [
    ("seed", -1, "an integer >= 0"), ("model.width", 0.0, "a finite number > 0"),
    ("data.n_train", -1, "an integer >= 0"), ("data.n_validation", -5, "an integer >= 0"), ("data.n_test", -1, "an integer >= 0"),
    ("data.crop_padding", -1, "an integer >= 0"), ("data.synthetic_train", 0, "an integer >= 1"),
    ("data.synthetic_test", 0, "an integer >= 1"),
    ("optimizer.learning_rate", 0.0, "a finite number > 0"), ("optimizer.learning_rate", float("inf"), "a finite number > 0"),
    ("optimizer.warmup_epochs", -1.0, "a finite number >= 0"), ("optimizer.momentum", 1.0, r"a number in \[0, 1\)"),
    ("optimizer.b1", 1.0, r"a number in \[0, 1\)"), ("optimizer.b2", -0.1, r"a number in \[0, 1\)"),
    ("optimizer.eps", 0.0, "a finite number > 0"), ("optimizer.weight_decay", -1e-4, "a finite number >= 0"),
    ("sam.rho", -0.1, "a finite number >= 0"), ("sam.rho", float("nan"), "a finite number >= 0"),
    ("sam.rho_min", -0.1, "a finite number >= 0"), ("sam.eta", -0.01, "a finite number >= 0"),
    ("sam.alpha", -0.5, "a finite number >= 0"), ("sam.k", 0, "an integer >= 1"),
    ("sam.sigma", -1.0, "a finite number >= 0"), ("sam.lmbda", 1.0, r"a number in \[0, 1\)"),
    ("sam.theta", 0.0, r"a number in \(0, 1\]"), ("sam.theta", 1.5, r"a number in \(0, 1\]"),
    ("train.num_epochs", 0, "an integer >= 1"), ("train.max_steps", -1, "an integer >= 0"),
    ("train.batch_size", 0, "an integer >= 1"), ("train.eval_batch_size", -64, "an integer >= 1"),
    ("train.label_smoothing", 1.0, r"a number in \[0, 1\)"), ("train.label_smoothing", -0.1, r"a number in \[0, 1\)"),
    ("train.log_every_steps", 0, "an integer >= 1"), ("train.checkpoint_every_epochs", 0, "an integer >= 1"),
    ("train.keep_checkpoints", 0, "an integer >= 1"),
    ("track.every_epochs", -1, "an integer >= 0"), ("track.n_examples", 0, "an integer >= 1"),
    ("track.batch_size", 0, "an integer >= 1"), ("track.lanczos_iters", 0, "an integer >= 1"),
    ("track.rho", 0.0, "a finite number > 0"), ("track.ascent_steps", 0, "an integer >= 1"),
    ("track.sigma", 0.0, "a finite number > 0"), ("track.samples", 5, "an even integer >= 4"),
    ("track.samples", 2, "an even integer >= 4"),
]  # fmt: skip
MEASURE_RANGES = [
    ("n_examples", 0, "an integer >= 1"), ("accuracy_examples", -1, "an integer >= 0"), ("batch_size", 0, "an integer >= 1"),
    ("seed", -1, "an integer >= 0"), ("rho", -1.0, "a finite number > 0"), ("rho", 0.0, "a finite number > 0"),
    ("rho_adaptive", 0.0, "a finite number > 0"), ("ascent_steps", 0, "an integer >= 1"), ("sigma", 0.0, "a finite number > 0"),
    ("samples", 5, "an even integer >= 4"), ("top_k", 0, "an integer >= 1"), ("preconditioned_floor", 1.0, r"a number in \[0, 1\)"),
    ("eigen_tol", 0.0, "a finite number > 0"), ("eigen_max_matvecs", 0, "an integer >= 1"),
    ("lanczos_iters", 0, "an integer >= 1"), ("trace_probes", 1, "an integer >= 2"), ("density_order", 0, "an integer >= 1"),
    ("density_probes", 0, "an integer >= 1"), ("interpolation_points", 1, "an integer >= 2"), ("slice_points", 1, "an integer >= 2"),
    ("surface_points", 1, "an integer >= 2"), ("span", 0.0, "a finite number > 0"), ("calibration_examples", 0, "an integer >= 1"),
]  # fmt: skip


@pytest.mark.parametrize("field, value, rule", RANGES, ids=[f"{f}={v}" for f, v, _ in RANGES])
def test_every_numeric_config_field_is_checked_against_its_range(field, value, rule):
    default = base_config("smoke")
    for part in field.split("."):
        default = default[part]
    with pytest.raises(ValueError, match=rf"^{re.escape(field)} must be {rule}.* \(got .*\): e.g. --config.{re.escape(field)}=") as err:
        check_config(_config(**{field: value}))
    assert str(err.value).endswith(f"={default}")  # the example is the size's default


@pytest.mark.parametrize("field, value, rule", MEASURE_RANGES, ids=[f"{f}={v}" for f, v, _ in MEASURE_RANGES])
def test_every_numeric_measure_option_is_checked_against_its_range(field, value, rule):
    with pytest.raises(ValueError, match=rf"^options.{field} must be {rule}.* \(got .*\): e.g. --options.{field}="):
        check_measure_options(_options(**{field: value}))


def test_settings_that_only_make_sense_together():
    with pytest.raises(ValueError, match=r"^optimizer.warmup_epochs=1 needs the cosine schedule .*--config.optimizer.warmup_epochs=0$"):
        check_config(_config(**{"optimizer.warmup_epochs": 1.0, "optimizer.schedule": "constant"}))
    with pytest.raises(ValueError, match=r"fewer epochs than train.num_epochs=2"):
        check_config(_config(**{"optimizer.warmup_epochs": 2.0}))
    check_config(_config(**{"optimizer.warmup_epochs": 0.5}))
    with pytest.raises(ValueError, match=r"^options.top_k=6 needs as many Lanczos steps \(lanczos_iters=5\)"):
        check_measure_options(_options(top_k=6, eigen_method="lanczos"))
    check_measure_options(_options(top_k=6))  # the restarted solver's budget is eigen_max_matvecs
    check_measure_options(_options(antithetic=False, samples=3))  # plain Monte Carlo: any n >= 2
    with pytest.raises(ValueError, match=r"^options.samples must be an integer >= 2"):
        check_measure_options(_options(antithetic=False, samples=1))


def test_a_field_that_does_not_exist_is_named_with_the_nearest_one():
    c = _config()
    with c.unlocked():
        c.sam.rhoo = 0.1
    with pytest.raises(ValueError, match=r"^--config.sam.rhoo is not a field; did you mean --config.sam.rho\?$"):
        check_config(c)


def test_the_download_fields_are_accepted_as_strings_with_or_without_base_config_having_them():
    c = _config()
    with c.unlocked():
        c.data.url = "https://example.org/cifar-10-binary.tar.gz"
        c.data.sha256 = "0" * 64
    check_config(c)
    with c.unlocked():
        del c.data["url"], c.data["sha256"]
    check_config(c)


def test_train_and_evaluate_checks_before_the_workdir_is_made(tmp_path):
    from jaxsam.train import train_and_evaluate

    config = _config(**{"track.measures": "foo", "track.every_epochs": 1})
    with pytest.raises(ValueError, match="unknown measure 'foo' in track.measures"):
        train_and_evaluate(config, str(tmp_path / "run"))
    assert list(tmp_path.iterdir()) == []


def test_a_study_checks_every_run_config_and_its_measure_options():
    study = _config_module("study").get_config("smoke")
    study.run.sam.rho = -1.0
    with pytest.raises(ValueError, match=r"^study run resnet18 sgd: sam.rho must be a finite number >= 0 \(got -1.0\): "
                                         r"e.g. --config.run.sam.rho=0.05$"):  # fmt: skip
        study_lib.plan(study)
    study = _config_module("study").get_config("smoke")
    study.measure.sigma = 0.0
    with pytest.raises(ValueError, match=r"^config.measure.sigma must be a finite number > 0 .*--config.measure.sigma="):
        study_lib.plan(study)


def test_measure_script_usage_names_the_real_flag():
    usage = ast.get_docstring(ast.parse((ROOT / "scripts" / "measure.py").read_text()))
    assert "--options.measures=" in usage and "[--measures" not in usage


# The scripts' bad input: (script, flags, whether the workdir holds a run, the one line expected, matched whole).
SMOKE = ["--config", "configs/sgd.py:smoke"]
CLI = {
    "train: unknown tracked measure": ("train.py", [*SMOKE, "--config.track.measures=foo", "--config.track.every_epochs=1"], False,
        r"unknown measure 'foo' in track.measures: choose from lambda_max, worst_case, average_case, first_order, preconditioned \(--config.track.measures=...\)"),
    "train: unknown size": ("train.py", ["--config", "configs/sgd.py:smok"], False,
        r"unknown config size 'smok' in --config configs/sgd.py:smok: use one of full, fit, cpu, smoke; did you mean smoke\? \(--config configs/sgd.py:smoke\)"),
    "train: misspelled field": ("train.py", [*SMOKE, "--config.sam.rhoo=0.1"], False,
        r"--config.sam.rhoo is not a field; did you mean --config.sam.rho\?"),
    "train: missing config file": ("train.py", ["--config", "configs/nope.py"], False,
        r"--config configs/nope.py: no such config file; pass one of configs/adam.py, .*configs/sgd.py.*"),
    "train: misspelled config file": ("train.py", ["--config", "configs/sgd_sma.py:smoke"], False,
        r"--config configs/sgd_sma.py:smoke: no such config file; did you mean configs/sgd_sam.py\?"),
    "train: float16": ("train.py", [*SMOKE, "--config.model.dtype=float16"], False,
        r"unknown model.dtype 'float16': use float32 or bfloat16; did you mean bfloat16\? \(--config.model.dtype=bfloat16\)"),
    "train: value of the wrong type": ("train.py", [*SMOKE, "--config.train.batch_size=abc"], False,
        r"flag --config.train.batch_size=abc: invalid literal for int\(\) with base 10: 'abc'"),
    "train: misspelled flag": ("train.py", [*SMOKE, "--num_epochs=3"], False, r"unknown flag --num_epochs; did you mean --config.train.num_epochs\?"),
    "train: positional argument": ("train.py", [*SMOKE, "smoke"], False,
        r"unexpected arguments \['smoke'\]: flags take the form --name=value \(see --help\)"),
    "measure: misspelled option": ("measure.py", ["--options.n_exampels=5"], True,
        r"--options.n_exampels is not a field; did you mean --options.n_examples\?"),
    "measure: negative rho": ("measure.py", ["--options.rho=-1"], True,
        r"options.rho must be a finite number > 0 \(got -1.0\): e.g. --options.rho=0.05"),
    "measure: the flag its usage advertised": ("measure.py", ["--measures=worst_case"], True,
        r"unknown flag --measures; did you mean --options.measures\?"),
    "measure: unknown measure": ("measure.py", ["--options.measures=worst_case,sharpnes"], True,
        r"unknown measure 'sharpnes' in options.measures: choose from .*"),
    "study: unknown size": ("study.py", ["--config", "configs/study.py:smok"], False,
        r"unknown config size 'smok' in --config configs/study.py:smok: use one of full, fit, cpu, smoke; did you mean smoke\? \(--config configs/study.py:smoke\)"),
    "study: a run's field": ("study.py", ["--config", "configs/study.py:smoke", "--config.run.sam.rho=-1"], False,
        r"study run resnet18 sgd: sam.rho must be a finite number >= 0 \(got -1.0\): e.g. --config.run.sam.rho=0.05"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CLI))
def test_scripts_turn_bad_input_into_one_line_before_writing(tmp_path, case):
    script, args, has_run, message = CLI[case]
    workdir = tmp_path / "run"
    if has_run:
        _existing_run(workdir)  # config.json (sgd.py:smoke) and a checkpoint folder, never restored
    before = _snapshot(tmp_path)
    out = run_script(script, *args, "--workdir", str(workdir), timeout=120)
    assert_one_error_line(out, message)
    assert _snapshot(tmp_path) == before  # nothing written, not even a folder


def test_help_lists_the_fields_of_the_chosen_config_and_size(tmp_path):
    out = run_script("train.py", "--config", "configs/sgd.py:cpu", "--help", timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    listed = out.stdout.partition("--config fields of configs/sgd.py:cpu")[2]
    # The :cpu size's values, not the full-size defaults (200 epochs, width 1).
    for line in ("--config.train.num_epochs=3", "--config.model.width=0.125", "--config.optimizer.name=sgd",
                 "--config.train.progress=true"):
        assert f"  {line}\n" in listed, line


def test_the_onednn_convolution_without_its_extension_is_one_error(monkeypatch):
    from jaxsam.models import onednn_conv

    monkeypatch.setattr(onednn_conv, "AVAILABLE", False)
    monkeypatch.setattr(onednn_conv, "REASON", 'the extension is not built (pip install -e ".[cpu-fast]")')
    with pytest.raises(ValueError, match=r"^model.conv=onednn needs the oneDNN extension: the extension is not "
                                         r"built \(pip install -e \"\.\[cpu-fast\]\"\); or use --config.model.conv=auto$"):
        check_config(_config(**{"model.conv": "onednn"}))


def test_train_mode_measures_need_microbatches_that_divide_the_subset():
    with pytest.raises(ValueError, match=r"^options.bn=train normalizes each microbatch by its own statistics, so "
                                         r"batch_size=300 must divide n_examples=1000: e\.g\. --options.batch_size=250$"):  # fmt: skip
        check_measure_options(_options(bn="train", n_examples=1000, batch_size=300))
    check_measure_options(_options(bn="train", n_examples=1000, batch_size=250))


@pytest.mark.parametrize("path, message", [
    ("optimizer.lr", r"^--config.optimizer.lr is not a field; did you mean --config.optimizer.learning_rate\?$"),
    ("lr", r"did you mean --config.optimizer.learning_rate\?$"),
    ("train.epochs", r"did you mean --config.train.num_epochs\?$"),
    ("data.ntrain", r"did you mean --config.data.n_train\?$"),
    # Nothing likely meant: the fields beside it, never a wrong guess (optimizer.lr once suggested b2).
    ("train.foo", r"^--config.train.foo is not a field: the fields of config.train are batch_size, "),
])  # fmt: skip
def test_an_unknown_field_suggests_an_alias_or_a_close_name_beside_it_or_lists_the_fields(path, message):
    from jaxsam.config import flatten
    from jaxsam.validate import unknown_field

    with pytest.raises(ValueError, match=message):
        raise ValueError(unknown_field(path, flatten(_config()), "--config"))
