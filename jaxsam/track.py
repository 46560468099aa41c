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

returned as {"track_<measure>": value, "track_loss": L(w)}. Where their loops
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

TRACKABLE = ("lambda_max", "worst_case", "average_case", "first_order")


def parse_measures(names: str) -> tuple[str, ...]:
    """The comma-separated measure names of config.track.measures, checked."""
    chosen = tuple(n.strip() for n in names.split(",") if n.strip())
    unknown = [n for n in chosen if n not in TRACKABLE]
    if unknown or not chosen:
        raise ValueError(f"track.measures has unknown {unknown or names!r}: choose from {', '.join(TRACKABLE)}")
    return chosen


def make_tracker(
    track: ml_collections.ConfigDict, model: Any, images: np.ndarray, labels: np.ndarray
) -> Callable[[Any, Any, jax.Array], dict[str, float]]:
    """A function `(params, batch_stats, key) -> {"track_<name>": float}` (its programs compile on first use)."""
    measures = parse_measures(track.measures)
    n = min(track.n_examples, len(labels))
    images, labels = np.asarray(images[:n]), np.asarray(labels[:n])

    def measure(params, batch_stats, key) -> dict[str, Any]:
        loss_fn = make_loss_fn(model, {"params": params, "batch_stats": batch_stats}, images, labels,
                               preprocess=data.normalize, batch_size=track.batch_size, subset=f"train[:{n}]")  # fmt: skip
        keys = dict(zip(TRACKABLE, jax.random.split(key, len(TRACKABLE))))
        out = {"loss": driver.value(loss_fn, params)}
        if "lambda_max" in measures:
            # top_eigenvalues clips the steps to the number of parameters itself.
            top = hessian.top_eigenvalues(loss_fn, params, keys["lambda_max"], iters=track.lanczos_iters)
            out["lambda_max"] = top.eigenvalues[0]
        if "worst_case" in measures:
            out["worst_case"] = sharpness.worst_case_sharpness(loss_fn, params, track.rho, keys["worst_case"],
                                                               steps=track.ascent_steps).value  # fmt: skip
        if "average_case" in measures:
            out["average_case"] = sharpness.average_case_sharpness(
                loss_fn, params, track.sigma, keys["average_case"], n=track.samples
            ).value
        if "first_order" in measures:
            out["first_order"] = sharpness.first_order_sharpness(loss_fn, params, track.rho).value
        return out

    def tracker(params, batch_stats, key) -> dict[str, float]:
        start = time.time()
        record = {f"track_{k}": float(v) for k, v in jax.device_get(measure(params, batch_stats, key)).items()}
        record["track_seconds"] = time.time() - start
        return record

    return tracker
