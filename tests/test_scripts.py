"""scripts/train.py as a user runs it: a short run, and bad input as one line with nothing written."""

from __future__ import annotations

import io
import json
import os
import pathlib
import re
import subprocess
import sys
import tarfile

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CIFAR10 = ROOT.parent / "shared" / "data" / "cifar10" / "cifar-10-binary.tar.gz"


def run_script(script, *args, env=None, timeout=900):
    """scripts/<script> run from the repository root on the CPU."""
    # The user's own JAXSAM_CIFAR10 must not leak into a test that does not set it.
    base = {k: v for k, v in os.environ.items() if k != "JAXSAM_CIFAR10"}
    env = dict(base, JAX_PLATFORMS="cpu", **(env or {}))
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )


def run_train(*args, env=None, timeout=900):
    return run_script("train.py", *args, env=env, timeout=timeout)


def assert_one_error_line(out, message):
    """Exit code 2, no traceback, and stderr exactly one line `error: <message>` (a regex, matched whole)."""
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stdout + out.stderr, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and re.fullmatch("error: " + message, lines[0]), out.stderr[-2000:]


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
    # The data actually used, on one startup line.
    assert f"data: CIFAR-10 from archive {CIFAR10} (train 512 of 50,000, validation 0, test 1,000 of 10,000)" in (
        out.stdout.splitlines()), out.stdout[-2000:]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    epoch = records[-1]
    assert epoch["epoch_done"] and epoch["step"] == 8  # 512 images, batch 64
    # 1,000 real test images: a network trained for 8 steps is near chance, but the number is real.
    assert 0.05 < epoch["test_accuracy"] < 0.5
    assert f"{epoch['test_accuracy']:.4f}" in summary
    for key in ("train_loss", "train_accuracy", "test_loss", "lr", "train_images_per_sec", "epoch_seconds"):
        assert np.isfinite(epoch[key]), key
    assert sorted(p.name for p in workdir.iterdir()) == ["checkpoints", "config.json", "data.json", "metrics.jsonl"]
    assert json.loads((workdir / "data.json").read_text())["source"] == "archive"
    assert json.loads((workdir / "config.json").read_text())["data"]["n_test"] == 1000


def _tar_gz(path, members):
    """A .tar.gz of {name: bytes} written with the standard library."""
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def _snapshot(folder):
    """{relative path: bytes (None for a folder)} of everything under `folder` ({} when it does not exist)."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def _existing_run(workdir, **changes):
    """A workdir as scripts/train.py leaves it for configs/sgd.py:smoke with `changes`, and a checkpoint folder."""
    sys.path.insert(0, str(ROOT / "configs"))
    try:
        import sgd
    finally:
        sys.path.pop(0)
    config = sgd.get_config("smoke")
    config.update_from_flattened_dict(changes)
    (workdir / "checkpoints" / "8").mkdir(parents=True)
    (workdir / "checkpoints" / "8" / "kept").write_text("not touched")
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
    (workdir / "metrics.jsonl").write_text('{"step": 8}\n')


def _case_archive(tmp_path, kind):
    if kind == "missing":
        return tmp_path / "nowhere" / "cifar-10-binary.tar.gz"
    random = np.random.default_rng(0).integers(0, 256, 30_000, dtype=np.uint8).tobytes()
    if kind == "truncated":
        whole = _tar_gz(tmp_path / "whole.tar.gz", {"cifar-10-batches-bin/data_batch_1.bin": random}).read_bytes()
        (tmp_path / "cifar-10-binary.tar.gz").write_bytes(whole[: len(whole) // 2])
    else:  # the wrong layout: the python (pickle) version of CIFAR-10
        _tar_gz(tmp_path / "cifar-10-binary.tar.gz", {"cifar-10-batches-py/data_batch_1": b"\x80\x04" + random})
    return tmp_path / "cifar-10-binary.tar.gz"


# Every kind of bad input: the flags, the environment, what the workdir holds, the one line expected.
BAD_INPUT = {
    "unknown model": (["--config.model.name=resnet50"], {}, None, r"unknown model 'resnet50': use resnet18 or vgg16; did you mean resnet18\? \(--config.model.name=resnet18\)"),
    "unknown optimizer": (["--config.optimizer.name=lion"], {}, None, r"unknown optimizer 'lion': use one of adam, adamw, sgd \(--config.optimizer.name=...\)"),
    "unknown data source": (["--config.data.source=mnist"], {}, None, r"unknown data.source 'mnist': use one of archive, auto, synthetic, tfds\b.* \(--config.data.source=...\)"),
    "negative rho": (["--config.sam.name=sam", "--config.sam.rho=-0.1"], {}, None, r"sam.rho must be a finite number >= 0 \(got -0.1\): e.g. --config.sam.rho=0.05"),
    "batch not divisible by the devices": (
        ["--config.train.batch_size=36"], {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}, None,
        r"train.batch_size=36 does not split over the 8 devices: use a multiple of 8 \(e.g. --config.train.batch_size=32\)"),
    "archive missing": (["--config.data.source=archive"], {}, "missing", r"/.*/nowhere/cifar-10-binary.tar.gz does not exist: expected cifar-10-binary.tar.gz or its extracted "
        r"cifar-10-batches-bin/ folder \(pass --config.data.path=/path/to/cifar-10-binary.tar.gz or set JAXSAM_CIFAR10\)"),
    "archive truncated": (["--config.data.source=archive"], {}, "truncated", r"/.*/cifar-10-binary.tar.gz is a corrupt or incomplete gzip file \(EOFError: .*\): re-download cifar-10-binary.tar.gz"),
    "archive of the wrong layout": (["--config.data.source=archive"], {}, "wrong layout", r"/.*/cifar-10-binary.tar.gz is the CIFAR-10 python version, which is not read because it holds pickles "
        r"\(unpickling a downloaded file runs arbitrary code\): download the binary version cifar-10-binary.tar.gz .*"),
    "workdir of another config": (
        ["--config.optimizer.learning_rate=0.2"], {}, "another config",
        r"/.*/run holds a run with a different config \(optimizer.learning_rate: 0.05 -> 0.2\): use a new --workdir, or --allow_config_change to resume it with the new settings"),
    "unwritable workdir": ([], {}, "unwritable", r"cannot write to workdir /.*/a_file/run \(Not a directory\): choose a writable --workdir"),
    "incomplete multi-process flags": (
        ["--num_processes=2"], {}, None,
        r"a multi-process run needs all of --coordinator_address, --num_processes and --process_id \(or --distributed to read them from SLURM / Open MPI\)"),
    "checkpoint of another model": (
        ["--config.model.width=0.125", "--allow_config_change"], {}, "another model",
        r"/.*/run holds checkpoints of another network \(model.width differ\): --allow_config_change cannot change the network; use a new --workdir"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_and_loses_nothing(tmp_path, case):
    args, env, setup, message = BAD_INPUT[case]
    workdir = tmp_path / "run"
    if setup in ("missing", "truncated", "wrong layout"):
        args = [*args, f"--config.data.path={_case_archive(tmp_path, setup)}"]
    elif setup == "another config":
        _existing_run(workdir, **{"optimizer.learning_rate": 0.05})
    elif setup == "another model":
        _existing_run(workdir)
    elif setup == "unwritable":
        (tmp_path / "a_file").write_text("kept")
        workdir = tmp_path / "a_file" / "run"
    before = _snapshot(tmp_path)
    out = run_train("--config", "configs/sgd.py:smoke", "--workdir", str(workdir), *args, env=env, timeout=300)
    assert_one_error_line(out, message)
    assert _snapshot(tmp_path) == before  # nothing written, nothing overwritten
