"""The Hessian of a loss through `eigen.top_eigenpairs`: restarted Lanczos to a tolerance.

`top_eigenvalues(..., method="restarted")` and
`preconditioned_top_eigenvalue` reach the thick-restart Lanczos solver of
`jaxsam.geometry.eigen` here. It stops at the first Hessian-vector product
after which every wanted pair has ‖Hx − θx‖ ≤ tol·|θ| (checked, where the
tolerance is near float32's accuracy, by explicit products, counted), so it
spends as few products as the spectrum allows instead of a fixed number of
Lanczos steps.

The operator is x ↦ d ⊙ H(d ⊙ x) with d a flat vector (Adam's
preconditioned Hessian) or x ↦ H x. As every measure, the solve runs in one
of two places, decided by `driver.host_loops()`: on the host each product is
`driver.hvp` (its microbatch steps compiled once per shapes) and the Krylov
algebra is eigen's own compiled steps; otherwise the whole solve is one
`lax.while_loop` inside one `jax.jit` whose arguments are the loss (a pytree:
its data are leaves), the point and the start vector, so a second call on
other data of the same shapes compiles nothing.

    top = restarted_top(loss, params, v0, k=3, tol=1e-5, max_matvecs=500)
    top.eigenvalues, top.residual_norms, top.matvecs
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxsam.geometry import driver, eigen
from jaxsam.geometry import loss as loss_lib
from jaxsam.geometry.lanczos import _MAX_HISTORY, ravel, unravel

__all__ = ["Restarted", "restarted_top", "fits"]


class Restarted(NamedTuple):
    """What the solve found (NumPy but for the vectors): see `eigen.Eigenpairs`.

    Attributes:
      eigenvalues: (k,) largest algebraic first.
      eigenvectors: (k, dim) flat unit Ritz vectors, a jax array (of the
        operator: for the preconditioned one, of d ⊙ H ⊙ d).
      residual_norms: (k,) ‖Ax − θx‖ from the solver's checks.
      matvecs: Hessian-vector products used, checks included.
      converged: every ‖Ax − θx‖ ≤ tol·|θ| (eigen's rule, per pair).
      history: (rows, k) the wanted Ritz values after the products in
        `history_matvecs` (NaN before k existed).
      history_matvecs: (rows,) product counts, at most _MAX_HISTORY of them.
    """

    eigenvalues: np.ndarray
    eigenvectors: np.ndarray
    residual_norms: np.ndarray
    matvecs: int
    converged: bool
    history: np.ndarray
    history_matvecs: np.ndarray


def fits(dim: int, k: int) -> bool:
    """Whether a Krylov solve applies: it needs k < krylov_dim ≤ dim − 1 (else `lanczos` to dim steps is exact)."""
    return k + 1 < dim


def _operator(loss, params, d, x, hvp):
    tangent = x if d is None else d * x
    hx = ravel(hvp(loss, params, unravel(tangent, params))).astype(x.dtype)
    return hx if d is None else d * hx


@functools.partial(jax.jit, static_argnames=("k", "tol", "max_matvecs", "verify"))
def _solve_compiled(loss, params, v0, d, key, *, k, tol, max_matvecs, verify):
    matvec = functools.partial(_operator, loss, params, d, hvp=driver.hvp)
    return eigen.top_eigenpairs(matvec, v0, k, tol=tol, max_matvecs=max_matvecs, verify=verify, host=False, key=key)


def _history(history: np.ndarray, matvecs: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows after Lanczos products (explicit checks leave all-NaN rows), at most _MAX_HISTORY evenly spread."""
    history = history[:matvecs]
    rows = np.flatnonzero(~np.all(np.isnan(history), axis=1))
    if len(rows) > _MAX_HISTORY:
        rows = rows[np.unique(np.round(np.linspace(0, len(rows) - 1, _MAX_HISTORY)).astype(int))]
    return history[rows], rows + 1


def restarted_top(loss_fn: Any, params: Any, v0: jax.Array, *, k: int, tol: float, max_matvecs: int,
                  d: jax.Array | None = None, key: jax.Array | None = None) -> Restarted:  # fmt: skip
    """The k largest (algebraic) eigenpairs of H (or of d ⊙ H ⊙ d) at params, to relative residual tol.

    Args:
      loss_fn: a `LossFunction` or any `params -> scalar`.
      params: where the Hessian is taken.
      v0: (dim,) start vector; its dtype is the working one.
      k: number of pairs; `fits(dim, k)` must hold.
      tol: stop once every ‖Ax − θx‖ ≤ tol·|θ| (a Python float ≥ 0).
      max_matvecs: at most this many products (a last explicit check may add k).
      d: optional (dim,) diagonal scaling of the operator.
      key: PRNG key for breakdown continuations (default eigen's).

    Returns:
      A `Restarted` record.

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.concatenate([jnp.array([5.0, 4.0]), jnp.linspace(-1.0, 1.0, 98)])
      >>> top = restarted_top(lambda p: 0.5 * jnp.sum(w * p**2), jnp.zeros(100), jnp.ones(100),
      ...                     k=2, tol=1e-5, max_matvecs=200)
      >>> [round(float(v), 4) for v in top.eigenvalues], top.converged
      ([5.0, 4.0], True)
    """
    loss = loss_lib.as_loss(loss_fn)
    tol = float(tol)
    verify = bool(tol < 1000 * np.finfo(v0.dtype).eps)
    key = jax.random.key(0) if key is None else key
    if driver.host_loops():
        matvec = functools.partial(_operator, loss, params, d, hvp=driver.hvp)
        res = eigen.top_eigenpairs(matvec, v0, k, tol=tol, max_matvecs=int(max_matvecs), verify=verify, host=True,
                                   key=key)  # fmt: skip
    else:
        res = _solve_compiled(loss, params, v0, d, key, k=int(k), tol=tol, max_matvecs=int(max_matvecs),
                              verify=verify)  # fmt: skip
    vectors = res.eigenvectors  # left where it is: (k, dim) may be large
    res = jax.device_get(res._replace(eigenvectors=None))
    matvecs = int(res.matvecs)
    history, history_matvecs = _history(np.asarray(res.history), matvecs)
    return Restarted(
        eigenvalues=np.asarray(res.eigenvalues),
        eigenvectors=vectors,
        residual_norms=np.asarray(res.residual_norms),
        matvecs=matvecs,
        converged=bool(res.converged),
        history=history,
        history_matvecs=history_matvecs,
    )
