"""Training metrics: the train step's sums added up on the device, read once per window.

The train step returns device-summed `loss`, `correct` and `count`, the mean
per-device gradient norm `grad_norm`, `nonfinite` (1 for a step whose loss,
gradient or update was NaN/Inf) and `first_nonfinite` (that step's number).
`StepSums` adds them up without reading them back, so the host syncs once
per logging window and once per epoch rather than once per step:

    window = StepSums()
    for batch in batches:
        state, sums = train_step(state, *batch)
        window.add(sums)
    window.summary()   # {"loss", "accuracy", "grad_norm", "steps", "skipped_steps", "first_nonfinite"}

(flax.nnx.metrics and clu.metrics average per-example values; these sums are
already reduced over devices and need a minimum for the first non-finite
step and a mean gradient norm over the steps that were kept, so they are
added here.)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


class StepSums:
    """Running sums of train-step outputs (see module docstring)."""

    def __init__(self) -> None:
        self._total: dict[str, Any] | None = None
        self.steps = 0

    def add(self, sums: dict[str, Any]) -> None:
        """Adds one step's sums (device arrays; nothing is read back)."""
        self.steps += 1
        if self._total is None:
            self._total = dict(sums)
            return
        first = jnp.minimum(self._total["first_nonfinite"], sums["first_nonfinite"])
        self._total = jax.tree.map(jnp.add, self._total, sums)
        self._total["first_nonfinite"] = first

    def __bool__(self) -> bool:
        return self.steps > 0

    def summary(self) -> dict[str, Any]:
        """The window's means (one device-to-host read).

        Returns:
          loss and accuracy per example of the steps kept, grad_norm per step
          kept, steps (all steps added), skipped_steps (non-finite ones) and
          first_nonfinite (the first such step's number; meaningless when
          skipped_steps is 0).
        """
        if self._total is None:
            return {"loss": float("nan"), "accuracy": float("nan"), "grad_norm": float("nan"), "steps": 0,
                    "skipped_steps": 0, "first_nonfinite": 0}  # fmt: skip
        total = jax.device_get(self._total)
        count = max(float(total["count"]), 1.0)
        skipped = int(total["nonfinite"])
        return {
            "loss": float(total["loss"]) / count,
            "accuracy": float(total["correct"]) / count,
            "grad_norm": float(total["grad_norm"]) / max(self.steps - skipped, 1),
            "steps": self.steps,
            "skipped_steps": skipped,
            "first_nonfinite": int(total["first_nonfinite"]),
        }
