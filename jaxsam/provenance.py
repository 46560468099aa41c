"""Each study run's provenance.json: the code version, host and devices that trained and measured it, and the seconds.

    {"train": {"commit", "dirty", "host", "jax", "devices"}, "train_seconds": s,
     "measure": {...}, "measure_seconds": s, "train_interrupted": n}

`train_seconds` adds up every training attempt of the run: those that
finished, and those that died (killed, preempted; "train_interrupted" counts
them) up to the last line they wrote to metrics.jsonl. A training attempt
leaves `<study>/jobs/<run>.attempt` (its start time) while it runs; the next
attempt, holding the run's lock, finds a marker left behind and counts it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from typing import Any

from jaxsam import files

PROVENANCE = "provenance.json"


def code_version() -> dict[str, Any]:
    """The git commit of the jaxsam source in use and whether it had local changes ("unknown" outside git)."""
    folder = os.path.dirname(os.path.abspath(__file__))

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", folder, *args], capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()  # fmt: skip

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--", "."))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}


def _path(workdir: str) -> str:
    return os.path.join(workdir, PROVENANCE)


def read_provenance(workdir: str) -> dict[str, Any]:
    """The run's provenance.json ({} where it has none)."""
    if not os.path.exists(_path(workdir)):
        return {}
    with open(_path(workdir)) as f:
        return json.load(f)


def _add(workdir: str, increments: dict[str, float], **stamps: Any) -> None:
    """Adds `increments` to the run's provenance.json entries (0 where absent) and sets `stamps`."""
    saved = read_provenance(workdir)
    saved.update({key: saved.get(key, 0) + value for key, value in increments.items()}, **stamps)
    files.write_json(_path(workdir), saved)


def record(workdir: str, key: str, seconds: float) -> None:
    """Adds `seconds` to the run's `key` ("train_seconds", "measure_seconds") and stamps the code, host and devices."""
    import jax

    devices = jax.devices()
    _add(workdir, {key: seconds}, **{key.replace("_seconds", ""): {
        **code_version(), "host": socket.gethostname(), "jax": jax.__version__,
        "devices": f"{len(devices)} x {devices[0].device_kind}",
    }})  # fmt: skip


def _attempt_path(study_dir: str, path: str) -> str:
    return os.path.join(study_dir, "jobs", path.replace(os.sep, "_") + ".attempt")


def begin_attempt(study_dir: str, path: str, start: float) -> None:
    """Marks the run `path` of the study as training since `start` (time.time()), until `end_attempt`."""
    files.write_atomic(_attempt_path(study_dir, path), f"{start!r}\n")


def end_attempt(study_dir: str, path: str) -> None:
    """The training attempt finished (its seconds are recorded): removes its marker."""
    os.remove(_attempt_path(study_dir, path))


def count_interrupted_attempt(study_dir: str, path: str) -> float:
    """Adds a training attempt of the run that died, if it left its marker, to the run's train_seconds.

    Call it holding the run's lock (no other attempt is alive then). The
    seconds from the dead attempt's start to its last line in metrics.jsonl
    count (0 if it wrote none); "train_interrupted" counts the attempt.

    Args:
      study_dir: the study folder.
      path: the run's folder relative to it (`RunSpec.path`).

    Returns:
      The seconds added (0.0 where no attempt was left behind).
    """
    marker = _attempt_path(study_dir, path)
    if not os.path.exists(marker):
        return 0.0
    with open(marker) as f:
        start = float(f.read())
    workdir = os.path.join(study_dir, path)
    metrics = os.path.join(workdir, "metrics.jsonl")
    seconds = max(0.0, os.stat(metrics).st_mtime - start) if os.path.exists(metrics) else 0.0
    if os.path.isdir(workdir):
        _add(workdir, {"train_seconds": seconds, "train_interrupted": 1})
    os.remove(marker)
    return seconds
