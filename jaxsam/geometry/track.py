"""Geometry tracked during training: a few cheap measures after chosen epochs, into metrics.jsonl.

`make_tracker(config.track, model, images, labels)` gives a function of
(params, batch_stats, key) that measures the current network on a fixed
subset of training examples (no augmentation, eval-mode BatchNorm). On GPU
and TPU it is one program compiled once; on the CPU backend it runs the
measures with their loops driven from Python (`driver`), since XLA:CPU runs
convolution gradients inside loops about 10x slower. The measures:

* `lambda_max`: the top Hessian eigenvalue by a few Lanczos steps
  (`hessian.lanczos`; a lower bound that tightens with the steps),
* `worst_case`: L2 worst-case sharpness by a few projected ascent steps
  (`sharpness.worst_case_ascent`; a lower bound of the maximum),
* `average_case`: Gaussian average-case sharpness,
* `first_order`: ρ‖∇L‖, the original study's proxy,

returned as {"track_<measure>": value, "track_loss": L(w)}. The settings
(subset size, steps) are in config.json with the run, so tracked values of
different runs are comparable when their `track` settings are.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

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
    """A function `(params, batch_stats, key) -> {"track_<name>": float}` compiled on first use."""
    measures = parse_measures(track.measures)
    n = min(track.n_examples, len(labels))
    images, labels = np.asarray(images[:n]), np.asarray(labels[:n])

    @jax.jit
    def measure(params, batch_stats, key):
        loss_fn = make_loss_fn(model, {"params": params, "batch_stats": batch_stats}, images, labels,
                               batch_size=track.batch_size, bn="eval")  # fmt: skip
        out = {"loss": loss_fn(params)}
        keys = dict(zip(TRACKABLE, jax.random.split(key, len(TRACKABLE))))
        if "lambda_max" in measures:
            flat, unravel = ravel_pytree(params)

            def matvec(x):
                return ravel_pytree(hessian.hvp(loss_fn, params, unravel(x)))[0]

            iters = min(track.lanczos_iters, flat.shape[0])
            alphas, betas, _ = hessian.lanczos(matvec, flat.shape[0], keys["lambda_max"], iters, flat.dtype)
            out["lambda_max"] = jnp.linalg.eigvalsh(hessian.tridiagonal(alphas, betas))[-1]
        if "worst_case" in measures:
            value, *_ = sharpness.worst_case_ascent(
                loss_fn, params, rho=track.rho, steps=track.ascent_steps, key=keys["worst_case"]
            )
            out["worst_case"] = value
        if "average_case" in measures:
            increases, _ = sharpness.average_case_samples(
                loss_fn, params, track.sigma, jax.random.split(keys["average_case"], track.samples // 2)
            )  # antithetic pairs, as average_case_sharpness
            out["average_case"] = jnp.mean(increases)
        if "first_order" in measures:
            out["first_order"] = track.rho * optax.tree.norm(jax.grad(loss_fn)(params))
        return out

    def measure_on_host(params, batch_stats, key):
        # The same measures through the public functions, whose loops run
        # from Python (driver.host_loops(): the CPU backend). Their compiled
        # pieces are keyed by the model and shapes, so later epochs reuse them.
        loss_fn = make_loss_fn(model, {"params": params, "batch_stats": batch_stats}, images, labels,
                               batch_size=track.batch_size, bn="eval")  # fmt: skip
        out = {"loss": loss_fn.value(params)}
        keys = dict(zip(TRACKABLE, jax.random.split(key, len(TRACKABLE))))
        if "lambda_max" in measures:
            # top_eigenvalues clips the steps to the number of parameters itself.
            top = hessian.top_eigenvalues(loss_fn, params, keys["lambda_max"], iters=track.lanczos_iters)
            out["lambda_max"] = top.eigenvalues[0]
        if "worst_case" in measures:
            out["worst_case"] = sharpness.worst_case_sharpness(
                loss_fn, params, track.rho, steps=track.ascent_steps, key=keys["worst_case"]
            ).value
        if "average_case" in measures:
            out["average_case"] = sharpness.average_case_sharpness(
                loss_fn, params, track.sigma, keys["average_case"], n=track.samples
            ).value
        if "first_order" in measures:
            out["first_order"] = sharpness.first_order_sharpness(loss_fn, params, track.rho).value
        return out

    def tracker(params, batch_stats, key) -> dict[str, float]:
        start = time.time()
        if driver.host_loops():
            values = jax.device_get(measure_on_host(params, batch_stats, key))
        else:
            values = jax.device_get(measure(params, batch_stats, key))
        record = {f"track_{k}": float(v) for k, v in values.items()}
        record["track_seconds"] = time.time() - start
        return record

    return tracker
