"""A run folder's files: whole writes, one-line I/O errors that keep what was written, TensorBoard, load_run.

A full disk is simulated two ways: the kernel's own ENOSPC (/dev/full, and a
tiny tmpfs where this machine lets the tests mount one), and a write that
fails on purpose inside a training run (the same errors, raised at the
points where a full disk raises them).
"""

from __future__ import annotations

import errno
import glob
import json
import os
import struct
import subprocess

import jax
import numpy as np
import pytest
from conftest import tiny_train_config

from jaxsam import files, metrics
from jaxsam.checkpoint import CheckpointWriteError, Checkpoints
from jaxsam.config import changed_fields
from jaxsam.run import load_run
from jaxsam.train import train_and_evaluate

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
# What tensorstore (orbax's array writer) raises when the disk fills during a save, measured on a 300 KB tmpfs.
TENSORSTORE_ENOSPC = ValueError(
    'RESOURCE_EXHAUSTED: Error writing local file "ck/3.orbax-checkpoint-tmp/default/manifest.ocdbt": Failed '
    "to write 115 bytes to file 8: No space left on device [os_error_code='28']"
)


class _FullDisk:
    """`open` for jaxsam.files whose writes raise ENOSPC once `armed` (reads work as before)."""

    def __init__(self):
        self.armed = False

    def __call__(self, path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        if self.armed and any(c in mode for c in "wa"):
            def write(_text):
                raise ENOSPC
            f.write = write
        return f


@pytest.fixture
def full_disk(monkeypatch):
    disk = _FullDisk()
    monkeypatch.setattr(files, "open", disk, raising=False)
    return disk


def _records(workdir):
    return files.read_jsonl(os.path.join(workdir, "metrics.jsonl"))


# ---------------------------------------------------------------------------
# The file helpers.


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, full_disk):
    path = str(tmp_path / "config.json")
    files.write_json(path, {"a": 1})
    full_disk.armed = True
    with pytest.raises(files.WriteError) as err:
        files.write_json(path, {"a": 2})
    assert str(err.value) == (
        f"cannot write {path} (No space left on device): free space on that disk or make the folder writable, "
        f"then run the same command again; the previous file is kept"
    )
    assert json.load(open(path)) == {"a": 1} and os.listdir(tmp_path) == ["config.json"]


def test_appending_to_a_full_device_is_one_line():
    # /dev/full: every write fails with the kernel's ENOSPC.
    with pytest.raises(files.WriteError, match=r"^cannot write /dev/full \(No space left on device\): .* the lines "
                                               r"written before are kept$"):
        files.append_line("/dev/full", '{"step": 1}')


def test_a_log_cut_short_by_a_failed_write_reads_without_its_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"ste')
    assert files.read_jsonl(str(path)) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON: the file is damaged"):
        files.read_jsonl(str(path))


def test_keep_aside_numbers_the_old_copies(tmp_path):
    path = str(tmp_path / "config.json")
    for text in ("one", "two"):
        open(path, "w").write(text)
        files.keep_aside(path)
    assert open(tmp_path / "config.1.json").read() == "one" and open(tmp_path / "config.2.json").read() == "two"


def test_changed_fields_counts_a_missing_field_as_its_default():
    assert changed_fields({"a": 1}, {"a": 1, "b": 2}, {"b": 2}) == []
    assert changed_fields({"a": 1}, {"a": 1, "b": 3}, {"b": 2}) == ["b"]
    assert changed_fields({"a": 1, "p": "x"}, {"a": 2, "p": "y"}, {}, ignore=("p",)) == ["a"]


def test_step_sums_match_the_sums_by_hand():
    steps = [
        {"loss": 6.0, "correct": 2, "count": 4, "grad_norm": 1.5, "nonfinite": 0, "first_nonfinite": 2**31 - 1},
        {"loss": 0.0, "correct": 0, "count": 0, "grad_norm": 0.0, "nonfinite": 1, "first_nonfinite": 7},
        {"loss": 2.0, "correct": 3, "count": 4, "grad_norm": 0.5, "nonfinite": 1, "first_nonfinite": 9},
    ]
    sums = metrics.StepSums()
    assert not sums
    for s in steps:
        sums.add(jax.tree.map(np.asarray, s))
    assert sums.summary() == {"loss": 1.0, "accuracy": 5 / 8, "grad_norm": 2.0, "steps": 3, "skipped_steps": 2,
                              "first_nonfinite": 7}  # fmt: skip


# ---------------------------------------------------------------------------
# Checkpoints on a full disk.


def _tmpfs(folder, size):
    """Mounts a `size`-byte tmpfs at `folder` (True), or returns False where mounting is not allowed."""
    os.makedirs(folder, exist_ok=True)
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", folder], capture_output=True)
    return out.returncode == 0


def test_a_checkpoint_that_fills_the_disk_is_one_line_and_the_earlier_ones_stay(tmp_path, capfd):
    folder = str(tmp_path / "small")
    if not _tmpfs(folder, 300 * 1024):
        pytest.skip("this machine does not let the tests mount a tmpfs (needs root); "
                    "test_a_failed_checkpoint_save_stops_the_run_and_resumes covers the same path")  # fmt: skip
    try:
        state = {"w": np.arange(20_000, dtype=np.float32)}  # 80 KB: two fit in 300 KB with orbax's files, three do not
        ckpt = Checkpoints(os.path.join(folder, "ck"), keep=5)
        with pytest.raises(CheckpointWriteError) as err:
            for step in range(1, 6):
                ckpt.save(step, state)
                ckpt.wait()
        saved = ckpt.all_steps()
        restored = ckpt.restore(state, max(saved))
        ckpt.close()
    finally:
        subprocess.run(["umount", folder], check=True)
    assert str(err.value) == (
        f"cannot write checkpoint {max(saved) + 1} to {folder}/ck (No space left on device): free space on that "
        f"disk or make it writable, then run the same command again to resume; the last good checkpoint "
        f"(step {max(saved)}) is kept"
    )
    assert saved == list(range(1, max(saved) + 1)) and np.array_equal(restored["w"], state["w"])
    assert "Traceback" not in capfd.readouterr().err  # orbax's log of the failure is not shown


def test_a_failed_checkpoint_save_stops_the_run_and_resumes(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    workdir = str(tmp_path / "run")
    original, calls = ocp.CheckpointManager.save, []

    def save(self, step, *args, **kwargs):
        calls.append(step)
        if len(calls) == 2:  # the disk fills while epoch 2's checkpoint is written
            raise TENSORSTORE_ENOSPC
        return original(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    with pytest.raises(CheckpointWriteError) as err:
        train_and_evaluate(tiny_train_config(), workdir)
    assert str(err.value) == (
        f"cannot write checkpoint 8 to {workdir}/checkpoints (No space left on device): free space on that disk or "
        f"make it writable, then run the same command again to resume; the last good checkpoint (step 4) is kept"
    )
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4"]
    monkeypatch.setattr(ocp.CheckpointManager, "save", original)
    record = train_and_evaluate(tiny_train_config(), workdir)  # the same command again, space freed
    assert record["step"] == 8 and [r["epoch"] for r in _records(workdir) if "test_accuracy" in r] == [1, 2]


def test_a_failed_metrics_write_stops_the_run_and_keeps_the_log(tmp_path, full_disk, monkeypatch):
    from jaxsam import workdir as workdir_lib

    workdir = str(tmp_path / "run")
    original = workdir_lib.MetricsLog.write

    def write(self, record):
        full_disk.armed = record["step"] > 4  # the disk is full from epoch 2 on
        original(self, record)

    monkeypatch.setattr(workdir_lib.MetricsLog, "write", write)
    with pytest.raises(files.WriteError, match=r"^cannot write .*/run/metrics.jsonl \(No space left on device\): "
                                               r".*; the lines written before are kept$"):
        train_and_evaluate(tiny_train_config(**{"train.log_every_steps": 2}), workdir)
    assert [r["step"] for r in _records(workdir)] == [2, 4, 4]
    full_disk.armed = False
    monkeypatch.setattr(workdir_lib.MetricsLog, "write", original)
    record = train_and_evaluate(tiny_train_config(**{"train.log_every_steps": 2}), workdir)
    assert record["step"] == 8 and [r["step"] for r in _records(workdir)] == [2, 4, 4, 6, 8, 8]


# ---------------------------------------------------------------------------
# TensorBoard and load_run.


def _scalars(folder):
    """{tag: {step: value}} of the TensorBoard event files in `folder` (TFRecord framing, Event protos)."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, dict[int, float]] = {}
    for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
        blob = open(path, "rb").read()
        at = 0
        while at < len(blob):
            (length,) = struct.unpack("<Q", blob[at : at + 8])
            event = Event.FromString(blob[at + 12 : at + 12 + length])  # after the length and its CRC
            at += 12 + length + 4  # the data and its CRC
            for value in event.summary.value:
                out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


def test_tensorboard_holds_the_metrics_of_metrics_jsonl(tmp_path):
    workdir = str(tmp_path / "run")
    train_and_evaluate(tiny_train_config(**{"train.tensorboard": True, "train.log_every_steps": 2}), workdir)
    scalars, records = _scalars(os.path.join(workdir, "tensorboard")), _records(workdir)
    epochs = [r for r in records if "epoch_done" in r]
    logged = [r for r in records if "epoch_done" not in r]
    assert [r["step"] for r in logged] == [2, 4, 6, 8] and [r["step"] for r in epochs] == [4, 8]
    for kind, rows in (("epoch", epochs), ("step", logged)):
        for name in ("train_loss", "train_accuracy", "lr") + (("test_accuracy",) if kind == "epoch" else ()):
            expected = {r["step"]: r[name] for r in rows}
            # TensorBoard stores float32: equal to the JSON value's float32 rounding.
            assert scalars[f"{kind}/{name}"] == {s: float(np.float32(v)) for s, v in expected.items()}, name


def test_load_run_reads_no_data_until_asked(tmp_path, monkeypatch):
    import jaxsam.run as run_lib

    workdir = str(tmp_path / "run")
    config = tiny_train_config()
    train_and_evaluate(config, workdir)
    real_load, reads = run_lib.load_data, []
    monkeypatch.setattr(run_lib, "load_data", lambda *a, **k: reads.append(1) or real_load(*a, **k))
    run = load_run(workdir)
    assert reads == [] and int(run.state.step) == 8 and run.steps_per_epoch == 4
    assert len(run.dataset.train) == 128 and reads == [1]
    run.dataset  # read once
    assert reads == [1]
    # A run made before data.json recorded the training-set size: the size follows from its config.
    os.remove(os.path.join(workdir, "data.json"))
    assert load_run(workdir).steps_per_epoch == 4 and reads == [1]
    given = load_run(workdir, data=run.dataset)
    assert given.dataset is run.dataset and reads == [1]


def test_tensorboard_without_tensorboardx_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboardX" else real(name, *a))
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=r"^train.tensorboard=true writes through tensorboardX, which is not "
                                         r"installed: pip install tensorboardX, or --config.train.tensorboard=false$"):
        train_and_evaluate(tiny_train_config(**{"train.tensorboard": True}), str(workdir))
    assert not workdir.exists()
