"""Hessian measures in one namespace: Hessian-vector products, top eigenvalues, trace, density, Adam's λmax.

Everything here needs only Hessian-vector products, never the Hessian: for a
loss L(w) with n parameters, `hvp` costs about two gradient evaluations
(forward-over-reverse differentiation, Pearlmutter 1994), and every measure is
a few tens to hundreds of them. The measures live in their own modules and
are re-exported here:

* `lanczos`: `top_eigenvalues` (Lanczos with full reorthogonalization; block
  power iteration in `power`), and the Lanczos process itself;
* `trace_density`: `hessian_trace` (Hutchinson) and `spectral_density`
  (stochastic Lanczos quadrature);
* `preconditioned`: `preconditioned_top_eigenvalue` (Adam, Cohen et al. 2022);
* `records`: their result records.

    res = top_eigenvalues(loss_fn, params, jax.random.key(0), k=3)
    hessian_trace(loss_fn, params, key, n=100).trace
"""

from __future__ import annotations

from typing import Any

import jax

from jaxsam.geometry import loss as loss_lib
from jaxsam.geometry.lanczos import METHODS, lanczos, top_eigenvalues, tridiagonal
from jaxsam.geometry.preconditioned import find_adam_state, preconditioned_top_eigenvalue
from jaxsam.geometry.records import DensityResult, EigenResult, PreconditionedEigenResult, TraceResult
from jaxsam.geometry.trace_density import hessian_trace, moments, spectral_density


def hvp(loss_fn: Any, params: Any, v: Any) -> Any:
    """Hessian-vector product H(params)·v, forward-over-reverse; traceable.

    Args:
      loss_fn: a `LossFunction` (its microbatch-summed `hvp`) or any `params -> scalar`.
      params: the point where the Hessian is taken.
      v: a pytree with the structure of params.

    Returns:
      H v, a pytree like params.

    Example:
      >>> import jax.numpy as jnp
      >>> hvp(lambda w: jnp.sum(w**3), jnp.array([1.0, 2.0]), jnp.ones(2))  # diag(6w)·1
      Array([ 6., 12.], dtype=float32)
    """
    if isinstance(loss_fn, loss_lib.LossFunction):
        return loss_fn.hvp(params, v)
    # jvp of the gradient: one forward-mode pass through the backward pass, so
    # the cost is a small multiple of a gradient and no Hessian is formed.
    return jax.jvp(jax.grad(loss_fn), (params,), (v,))[1]


__all__ = [
    "EigenResult",
    "TraceResult",
    "DensityResult",
    "PreconditionedEigenResult",
    "METHODS",
    "hvp",
    "lanczos",
    "tridiagonal",
    "top_eigenvalues",
    "hessian_trace",
    "spectral_density",
    "moments",
    "preconditioned_top_eigenvalue",
    "find_adam_state",
]
