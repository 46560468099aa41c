"""Geometry of trained runs: tracked during training, measured after it (scripts/measure.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxsam.config import base_config
from jaxsam.measure import MEASURES, measure_options, measure_run
from jaxsam.track import make_tracker
from jaxsam.train import read_config, train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRACK = {
    "track.every_epochs": 1,
    "track.measures": "lambda_max,worst_case,average_case,first_order,preconditioned",
    "track.n_examples": 40,
    "track.batch_size": 16,
    "track.lanczos_iters": 6,
    "track.ascent_steps": 3,
    "track.samples": 4,
}


@pytest.fixture(scope="module")
def adam_run(tmp_path_factory):
    """A two-epoch Adam run on synthetic data with every tracked measure on."""
    c = base_config("smoke")
    c.train.progress = False
    c.data.synthetic_train = 96
    c.data.synthetic_test = 32
    c.train.batch_size = 32
    c.train.eval_batch_size = 32
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 1e-3
    c.update_from_flattened_dict(TRACK)
    workdir = str(tmp_path_factory.mktemp("adam_run"))
    train_and_evaluate(c, workdir)
    return c, workdir


def _epochs(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "test_accuracy" in r]


@pytest.mark.xdist_group("adam_run")
def test_measure_run_writes_every_measure_and_the_tracked_measures_bound_it(adam_run):
    config, workdir = adam_run
    options = measure_options("smoke")
    # The tracked subset and batch, and enough iterations for the final measures to be
    # the accurate values the few-step tracked ones are compared with below.
    options.n_examples, options.batch_size = config.track.n_examples, config.track.batch_size
    options.lanczos_iters, options.ascent_steps, options.top_k = 40, 30, 1
    options.interpolation_recalibrate = False  # the stale-statistics curve, compared with the recalibrated one below
    results = measure_run(workdir, options, progress=False, log=lambda line: None)
    train = results["splits"]["train"]
    assert set(train) == set(MEASURES)  # an Adam run: the preconditioned measure too
    assert train["worst_case"]["value"] > 0 and train["worst_case"]["loss_info"]["subset"] == "train[:40]"

    epochs = _epochs(workdir)
    assert [r["epoch"] for r in epochs] == [1, 2]
    for r in epochs:
        for name in ("loss", "lambda_max", "worst_case", "average_case", "first_order", "preconditioned", "seconds"):
            assert np.isfinite(r[f"track_{name}"]), (name, r)
        # Adam's threshold at the epoch's own learning rate (the cosine schedule's value at its last step).
        assert r["track_adam_threshold"] == pytest.approx(38 / r["lr"], rel=1e-6)
        assert 0 <= r["track_preconditioned_residual"] and r["track_preconditioned_excluded"] >= 0
    # The first tracked epoch starts its Lanczos runs from random vectors, the next from the last top vectors,
    # which the run keeps for a resume after that epoch.
    assert [r["track_warm"] for r in epochs] == [0.0, 1.0]
    tracker = make_tracker(config.track, None, np.zeros((1, 32, 32, 3)), np.zeros(1), config.optimizer)
    starts = os.path.join(workdir, "track_starts.npz")
    assert not tracker.load(starts, 1) and tracker.starts == {}  # saved after epoch 2, not 1
    assert tracker.load(starts, 2) and sorted(tracker.starts) == ["lambda_max", "preconditioned"]
    assert all(np.linalg.norm(v) == pytest.approx(1, rel=1e-5) for v in tracker.starts.values())
    last = epochs[-1]  # tracked on the final parameters, which measure_run reads from the checkpoint
    assert last["track_loss"] == pytest.approx(train["worst_case"]["loss"], rel=1e-5)
    # A few Lanczos steps give a lower bound of λmax, already close for the top of the spectrum.
    top = train["lambda_max"]["eigenvalues"][0]
    assert 0.8 * top <= last["track_lambda_max"] <= top * (1 + 1e-4)
    # Three ascent steps give a lower bound of the 30-step maximum.
    assert 0 < last["track_worst_case"] <= train["worst_case"]["value"] * (1 + 1e-4)
    assert last["track_first_order"] == pytest.approx(train["first_order"]["value"], rel=1e-4)

    assert train["preconditioned"]["eigenvalue"] > 0
    # The tracked preconditioned λmax is the same operator (same state, floor) by fewer Lanczos steps: a lower bound.
    assert 0 < last["track_preconditioned"] <= train["preconditioned"]["eigenvalue"] * (1 + 1e-4)
    assert last["track_adam_threshold"] == pytest.approx(train["preconditioned"]["adam_threshold"], rel=1e-6)
    assert train["preconditioned"]["adam_threshold_at_peak"] == pytest.approx(38 / 1e-3)  # (2+2·0.9)/(0.1·η)
    assert "eigenvectors" not in train["lambda_max"]  # parameter-sized: kept out of geometry.json
    assert all(record["seconds"] > 0 for record in train.values())
    for path in results["figures"].values():
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert {os.path.basename(p) for p in results["figures"].values()} == {
        "train_interpolation.png", "train_slice_1d.png", "train_surface_2d.png", "train_density.png"
    }  # fmt: skip
    with open(os.path.join(workdir, "geometry", "geometry.json")) as f:
        assert json.load(f)["splits"]["train"]["trace"]["trace"] == train["trace"]["trace"]
    options.measures = "first_order"
    measure_run(workdir, options, progress=False, log=lambda line: None)
    with open(os.path.join(workdir, "geometry", "geometry.1.json")) as f:
        assert set(json.load(f)["splits"]["train"]) == set(MEASURES)  # the earlier measurement is kept
    options.measures, options.interpolation_recalibrate, options.calibration_examples = "interpolation", True, 64
    curves = measure_run(workdir, options, progress=False, log=lambda line: None)["splits"]["train"]["interpolation"]
    stale = train["interpolation"]["init -> final"]
    fresh = curves["init -> final"]
    assert fresh["recalibrated"] and not stale["recalibrated"]
    # The statistics are recomputed at every point: the curve differs from the stale-statistics one.
    assert not np.allclose(fresh["loss"], stale["loss"])


@pytest.mark.xdist_group("adam_run")
def test_read_config_fills_fields_an_older_run_predates(adam_run, tmp_path):
    _, workdir = adam_run
    with open(os.path.join(workdir, "config.json")) as f:
        saved = json.load(f)
    del saved["track"], saved["data"]["crop_padding"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = read_config(str(tmp_path))
    assert config.track.every_epochs == 0 and config.data.crop_padding == 4


def test_measure_script_refuses_a_folder_that_is_not_a_run(tmp_path):
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "measure.py"), f"--workdir={tmp_path}"],
        capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == f"error: {tmp_path} has no config.json: pass the folder of a run made by scripts/train.py"


@pytest.mark.xdist_group("adam_run")
def test_unknown_measures_are_refused_with_the_list(adam_run):
    _, workdir = adam_run
    options = measure_options("smoke")
    options.measures = "worst_case,flatness"
    with pytest.raises(ValueError, match="unknown measure.*choose from worst_case"):
        measure_run(workdir, options, progress=False)
