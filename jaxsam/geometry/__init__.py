"""Geometry of the loss landscape, for any JAX model: sharpness, Hessian spectrum, landscape slices.

The library layer of jaxsam: it depends on jax, optax and numpy only (flax
only inside the model adapters), never on the training application.

A measure is an algorithm over one loss oracle (`LossFunction`: value,
value-and-gradient, Hessian-vector product, summed over fixed microbatches,
a pytree whose leaves are the data), run by one executor (`driver`: one
compiled loop on accelerators, driven from Python on CPU, compiled once per
shapes). Every measure is a function of `(loss_fn, params, ...)` that
returns a record (`.to_dict()` for JSON) with its value and the diagnostics
needed to trust it.

    loss_fn = make_loss_fn(model, variables, images, labels, batch_size=500)    # linen
    loss_fn = make_loss_fn(nnx_model, None, x, y, loss=squared_error)            # NNX
    loss_fn = make_loss_fn(fn, batch=(x, y))                                      # fn(params, batch)
    worst_case_sharpness(loss_fn, params, 0.05, key)          # max over the ball, by gradient ascent
    average_case_sharpness(loss_fn, params, 0.01, key)        # Gaussian expectation ± standard error
    top_eigenvalues(loss_fn, params, key, k=3)                # Lanczos, full reorthogonalization
    hessian_trace(loss_fn, params, key)                       # Hutchinson
    spectral_density(loss_fn, params, key)                    # stochastic Lanczos quadrature
    preconditioned_top_eigenvalue(loss_fn, params, adam_state, key)  # Adam's effective sharpness
    interpolate(loss_fn, params_a, params_b)                  # 1-D linear path
    surface_2d(loss_fn, params, random_direction(k1, params), random_direction(k2, params))
"""

from jaxsam.geometry.hessian import hessian_trace, hvp, preconditioned_top_eigenvalue, spectral_density, top_eigenvalues
from jaxsam.geometry.landscape import interpolate, normalize_direction, random_direction, surface_1d, surface_2d
from jaxsam.geometry.loss import LossFunction, from_function, make_loss_fn
from jaxsam.geometry.recalibration import make_batch_stats_fn, make_recalibrated_loss_fn
from jaxsam.geometry.sharpness import average_case_sharpness, first_order_sharpness, worst_case_sharpness

__all__ = [
    "LossFunction",
    "make_loss_fn",
    "from_function",
    "worst_case_sharpness",
    "average_case_sharpness",
    "first_order_sharpness",
    "hvp",
    "top_eigenvalues",
    "hessian_trace",
    "spectral_density",
    "preconditioned_top_eigenvalue",
    "interpolate",
    "random_direction",
    "normalize_direction",
    "surface_1d",
    "surface_2d",
    "make_batch_stats_fn",
    "make_recalibrated_loss_fn",
]
