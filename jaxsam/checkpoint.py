"""Orbax checkpoints of a run: save every few epochs, keep the last few, resume the latest.

A thin wrapper over `orbax.checkpoint.CheckpointManager` so the training loop
says what it means (`save`, `latest_step`, `restore`). Orbax writes each
checkpoint into a temporary folder and renames it when complete, so a
half-written checkpoint is never listed as the latest.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class Checkpoints:
    """The `checkpoints/` folder of a workdir.

    Example:
      >>> ckpt = Checkpoints("/tmp/run/checkpoints", keep=3)
      >>> ckpt.save(100, state); ckpt.wait()
      >>> state = ckpt.restore(abstract_state)          # latest
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 3):
        self.directory = os.path.abspath(os.fspath(directory))
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any) -> None:
        """Starts writing `state` as checkpoint `step` (the device->host copy happens now)."""
        self._manager.save(int(step), args=ocp.args.StandardSave(state))

    def restore(self, target: Any, step: Optional[int] = None) -> Any:
        """Checkpoint `step` (default: the latest) restored with the structure, shapes,
        dtypes and shardings of `target` (arrays or `jax.ShapeDtypeStruct`s)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        try:
            return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except (ValueError, KeyError, TypeError) as err:
            # Orbax reports a structure or shape mismatch in many lines; say what it means.
            detail = " ".join(str(err).split())[:200]
            raise ValueError(
                f"checkpoint {step} in {self.directory} does not fit this network and optimizer ({detail}): "
                f"it was written by another model or config; use a new --workdir"
            ) from None

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
