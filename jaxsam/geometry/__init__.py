"""Geometry of the loss landscape: the measured loss, sharpness, Hessian spectrum, landscape slices.

Every measure is a pure function of `(loss_fn, params, ...)` that returns a
record (`.to_dict()` for JSON) with its value and the diagnostics needed to
trust it. `loss_fn` is usually `make_loss_fn(model, variables, images,
labels)`: plain cross-entropy on a fixed subset, eval-mode BatchNorm.

    loss_fn = make_loss_fn(model, variables, images, labels, batch_size=500)
    worst_case_sharpness(loss_fn, params, rho=0.05)          # max over the ball, by gradient ascent
    average_case_sharpness(loss_fn, params, 0.01, key)       # Gaussian expectation ± standard error
    top_eigenvalues(loss_fn, params, key, k=3)               # Lanczos, full reorthogonalization
    hessian_trace(loss_fn, params, key)                      # Hutchinson ± standard error
    spectral_density(loss_fn, params, key)                   # stochastic Lanczos quadrature
    preconditioned_top_eigenvalue(loss_fn, params, adam_state, key)  # Adam's effective sharpness
    interpolate(loss_fn, params_a, params_b)                 # 1-D linear path
    surface_2d(loss_fn, params, random_direction(k1, params), random_direction(k2, params))
"""

from jaxsam.geometry.hessian import (
    hessian_trace,
    hvp,
    lanczos,
    preconditioned_top_eigenvalue,
    spectral_density,
    top_eigenvalues,
)
from jaxsam.geometry.landscape import (
    interpolate,
    make_recalibrated_loss_fn,
    normalize_direction,
    random_direction,
    surface_1d,
    surface_2d,
)
from jaxsam.geometry.loss import LossFunction, make_loss_fn
from jaxsam.geometry.sharpness import average_case_sharpness, first_order_sharpness, worst_case_sharpness

__all__ = [
    "LossFunction",
    "make_loss_fn",
    "worst_case_sharpness",
    "average_case_sharpness",
    "first_order_sharpness",
    "hvp",
    "lanczos",
    "top_eigenvalues",
    "hessian_trace",
    "spectral_density",
    "preconditioned_top_eigenvalue",
    "interpolate",
    "random_direction",
    "normalize_direction",
    "surface_1d",
    "surface_2d",
    "make_recalibrated_loss_fn",
]
