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
their relative residual ‖Av − λv‖/|λ| as "track_<measure>_residual". Each
eigenvalue starts from the previous epoch's top vector (`Tracker`). Where their loops
run is the executor's choice (`geometry.driver`); every epoch's loss has the
same shapes, so later epochs compile nothing. The settings (subset size,
steps) are in config.json with the run, so tracked values of different runs
are comparable when their `track` settings are.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from jax.flatten_util import ravel_pytree

from jaxsam import data, files
from jaxsam.config import ADAPTIVE_OPTIMIZERS
from jaxsam.geometry import driver, hessian, sharpness
from jaxsam.geometry.loss import make_loss_fn

TRACKABLE = ("lambda_max", "worst_case", "average_case", "first_order", "preconditioned")


def parse_measures(names: str) -> tuple[str, ...]:
    """The comma-separated measure names of config.track.measures, checked."""
    chosen = tuple(n.strip() for n in names.split(",") if n.strip())
    unknown = [n for n in chosen if n not in TRACKABLE]
    if unknown or not chosen:
        raise ValueError(f"track.measures has unknown {unknown or names!r}: choose from {', '.join(TRACKABLE)}")
    return chosen


class Tracker:
    """`tracker(state, key, learning_rate) -> {"track_<name>": float}`, made by `make_tracker`.

    Each eigenvalue's Lanczos run starts from the previous call's top vector
    (a warm start: a few steps are then accurate, as the top eigenvector moves
    little between epochs), from a random vector on the first call;
    "track_warm" says which. `save` / `load` keep those vectors in a file, so
    a run resumed at the epoch they were saved after tracks as an
    uninterrupted one does.
    """

    def __init__(self, measure: Callable):
        self._measure = measure
        self.starts: dict[str, Any] = {}  # measure name -> the last top vector (a flat numpy array)

    def __call__(self, state: Any, key: jax.Array, learning_rate: float) -> dict[str, float]:
        start = time.time()
        warm = bool(self.starts)
        values, vectors = self._measure(state, key, float(learning_rate), self.starts)
        self.starts = {name: np.asarray(ravel_pytree(v)[0]) for name, v in vectors.items()}
        record = {f"track_{k}": float(v) for k, v in jax.device_get(values).items()}
        record["track_warm"] = float(warm)
        record["track_seconds"] = time.time() - start
        return record

    def save(self, path: str, epoch: int) -> None:
        """Writes the start vectors for the epoch after `epoch` to `path` (whole or not at all)."""
        tmp = f"{path}.tmp{os.getpid()}.npz"
        try:
            np.savez(tmp, epoch=np.asarray(epoch), **self.starts)
            os.replace(tmp, path)
        except OSError as err:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise files.write_failed(path, err) from None

    def load(self, path: str, epoch: int) -> bool:
        """Takes the start vectors saved after `epoch` from `path`; False (starts stay cold) if there are none."""
        if not os.path.exists(path):
            return False
        with np.load(path) as saved:
            if int(saved["epoch"]) != epoch:
                return False
            self.starts = {name: saved[name] for name in saved.files if name != "epoch"}
        return True


def make_tracker(
    track: ml_collections.ConfigDict,
    model: Any,
    images: np.ndarray,
    labels: np.ndarray,
    optimizer: ml_collections.ConfigDict | None = None,
) -> Tracker:
    """A `Tracker`: `tracker(state, key, learning_rate) -> {"track_<name>": float}` (programs compile on first use).

    Args:
      track: the run's `config.track`.
      model: the linen network.
      images, labels: the training split; the first `track.n_examples` are measured.
      optimizer: the run's `config.optimizer` (for `preconditioned`: its name, b1, b2 and eps).

    Returns:
      A `Tracker`, called as `tracker(state, key, learning_rate)`: `state`
      has `params`, `batch_stats` and `opt_state`; `learning_rate` is η at
      the last step taken.
    """
    measures = parse_measures(track.measures)
    if "preconditioned" in measures and (optimizer is None or optimizer.name not in ADAPTIVE_OPTIMIZERS):
        measures = tuple(m for m in measures if m != "preconditioned")  # no preconditioner to measure
    n = min(track.n_examples, len(labels))
    images, labels = np.asarray(images[:n]), np.asarray(labels[:n])

    def measure(state, key, learning_rate, starts) -> tuple[dict[str, Any], dict[str, Any]]:
        params = state.params
        loss_fn = make_loss_fn(model, {"params": params, "batch_stats": state.batch_stats}, images, labels,
                               preprocess=data.normalize, batch_size=track.batch_size, subset=f"train[:{n}]")  # fmt: skip
        keys = dict(zip(TRACKABLE, jax.random.split(key, len(TRACKABLE))))
        out, vectors = {"loss": driver.value(loss_fn, params)}, {}
        if "lambda_max" in measures:
            # top_eigenvalues clips the steps to the number of parameters itself.
            top = hessian.top_eigenvalues(loss_fn, params, keys["lambda_max"], iters=track.lanczos_iters,
                                          start=starts.get("lambda_max"))  # fmt: skip
            out["lambda_max"] = top.eigenvalues[0]
            out["lambda_max_residual"] = top.residuals[0] / abs(top.eigenvalues[0])
            vectors["lambda_max"] = jax.tree.map(lambda x: x[0], top.eigenvectors)
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
                start=starts.get("preconditioned"),
            )  # fmt: skip
            out["preconditioned"] = pre.eigenvalue
            out["preconditioned_residual"] = pre.residual / abs(pre.eigenvalue)
            out["preconditioned_excluded"] = pre.excluded
            out["adam_threshold"] = pre.adam_threshold
            vectors["preconditioned"] = pre.eigenvector
        return out, vectors

    return Tracker(measure)
