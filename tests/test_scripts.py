"""scripts/train.py as a user runs it: a short run, and bad input as one line with nothing written."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CIFAR10 = ROOT.parent / "shared" / "data" / "cifar10" / "cifar-10-binary.tar.gz"


def run_train(*args, env=None, timeout=900):
    # The user's own JAXSAM_CIFAR10 must not leak into a test that does not set it.
    base = {k: v for k, v in os.environ.items() if k != "JAXSAM_CIFAR10"}
    env = dict(base, JAX_PLATFORMS="cpu", **(env or {}))
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )


@pytest.mark.slow
def test_train_script_on_real_cifar10(tmp_path):
    """One short epoch of ResNet18 (width 1/16) + Adam + SAM on real CIFAR-10 through the CLI."""
    if not CIFAR10.exists():
        pytest.skip(f"real CIFAR-10 not found at {CIFAR10}")
    workdir = tmp_path / "run"
    out = run_train(
        "--config", "configs/adam_sam.py:cpu", "--workdir", str(workdir),
        "--config.model.width=0.0625", "--config.data.n_train=512", "--config.data.n_test=1000",
        "--config.train.num_epochs=1", "--config.train.progress=false",
        env={"JAXSAM_CIFAR10": str(CIFAR10)},  # the compilation cache comes from conftest's environment
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = out.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"done: {workdir}: epoch 1/1, step 8, test accuracy "), summary
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    epoch = records[-1]
    assert epoch["epoch_done"] and epoch["step"] == 8  # 512 images, batch 64
    # 1,000 real test images: a network trained for 8 steps is near chance, but the number is real.
    assert 0.05 < epoch["test_accuracy"] < 0.5
    assert f"{epoch['test_accuracy']:.4f}" in summary
    for key in ("train_loss", "train_accuracy", "test_loss", "lr", "train_images_per_sec", "epoch_seconds"):
        assert np.isfinite(epoch[key]), key
    assert sorted(p.name for p in workdir.iterdir()) == ["checkpoints", "config.json", "metrics.jsonl"]
    assert json.loads((workdir / "config.json").read_text())["data"]["n_test"] == 1000


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.optimizer.name=lion"], "error: unknown optimizer 'lion': use one of adam, adamw, sgd"),
        (["--config.data.source=archive", "--config.data.path=/nonexistent/cifar-10-binary.tar.gz"], "error: "),
        (["--config.data.source=mnist"], "error: unknown data source 'mnist'"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, message):
    workdir = tmp_path / "run"
    out = run_train("--config", "configs/sgd.py:smoke", "--workdir", str(workdir), *args, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(message), out.stderr
    assert not workdir.exists()
