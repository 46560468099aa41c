"""Writing a run's small files whole or not at all, and saying in one line why a write failed.

Every file the application writes (config.json, data.json, metrics.jsonl,
geometry.json, study.json, report.md) goes through these functions, so a
full disk or a read-only folder never leaves half a file behind and never
ends in a traceback:

    write_atomic(path, text)      # a temporary file in the same folder, then os.replace
    write_json(path, value)       # the same, as indented JSON with a final newline
    append_line(path, line)       # one line added to a log (metrics.jsonl), flushed
    keep_aside(path)              # path -> <stem>.<n><ext>, so a replaced file is not lost

Each raises `WriteError` (a `ValueError`) whose message names the file, the
reason (e.g. "No space left on device") and the fix; the file that was there
before stays as it was.
"""

from __future__ import annotations

import json
import os
from typing import Any


class WriteError(ValueError):
    """A file of a run could not be written (full disk, no permission, ...); the previous one is kept."""


def write_failed(path: str, err: OSError, kept: str = "the previous file is kept") -> WriteError:
    """The one-line error for `err` raised while writing `path`."""
    reason = err.strerror or str(err) or type(err).__name__
    return WriteError(
        f"cannot write {path} ({reason}): free space on that disk or make the folder writable, then run the "
        f"same command again; {kept}"
    )


def write_atomic(path: str, text: str) -> None:
    """Writes `text` to `path` whole or not at all: a temporary file beside it, flushed, then renamed.

    Args:
      path: the file to write; its folder must exist.
      text: its whole content.

    Raises:
      WriteError: the write failed; `path` is as it was and no temporary file is left.
    """
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise write_failed(path, err) from None


def write_json(path: str, value: Any, *, indent: int | None = 1, sort_keys: bool = True) -> None:
    """`write_atomic` of `value` as JSON, with a final newline."""
    write_atomic(path, json.dumps(value, indent=indent, sort_keys=sort_keys) + "\n")


def append_line(path: str, line: str) -> None:
    """Appends one line to a log file and flushes it.

    A failed append (a full disk) may leave a partial last line; readers of
    such logs (`read_jsonl`) skip a last line that does not parse.

    Raises:
      WriteError: the append failed; the lines written before are kept.
    """
    try:
        with open(path, "a") as f:
            f.write(line.rstrip("\n") + "\n")
            f.flush()
    except OSError as err:
        raise write_failed(path, err, "the lines written before are kept") from None


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; a last line cut short by a failed write is left out."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path} line {i + 1} is not JSON: the file is damaged; restore it from a copy") from None
    return records


def keep_aside(path: str) -> str:
    """Renames `path` to `<stem>.<n><ext>` with the first free n >= 1 and returns the new name."""
    stem, ext = os.path.splitext(path)
    n = 1
    while os.path.exists(f"{stem}.{n}{ext}"):
        n += 1
    try:
        os.replace(path, f"{stem}.{n}{ext}")
    except OSError as err:
        raise write_failed(f"{stem}.{n}{ext}", err, f"{path} is kept") from None
    return f"{stem}.{n}{ext}"


def check_writable(folder: str, name: str = "workdir", flag: str = "--workdir") -> None:
    """Creates `folder` and checks that a file can be written in it.

    Raises:
      WriteError: it cannot be created or written; the message names the folder and the `flag` to change.
    """
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise WriteError(f"cannot write to {name} {folder} ({err.strerror}): choose a writable {flag}") from None
