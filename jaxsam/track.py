"""Geometry tracked during training: a few cheap measures after chosen epochs, into metrics.jsonl.

The application's use of the geometry library during training.
`make_tracker(config.track, model, images, labels)` gives a function of
(params, batch_stats, key) that measures the current network on a fixed
subset of training examples (no augmentation, eval-mode BatchNorm, pixels
normalized with `data.normalize`) with the public measures of
`jaxsam.geometry`, short settings:

* `lambda_max`: the top Hessian eigenvalue by a few Lanczos steps
  (`top_eigenvalues`; a lower bound that tightens with the steps),
* `worst_case`: L2 worst-case sharpness by a few projected ascent steps
  (`worst_case_sharpness`; a lower bound of the maximum),
* `average_case`: Gaussian average-case sharpness (antithetic pairs),
* `first_order`: ρ‖∇L‖, the original study's proxy,
* `preconditioned`: for Adam and AdamW, λmax of the Hessian preconditioned
  by the optimizer state's second moment (`preconditioned_top_eigenvalue`,
  the final measure's subspace rule), a few Lanczos steps, recorded with
  Adam's stability threshold (2 + 2β₁)/((1 − β₁)η_t) at that epoch's learning
  rate (Cohen et al. 2022); skipped for SGD,

returned as {"track_<measure>": value, "track_loss": L(w)}, eigenvalues with
their relative residual ‖Av − λv‖/|λ| as "track_<measure>_residual". Where their loops
run is the executor's choice (`geometry.driver`); every epoch's loss has the
same shapes, so later epochs compile nothing. The settings (subset size,
steps) are in config.json with the run, so tracked values of different runs
are comparable when their `track` settings are.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from jaxsam import data
from jaxsam.geometry import driver, hessian, sharpness
from jaxsam.geometry.loss import make_loss_fn

TRACKABLE = ("lambda_max", "worst_case", "average_case", "first_order", "preconditioned")
ADAPTIVE = ("adam", "adamw")  # the optimizers with a second-moment preconditioner


def parse_measures(names: str) -> tuple[str, ...]:
    """The comma-separated measure names of config.track.measures, checked."""
    chosen = tuple(n.strip() for n in names.split(",") if n.strip())
    unknown = [n for n in chosen if n not in TRACKABLE]
    if unknown or not chosen:
        raise ValueError(f"track.measures has unknown {unknown or names!r}: choose from {', '.join(TRACKABLE)}")
    return chosen


def make_tracker(
    track: ml_collections.ConfigDict,
    model: Any,
    images: np.ndarray,
    labels: np.ndarray,
    optimizer: ml_collections.ConfigDict | None = None,
) -> Callable[[Any, jax.Array, float], dict[str, float]]:
    """A function `(state, key, learning_rate) -> {"track_<name>": float}` (its programs compile on first use).

    Args:
      track: the run's `config.track`.
      model: the linen network.
      images, labels: the training split; the first `track.n_examples` are measured.
      optimizer: the run's `config.optimizer` (for `preconditioned`: its name, b1, b2 and eps).

    Returns:
      `tracker(state, key, learning_rate)`: `state` has `params`, `batch_stats`
      and `opt_state`; `learning_rate` is η at the last step taken.
    """
    measures = parse_measures(track.measures)
    if "preconditioned" in measures and (optimizer is None or optimizer.name not in ADAPTIVE):
        measures = tuple(m for m in measures if m != "preconditioned")  # no preconditioner to measure
    n = min(track.n_examples, len(labels))
    images, labels = np.asarray(images[:n]), np.asarray(labels[:n])

    def measure(state, key, learning_rate) -> dict[str, Any]:
        params = state.params
        loss_fn = make_loss_fn(model, {"params": params, "batch_stats": state.batch_stats}, images, labels,
                               preprocess=data.normalize, batch_size=track.batch_size, subset=f"train[:{n}]")  # fmt: skip
        keys = dict(zip(TRACKABLE, jax.random.split(key, len(TRACKABLE))))
        out = {"loss": driver.value(loss_fn, params)}
        if "lambda_max" in measures:
            # top_eigenvalues clips the steps to the number of parameters itself.
            top = hessian.top_eigenvalues(loss_fn, params, keys["lambda_max"], iters=track.lanczos_iters)
            out["lambda_max"] = top.eigenvalues[0]
            out["lambda_max_residual"] = top.residuals[0] / abs(top.eigenvalues[0])
        if "worst_case" in measures:
            out["worst_case"] = sharpness.worst_case_sharpness(loss_fn, params, track.rho, keys["worst_case"],
                                                               steps=track.ascent_steps).value  # fmt: skip
        if "average_case" in measures:
            out["average_case"] = sharpness.average_case_sharpness(
                loss_fn, params, track.sigma, keys["average_case"], n=track.samples
            ).value
        if "first_order" in measures:
            out["first_order"] = sharpness.first_order_sharpness(loss_fn, params, track.rho).value
        if "preconditioned" in measures:
            pre = hessian.preconditioned_top_eigenvalue(
                loss_fn, params, state.opt_state, keys["preconditioned"], learning_rate=learning_rate,
                iters=track.lanczos_iters, eps=optimizer.eps, b1=optimizer.b1, b2=optimizer.b2,
            )  # fmt: skip
            out["preconditioned"] = pre.eigenvalue
            out["preconditioned_residual"] = pre.residual / abs(pre.eigenvalue)
            out["preconditioned_excluded"] = pre.excluded
            out["adam_threshold"] = pre.adam_threshold
        return out

    def tracker(state, key, learning_rate: float) -> dict[str, float]:
        start = time.time()
        values = jax.device_get(measure(state, key, float(learning_rate)))
        record = {f"track_{k}": float(v) for k, v in values.items()}
        record["track_seconds"] = time.time() - start
        return record

    return tracker
