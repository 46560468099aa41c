"""Orbax checkpoints of a run: save every few epochs, keep the last few, resume the latest good one.

A thin wrapper over `orbax.checkpoint.CheckpointManager` so the training loop
says what it means (`save`, `latest_step`, `restore`, `restore_latest_good`).
Orbax writes each checkpoint into a temporary folder (`<step>.orbax-checkpoint-tmp`)
and renames it when complete, so a process killed mid-save leaves a folder that
is never listed as a step (and is replaced by the next save of that step). A
committed checkpoint that later fails to read (a damaged disk, a truncated
copy) is reported and moved aside to `checkpoints.corrupt/`, and the run
resumes from the newest one that reads. A save that fails to write (a full
disk, a read-only folder) raises `CheckpointWriteError`, one line naming the
reason and the checkpoint kept; orbax's own log of the failure is left out.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
from typing import Any, Callable, Optional

import jax
import orbax.checkpoint as ocp

from jaxsam.files import WriteError


class CorruptCheckpoint(ValueError):
    """A committed checkpoint whose files cannot be read although its shapes fit the target."""


class CheckpointWriteError(WriteError):
    """A checkpoint could not be written (full disk, no permission); the checkpoints before it are kept."""


# Markers of a write that failed for a reason outside the program: OSError's, and the status
# codes tensorstore (orbax's array writer) puts in the ValueError it raises.
_IO_FAILURE = re.compile(r"RESOURCE_EXHAUSTED|PERMISSION_DENIED|os_error_code|No space|Read-only|Disk quota")


def _io_reason(err: BaseException) -> Optional[str]:
    """Why a write failed ("No space left on device"), or None when `err` is not an I/O failure."""
    if isinstance(err, OSError):
        return err.strerror or str(err)
    text = " ".join(str(err).split())
    if not isinstance(err, (ValueError, RuntimeError)) or not _IO_FAILURE.search(text):
        return None
    code = re.search(r"os_error_code='?(\d+)", text)
    return os.strerror(int(code.group(1))) if code else text[:200]


class _DropOrbaxSaveErrors(logging.Filter):
    """Drops orbax's tracebacks of a failed background save: `Checkpoints` raises that error itself, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and "orbax" in record.pathname and record.exc_info)


_FILTER = _DropOrbaxSaveErrors()


class _AbandonedReads:
    """Drops the "Event loop is closed" errors of the reads orbax abandons when a checkpoint fails to read.

    orbax-checkpoint (0.12) restores on an event loop of its own and closes it as
    soon as the first array read fails; the other reads of that damaged
    checkpoint are still running in tensorstore's threads, and each one's
    completion then calls `call_soon_threadsafe` on the closed loop, which
    Python reports as an unraisable `RuntimeError`. Those reads belong to a
    checkpoint already reported as unreadable, so while a `Checkpoints` that
    saw one is open, exactly these errors are dropped; every other
    unraisable exception reaches the previous hook.
    """

    def __init__(self):
        self.previous = sys.unraisablehook

    def __call__(self, unraisable) -> None:
        err = unraisable.exc_value
        if not (isinstance(err, RuntimeError) and str(err) == "Event loop is closed"):
            self.previous(unraisable)

    def remove(self) -> None:
        if sys.unraisablehook is self:
            sys.unraisablehook = self.previous


def _warn(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr)


class Checkpoints:
    """The `checkpoints/` folder of a workdir.

    Example:
      >>> ckpt = Checkpoints("/tmp/run/checkpoints", keep=3)
      >>> ckpt.save(100, state); ckpt.wait()
      >>> state = ckpt.restore(abstract_state)          # latest
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 3):
        self.directory = os.path.abspath(os.fspath(directory))
        self._pending: Optional[int] = None  # the step of a save that may still be writing
        self._abandoned: Optional[_AbandonedReads] = None  # set once a restore failed mid-read
        if _FILTER not in logging.getLogger("absl").filters:
            logging.getLogger("absl").addFilter(_FILTER)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any) -> None:
        """Starts writing `state` as checkpoint `step` (the device->host copy happens now).

        Raises:
          CheckpointWriteError: this save, or the previous one still being
            written, failed to write; the committed checkpoints are kept.
        """
        self.wait()  # a failure of the previous save is reported as that step's
        try:
            self._manager.save(int(step), args=ocp.args.StandardSave(state))
        except Exception as err:  # noqa: BLE001 (only I/O failures are translated; the rest re-raised)
            raise self._write_failed(int(step), err) from None
        self._pending = int(step)

    def restore(self, target: Any, step: Optional[int] = None) -> Any:
        """Checkpoint `step` (default: the latest) restored with the structure, shapes,
        dtypes and shardings of `target` (arrays or `jax.ShapeDtypeStruct`s)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        try:
            return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except (ValueError, KeyError, TypeError, OSError) as err:
            if self._abandoned is None:
                self._abandoned = _AbandonedReads()
                sys.unraisablehook = self._abandoned
            # Orbax reports a mismatch or a damaged file in many lines; say which it is.
            detail = " ".join(str(err).split())[:200]
            if self._shapes_differ(step, abstract):
                raise ValueError(
                    f"checkpoint {step} in {self.directory} does not fit this network and optimizer ({detail}): "
                    f"it was written by another model or config; use a new --workdir"
                ) from None
            raise CorruptCheckpoint(f"checkpoint {step} in {self.directory} is unreadable ({detail})") from None

    def _shapes_differ(self, step: int, abstract: Any) -> bool:
        """Whether checkpoint `step`'s saved array shapes differ from `abstract`'s (False if its metadata is unreadable)."""
        try:
            saved = self._manager.item_metadata(step).tree
        except Exception:  # noqa: BLE001 (any failure to read the metadata means damage, not a mismatch)
            return False
        shapes = lambda tree: sorted(tuple(leaf.shape) for leaf in jax.tree.leaves(tree))  # noqa: E731
        return shapes(saved) != shapes(abstract)

    def restore_latest_good(self, target: Any, warn: Callable[[str], None] = _warn) -> Optional[Any]:
        """The newest checkpoint that restores into `target`'s structure, or None if there is none.

        Newer checkpoints that are unreadable are reported through `warn` and
        moved to `checkpoints.corrupt/` beside this folder (kept, not deleted),
        so the run resumes from the previous good one and later saves of those
        steps do not collide. A checkpoint of another network raises at once;
        if every checkpoint is unreadable, nothing is moved and a ValueError
        names the fix.
        """
        unreadable = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                state = self.restore(target, step)
            except CorruptCheckpoint as err:
                unreadable.append((step, err))
                continue
            for bad_step, err in unreadable:
                moved = self._move_aside(bad_step)
                warn(f"{err}: moved to {moved}; resuming from checkpoint {step}")
            return state
        if unreadable:
            raise ValueError(
                f"no checkpoint in {self.directory} can be read (the latest: {unreadable[0][1]}): "
                f"move the folder aside to start the run over, or use a new --workdir"
            )
        return None

    def _move_aside(self, step: int) -> str:
        """Moves checkpoint `step` to checkpoints.corrupt/<step>[.n] and forgets it."""
        corrupt = os.path.join(os.path.dirname(self.directory), os.path.basename(self.directory) + ".corrupt")
        os.makedirs(corrupt, exist_ok=True)
        destination, n = os.path.join(corrupt, str(step)), 1
        while os.path.exists(destination):
            destination, n = os.path.join(corrupt, f"{step}.{n}"), n + 1
        shutil.move(os.path.join(self.directory, str(step)), destination)
        self._manager.reload()
        return destination

    def wait(self) -> None:
        """Waits for a save still being written; raises `CheckpointWriteError` if it failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as err:  # noqa: BLE001
            raise self._write_failed(self._pending, err) from None
        finally:
            self._pending = None

    def _write_failed(self, step: Optional[int], err: Exception) -> Exception:
        """The one-line error for a failed save of `step` (or `err` itself when it is not an I/O failure)."""
        reason = _io_reason(err)
        if reason is None:
            return err
        self._manager.reload()
        kept = [s for s in self.all_steps() if s != step]
        saved = f"the last good checkpoint (step {max(kept)}) is kept" if kept else "no earlier checkpoint exists"
        return CheckpointWriteError(
            f"cannot write checkpoint {step} to {self.directory} ({reason}): free space on that disk or make it "
            f"writable, then run the same command again to resume; {saved}"
        )

    def close(self) -> None:
        self._manager.close()
        if self._abandoned is not None:
            self._abandoned.remove()
