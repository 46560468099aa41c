"""Hessian measures: Hessian-vector products, top eigenvalues, trace, spectral density.

Everything here needs only Hessian-vector products, never the Hessian: for a
loss L(w) with n parameters, `hvp` costs about two gradient evaluations
(forward-over-reverse differentiation, Pearlmutter 1994), and every measure is
a few tens to hundreds of them.

* `top_eigenvalues`: the k largest (algebraic) eigenvalues of the Hessian and
  their eigenvectors, by the Lanczos method (Lanczos 1950) with full
  reorthogonalization, or by block power iteration (the method of PyHessian,
  Yao et al. 2020, "PyHessian: Neural Networks Through the Lens of the
  Hessian").
* `hessian_trace`: Hutchinson's estimator (Hutchinson 1989, "A stochastic
  estimator of the trace of the influence matrix for Laplacian smoothing
  splines") tr(H) ≈ mean of zᵀHz over Rademacher vectors z.
* `spectral_density`: the eigenvalue density by stochastic Lanczos quadrature
  (Golub & Meurant 1994/2010, "Matrices, Moments and Quadrature"; applied to
  neural networks by Ghorbani, Krishnan & Xiao 2019, "An Investigation into
  Neural Net Optimization via Hessian Eigenvalue Density"): m Lanczos steps
  from a unit vector v give an m-point Gauss quadrature rule (nodes = Ritz
  values, weights = squared first components of the eigenvectors of the
  tridiagonal matrix) that is exact for vᵀ p(H) v when p has degree ≤ 2m − 1.
* `preconditioned_top_eigenvalue`: λmax(P^{-1/2} H P^{-1/2}) with Adam's
  preconditioner P = diag(sqrt(v̂) + ε), the quantity that equilibrates at
  Adam's stability threshold (2 + 2β₁)/((1 − β₁)η) at the "adaptive edge of
  stability" (Cohen et al. 2022, "Adaptive Gradient Methods at the Edge of
  Stability").

Conventions: a measure takes `(loss_fn, params, ...)` where `loss_fn(params)`
is a pure, jit-able scalar function of a parameter pytree (for example a
`jaxsam.geometry.loss.LossFunction`, whose `.info` is copied into each
result's `loss_info` field). On GPU and TPU the heavy loops run inside one
`jax.jit` per call (`lax.fori_loop`, `lax.while_loop`, `lax.map`), so a call
traces and compiles once; JAX's persistent compilation cache lets repeated
calls on the same model reuse the compiled program. On the CPU backend the
same loops are driven from Python, one compiled Hessian-vector product per
microbatch and one compiled update per step (`driver`: XLA:CPU runs
convolution gradients inside loops about 10x slower). Eigen-solvers work on the flattened
parameter vector (`jax.flatten_util.ravel_pytree`), which keeps the Krylov
algebra simple and exact; the Hutchinson estimator works on pytrees. The
parameters' dtype is kept (float64 parameters give float64 results when
`jax_enable_x64` is on). Results are frozen dataclasses with `.to_dict()`
(JSON); parameter-sized eigenvectors are left out of the JSON.

    res = top_eigenvalues(loss_fn, params, jax.random.key(0), k=3)
    res.eigenvalues, res.residuals, res.converged
    hessian_trace(loss_fn, params, key, n=100).trace
    dens = spectral_density(loss_fn, params, key, order=80, n_probes=4)
    plt.plot(dens.grid, dens.density)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.flatten_util import ravel_pytree

from jaxsam.geometry import driver
from jaxsam.geometry import loss as loss_lib
from jaxsam.geometry import records

__all__ = [
    "EigenResult",
    "TraceResult",
    "DensityResult",
    "PreconditionedEigenResult",
    "hvp",
    "lanczos",
    "top_eigenvalues",
    "hessian_trace",
    "spectral_density",
    "moments",
    "preconditioned_top_eigenvalue",
    "find_adam_state",
]

Params = Any
LossFn = Callable[[Params], jax.Array]
MatVec = Callable[[jax.Array], jax.Array]

METHODS = ("lanczos", "power")
# The Krylov basis is multiplied against every new vector: keep those products
# in full precision (no TF32/bf16 passes on accelerators), or the basis loses
# orthogonality at the accelerator's low precision.
_HIGHEST = lax.Precision.HIGHEST
# At most this many rows in a Lanczos history (one small eigen-solve each).
_MAX_HISTORY = 50


# ---------------------------------------------------------------------------
# Results.


def _without(record: Any, skip: Sequence[str]) -> dict[str, Any]:
    return records.to_json(
        {f.name: getattr(record, f.name) for f in dataclasses.fields(record) if f.name not in skip}
    )


@dataclasses.dataclass(frozen=True)
class EigenResult(records.Record):
    """Top-k Hessian eigenpairs (largest algebraic first) with their diagnostics.

    Attributes:
      eigenvalues: (k,) largest algebraic eigenvalues, in decreasing order.
      eigenvectors: a pytree like params whose leaves have a leading axis of
        size k; `jax.tree.map(lambda x: x[i], eigenvectors)` is the unit-norm
        eigenvector of `eigenvalues[i]`. Left out of `to_dict()`.
      residuals: (k,) ‖Hv − λv‖ of each returned pair, from an explicit
        Hessian-vector product of the returned vector (Lanczos: k products
        after the iteration; power: the last block product). In float32 they
        cannot go below the rounding of the product itself, about
        1e-7·max|λ|. For a pair with residual r, some eigenvalue lies within
        r of λ, and within ≲ r²/gap once the pair is separated from the rest
        of the spectrum by gap.
      iterations: Lanczos steps (plus k products for the residuals), or
        block power iterations (including a shifted rerun, see `top_eigenvalues`).
      converged: every residual ≤ tol·max|λ| (both methods; power iteration
        also stops there).
      history: (checks, k) eigenvalue estimates as the iteration went on
        (NaN where fewer than k estimates existed yet).
      history_iterations: (checks,) the iteration each history row belongs to.
      method: "lanczos" or "power".
      tol: the tolerance used for `converged`.
      shift: power iteration ran on H + shift·I (0 unless a negative eigenvalue
        dominated; the reported eigenvalues are of H).
      loss_info: description of the measured loss (`loss.info_of`).
    """

    eigenvalues: np.ndarray
    eigenvectors: Any
    residuals: np.ndarray
    iterations: int
    converged: bool
    history: np.ndarray
    history_iterations: np.ndarray
    method: str
    tol: float
    shift: float
    loss_info: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return _without(self, ("eigenvectors",))


@dataclasses.dataclass(frozen=True)
class TraceResult(records.Record):
    """Hutchinson estimate of tr(H).

    Attributes:
      trace: mean of the n samples zᵀHz.
      standard_error: sample standard deviation / sqrt(n).
      n: number of Rademacher probes.
      dim: number of parameters (trace / dim is the mean eigenvalue).
      samples: (n,) the individual zᵀHz.
      loss_info: description of the measured loss.
    """

    trace: float
    standard_error: float
    n: int
    dim: int
    samples: np.ndarray
    loss_info: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class DensityResult(records.Record):
    """Hessian eigenvalue density by stochastic Lanczos quadrature.

    Attributes:
      nodes: (n_probes, order) Gauss quadrature nodes (Ritz values) per probe.
      weights: (n_probes, order) their weights; each row sums to 1.
      grid: (points,) where the density is evaluated.
      density: (points,) average over probes of Σ_j w_j N(t; λ_j, sigma²);
        integrates to ≈ 1 over the grid.
      sigma: the Gaussian smoothing width used.
      order: Lanczos steps per probe (clipped to the number of parameters).
      n_probes: number of probes.
      dim: number of parameters.
      loss_info: description of the measured loss.
    """

    nodes: np.ndarray
    weights: np.ndarray
    grid: np.ndarray
    density: np.ndarray
    sigma: float
    order: int
    n_probes: int
    dim: int
    loss_info: dict[str, Any]

    def moment(self, p: int) -> float:
        """Estimate of tr(H^p)/dim: Σ_j w_j λ_j^p averaged over probes.

        Exact for each probe v (it equals vᵀH^p v) when p ≤ 2·order − 1.
        """
        return float(np.mean(np.sum(self.weights * self.nodes**p, axis=1)))


@dataclasses.dataclass(frozen=True)
class PreconditionedEigenResult(records.Record):
    """λmax of Adam's preconditioned Hessian P^{-1/2} H P^{-1/2} and Adam's stability thresholds.

    Attributes:
      eigenvalue: the largest algebraic eigenvalue.
      residual: ‖Mu − λu‖ for the Ritz vector u, M = P^{-1/2} H P^{-1/2}
        (from an explicit product, as in `EigenResult`).
      iterations: Lanczos steps.
      converged: residual ≤ tol·|λ|.
      history: (checks,) the top Ritz value as the iteration went on.
      history_iterations: (checks,) the Lanczos step of each history entry.
      learning_rate: η used for the thresholds (None if not known).
      b1, b2, eps: Adam's hyperparameters used.
      step: the update count used for bias correction.
      floor: the relative gradient-RMS floor used (see `preconditioned_top_eigenvalue`).
      excluded: coordinates left out as unmoved by Adam (sqrt(v̂) ≤ floor·max).
      gd_threshold: 2/η, the stability threshold of gradient descent.
      adam_threshold: (2 + 2β₁)/((1 − β₁)η), the stability threshold of Adam
        with momentum β₁ on a quadratic (Cohen et al. 2022; 38/η for β₁ = 0.9).
      loss_info: description of the measured loss.
    """

    eigenvalue: float
    residual: float
    iterations: int
    converged: bool
    history: np.ndarray
    history_iterations: np.ndarray
    learning_rate: Optional[float]
    b1: float
    b2: float
    eps: float
    step: int
    floor: float
    excluded: int
    gd_threshold: Optional[float]
    adam_threshold: Optional[float]
    loss_info: dict[str, Any]


# ---------------------------------------------------------------------------
# Hessian-vector products and the Lanczos process.


def hvp(loss_fn: LossFn, params: Params, v: Params) -> Params:
    """Hessian-vector product H(params)·v, forward-over-reverse.

    Args:
      loss_fn: `params -> scalar`.
      params: the point where the Hessian is taken.
      v: a pytree with the structure of params.

    Returns:
      H v, a pytree like params.
    """
    # jvp of the gradient: one forward-mode pass through the backward pass, so
    # the cost is a small multiple of a gradient and no Hessian is formed.
    return jax.jvp(jax.grad(loss_fn), (params,), (v,))[1]


def _flat_hvp(loss_fn: LossFn, params: Params) -> tuple[MatVec, jax.Array, Callable]:
    """(matvec on flat vectors, flat params, unravel)."""
    flat, unravel = ravel_pytree(params)

    def matvec(x):
        hx, _ = ravel_pytree(hvp(loss_fn, params, unravel(x.astype(flat.dtype))))
        return hx.astype(x.dtype)

    return matvec, flat, unravel


@jax.jit
def _ravel(tree: Params) -> jax.Array:
    return ravel_pytree(tree)[0]


@jax.jit
def _unravel(x: jax.Array, like: Params) -> Params:
    """The flat vector x as a pytree like `like` (in like's dtypes)."""
    flat, unravel = ravel_pytree(like)
    return unravel(x.astype(flat.dtype))


@jax.jit
def _unravel_rows(rows: jax.Array, like: Params) -> Params:
    """Each row of `rows` as a pytree like `like`, stacked on a leading axis."""
    flat, unravel = ravel_pytree(like)
    return jax.vmap(unravel)(rows.astype(flat.dtype))


def _host_flat_hvp(loss_fn: LossFn, params: Params) -> MatVec:
    """Host-driven matvec on flat vectors (see `driver`): x ↦ H x, each product summed over microbatches."""
    product = driver.hvp(loss_fn)

    def matvec(x):
        return _ravel(product(params, _unravel(x, params))).astype(x.dtype)

    return matvec


def _flat_spec(tree: Params) -> tuple[int, Any]:
    """(length, dtype) of the flattened pytree, without computing it.

    The dtype is the Krylov vectors' one: the parameters', but at least
    float32 (Lanczos in bfloat16 would be meaningless).
    """
    spec = jax.eval_shape(lambda t: ravel_pytree(t)[0], tree)
    return int(spec.shape[0]), jnp.promote_types(spec.dtype, jnp.float32)


def _orthogonalize(w: jax.Array, basis: jax.Array) -> jax.Array:
    """w minus its projection on the rows of `basis` (zero rows do nothing), done twice.

    One classical Gram–Schmidt pass loses orthogonality in floating point;
    a second pass restores it to working precision ("twice is enough").
    """
    for _ in range(2):
        w = w - jnp.dot(jnp.dot(basis, w, precision=_HIGHEST), basis, precision=_HIGHEST)
    return w


def lanczos(
    matvec: MatVec,
    dim: int,
    key: Optional[jax.Array],
    iters: int,
    dtype: Any = jnp.float32,
    *,
    v0: Optional[jax.Array] = None,
    restart_seed: Optional[jax.Array] = None,
    host: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Lanczos tridiagonalization of a symmetric operator with full reorthogonalization.

    Traceable: call it inside `jax.jit` (the loop is a `lax.fori_loop`). With
    `host=True` the loop runs in Python instead (see `driver`): `matvec` then
    takes and returns concrete arrays, and each step's update is one
    compiled call shared by every run of the same size.

    Args:
      matvec: `x -> A x` on (dim,) vectors, A symmetric.
      dim: length of the vectors.
      key: PRNG key for whichever of `v0` and `restart_seed` is not given
        (None if both are).
      iters: number of steps m, 1 ≤ m ≤ dim (Python int).
      dtype: dtype of the vectors.
      v0: start vector (normalized here); default uniform in [-1, 1]^dim.
      restart_seed: (dim,) vector whose cyclic shifts are the restart
        directions after a breakdown; default uniform in [-1, 1]^dim. The
        shifts of a vector with continuously distributed entries span R^dim
        (its circulant matrix is invertible almost surely), so the loop itself
        draws no random numbers. The measures here draw both vectors in a
        separate, cached program and pass them in: random number generation
        would otherwise be about a third of each measure's compile time on CPU.
      host: run the loop in Python (`matvec` on concrete arrays; see
        `driver`) instead of a `lax.fori_loop`; same numbers.

    Returns:
      (alphas (m,), betas (m,), basis (m, dim)): the tridiagonal matrix T
      with diagonal alphas and off-diagonals betas[:-1] satisfies T = Q A Qᵀ
      with Q = basis (orthonormal rows), so the eigenvalues θ_i of T are Ritz
      values of A and y_i = Qᵀ s_i (s_i the unit eigenvectors of T) the Ritz
      vectors. betas[-1] = β_m is the norm of the part of A q_m outside the
      basis; by the Lanczos relation A Qᵀ = Qᵀ T + β_m q_{m+1} e_mᵀ (kept
      exact to rounding by the full reorthogonalization) the residual of a
      Ritz pair is ‖A y_i − θ_i y_i‖ = β_m |s_i[m−1]|. If the Krylov space
      is exhausted early (A has fewer distinct eigenvalues than m, as seen
      from the start vector) the process restarts from a random vector
      orthogonal to the basis and records a zero off-diagonal, so T stays
      exact: the new block's eigenvalues are further eigenvalues of A and
      carry zero weight in the first row of T's eigenvectors.
    """
    if not 1 <= iters <= dim:
        raise ValueError(f"lanczos needs 1 <= iters <= dim (got iters={iters}, dim={dim})")
    missing = (v0 is None) + (restart_seed is None)
    if missing:
        if key is None:
            raise ValueError("lanczos needs a PRNG key unless both v0 and restart_seed are given")
        draws = list(jax.random.uniform(key, (missing, dim), dtype, -1, 1))
        v0 = draws.pop() if v0 is None else v0
        restart_seed = draws.pop() if restart_seed is None else restart_seed
    v0 = jnp.asarray(v0, dtype)
    restart_seed = jnp.asarray(restart_seed, dtype)
    v0 = v0 / jnp.linalg.norm(v0)
    basis = jnp.zeros((iters + 1, dim), dtype).at[0].set(v0)
    zero = jnp.zeros((), dtype)
    carry = (basis, jnp.zeros((iters,), dtype), jnp.zeros((iters,), dtype), v0, jnp.zeros_like(v0), zero, zero)
    basis, alphas, betas, *_ = driver.fori_loop(
        iters, _lanczos_query, matvec, _lanczos_update, carry, (restart_seed,), host=host
    )
    return alphas, betas, basis[:iters]


def _lanczos_query(j, carry, consts, static):
    return carry[3]  # the current Lanczos vector: the next product is A v_j


def _lanczos_update(j, carry, v, av, consts, static):
    """One Lanczos step given av = A v_j: the new α, β and the next basis vector."""
    basis, alphas, betas, _, v_prev, beta_prev, scale = carry
    (restart_seed,) = consts
    eps, tiny = jnp.finfo(v.dtype).eps, jnp.finfo(v.dtype).tiny
    w = av - beta_prev * v_prev
    alpha = jnp.dot(v, w, precision=_HIGHEST)
    w = w - alpha * v
    # Full reorthogonalization against every stored vector (rows past j
    # are still zero): keeps the basis orthonormal, so no spurious copies
    # of converged Ritz values appear.
    w = _orthogonalize(w, basis)
    beta = jnp.linalg.norm(w)
    scale = jnp.maximum(scale, jnp.abs(alpha) + beta_prev)
    # Breakdown: an invariant subspace was found (w is rounding noise).
    # Continue from a new direction orthogonal to the basis and record a
    # zero coupling, so T decouples into exact blocks. (A select rather
    # than lax.cond: both sides are cheap next to matvec, and it compiles
    # faster.)
    breakdown = beta <= 100 * eps * scale
    r = _orthogonalize(jnp.roll(restart_seed, j), basis)
    r = r / jnp.maximum(jnp.linalg.norm(r), tiny)  # r = 0 only after the last step (m = dim)
    v_next = jnp.where(breakdown, r, w / jnp.where(breakdown, 1, beta))
    beta = jnp.where(breakdown, 0, beta)
    # Row `iters` of the basis is scratch (never read back), so the update
    # at j + 1 stays in bounds on the last step.
    basis = lax.dynamic_update_index_in_dim(basis, v_next, j + 1, 0)
    alphas = lax.dynamic_update_index_in_dim(alphas, alpha, j, 0)
    betas = lax.dynamic_update_index_in_dim(betas, beta, j, 0)
    return basis, alphas, betas, v_next, v, beta, scale


@functools.partial(jax.jit, static_argnames=("dim", "dtype"))
def _uniform_vector(key: jax.Array, index: jax.Array, dim: int, dtype: Any) -> jax.Array:
    return jax.random.uniform(jax.random.fold_in(key, index), (dim,), dtype, -1, 1)


def _uniform_vectors(key: jax.Array, n: int, dim: int, dtype: Any) -> list[jax.Array]:
    """n vectors uniform in [-1, 1]^dim, vector i from `fold_in(key, i)`, each drawn by its own call.

    Random numbers are drawn outside the measures' programs (see `lanczos`)
    by one module-level jitted function that compiles once per (dim, dtype)
    and is shared by every call of every measure.
    """
    return [_uniform_vector(key, i, dim, np.dtype(dtype)) for i in range(n)]


def tridiagonal(alphas: jax.Array, betas: jax.Array) -> jax.Array:
    """T from `lanczos`'s output (betas[-1], the coupling to the next vector, is not in T)."""
    off = betas[:-1]
    return jnp.diag(alphas) + jnp.diag(off, 1) + jnp.diag(off, -1)


def _history_steps(iters: int) -> np.ndarray:
    """At most _MAX_HISTORY Lanczos step counts, evenly spread, ending at iters."""
    return np.unique(np.ceil(np.linspace(1, iters, min(iters, _MAX_HISTORY))).astype(int))


def _ritz_history(alphas: np.ndarray, betas: np.ndarray, k: int, steps: np.ndarray) -> np.ndarray:
    """(len(steps), k): the top-k Ritz values after each of `steps` Lanczos steps (NaN if fewer than k).

    Host-side NumPy: the matrices are at most iters × iters, and eigen-solves
    of their leading blocks inside the jitted program would only add compile time.
    """
    alphas, betas = np.asarray(alphas, np.float64), np.asarray(betas, np.float64)[:-1]
    history = np.full((len(steps), k), np.nan)
    for row, j in enumerate(steps):
        t = np.diag(alphas[:j]) + np.diag(betas[: j - 1], 1) + np.diag(betas[: j - 1], -1)
        values = np.linalg.eigvalsh(t)[::-1][:k]
        history[row, : len(values)] = values
    return history


def _block_matvec(matvec: MatVec, vectors: jax.Array) -> jax.Array:
    """matvec of each row; sequential (`lax.map`) so memory is that of one product."""
    return lax.map(matvec, vectors)


def _lanczos_top(matvec: MatVec, starts: Sequence[jax.Array], k: int, iters: int, host: bool = False):
    """Top-k Ritz pairs: (values (k,), vectors (k, dim), residuals (k,), (alphas, betas)).

    `starts`: two (dim,) vectors, the start vector and the restart seed.
    `host`: drive the Lanczos loop from Python (`matvec` on concrete arrays).
    The residuals ‖A y − θ y‖ come from k more products A y, one per returned
    vector, not from the Lanczos relation: the relation's β_m·|s_m| is exact
    only in exact arithmetic and underflows to 0.0 in float32 once a pair has
    converged (measured: 0.0 reported where ‖Hy − θy‖/θ was 1.5e-6).
    """
    dim, dtype = starts[0].shape[0], starts[0].dtype
    alphas, betas, basis = lanczos(matvec, dim, None, iters, dtype, v0=starts[0], restart_seed=starts[1], host=host)
    ritz = driver.compiled(_ritz_pairs, 3) if host else _ritz_pairs
    values, vectors = ritz(alphas, betas, basis, k)
    if host:
        products = jnp.stack([matvec(v) for v in vectors])
        residuals = driver.compiled(_residual_norms)(products, values, vectors)
    else:
        residuals = _residual_norms(_block_matvec(matvec, vectors), values, vectors)
    return values, vectors, residuals, (alphas, betas)


def _residual_norms(products: jax.Array, values: jax.Array, vectors: jax.Array) -> jax.Array:
    """‖A y_i − θ_i y_i‖ for each row y_i of `vectors`, given `products` = rows A y_i."""
    return jnp.linalg.norm(products - values[:, None] * vectors, axis=1)


def _ritz_pairs(alphas: jax.Array, betas: jax.Array, basis: jax.Array, k: int):
    """(top-k Ritz values, their vectors (k, dim)) from a Lanczos run."""
    theta, s = jnp.linalg.eigh(tridiagonal(alphas, betas))
    order = jnp.argsort(theta)[::-1][:k]  # largest algebraic first
    values, s = theta[order], s[:, order]
    return values, jnp.dot(s.T, basis, precision=_HIGHEST)


def _power_top(matvec: MatVec, start: jax.Array, iters: int, tol: jax.Array, shift: jax.Array, host: bool = False):
    """Block power (subspace) iteration with Rayleigh–Ritz on A = H + shift·I from the (dim, k) block `start`.

    `host`: drive the loop from Python (`matvec` on concrete arrays, see `driver`).

    Returns (values of H (k,), vectors (k, dim), residuals (k,), iterations,
    converged, history (iters, k)).
    """
    (dim, k), dtype = start.shape, start.dtype
    nan = jnp.full((k,), jnp.nan, dtype)
    carry = (
        jnp.zeros((), jnp.int32),
        jnp.linalg.qr(start)[0],
        nan,
        jnp.zeros((dim, k), dtype),
        nan,
        jnp.zeros((), bool),
        jnp.full((iters, k), jnp.nan, dtype),
    )
    consts = (jnp.asarray(tol, dtype), jnp.asarray(shift, dtype))
    if host:
        step = driver.compiled(_power_update, 5)
        while int(carry[0]) < iters and not bool(carry[5]):
            q = carry[1]
            block = jnp.stack([matvec(q[:, j]) for j in range(k)], axis=1) + consts[1] * q
            carry = step(carry[0], carry, q, block, consts, ())
    else:
        shifted = lambda x: matvec(x) + consts[1] * x  # noqa: E731

        def cond(carry):
            return (carry[0] < iters) & ~carry[5]

        def body(carry):
            q = carry[1]
            return _power_update(carry[0], carry, q, _block_matvec(shifted, q.T).T, consts, ())

        carry = lax.while_loop(cond, body, carry)
    i, _, theta, y, residuals, done, history = carry
    return theta - consts[1], y.T, residuals, i, done, history


def _power_update(i, carry, q, w, consts, static):
    """One block power step given w = A q (dim, k): Rayleigh–Ritz estimates, residuals, next block."""
    tol, shift = consts
    history = carry[6]
    tiny = jnp.finfo(q.dtype).tiny
    # Rayleigh–Ritz on span(q): the Ritz pairs of the k×k projected matrix
    # are the current estimates; their images give the exact residuals and
    # the next subspace, so one block product per iteration suffices.
    small = jnp.dot(q.T, w, precision=_HIGHEST)
    theta, u = jnp.linalg.eigh((small + small.T) / 2)
    theta, u = theta[::-1], u[:, ::-1]
    y = jnp.dot(q, u, precision=_HIGHEST)
    wy = jnp.dot(w, u, precision=_HIGHEST)
    residuals = jnp.linalg.norm(wy - y * theta, axis=0)
    q_next, _ = jnp.linalg.qr(wy)
    # Stop when every pair's true residual is small, not when the estimates stop
    # changing (PyHessian's rule), which close eigenvalues meet early: measured,
    # a 1% residual on λ3 reported as converged.
    done = jnp.max(residuals) <= tol * jnp.maximum(jnp.max(jnp.abs(theta - shift)), tiny)
    return i + 1, q_next, theta, y, residuals, done, history.at[i].set(theta - shift)


def _check_key(key: Any) -> None:
    if key is None:
        raise ValueError("a PRNG key is required, e.g. jax.random.key(0)")


def top_eigenvalues(
    loss_fn: LossFn,
    params: Params,
    key: jax.Array,
    *,
    k: int = 1,
    method: str = "lanczos",
    iters: Optional[int] = None,
    tol: float = 1e-4,
) -> EigenResult:
    """The k largest (algebraic) Hessian eigenvalues and unit eigenvectors.

    "Largest" means the top of the spectrum, not the largest magnitude: a
    large negative eigenvalue is not returned ahead of a small positive one.

    Args:
      loss_fn: `params -> scalar`.
      params: where the Hessian is taken.
      key: PRNG key for the start vector(s).
      k: number of eigenpairs, 1 ≤ k ≤ number of parameters.
      method: "lanczos" (default): `iters` Lanczos steps with full
        reorthogonalization, then Ritz pairs of the tridiagonal matrix; exact
        once iters = number of parameters. "power": block power iteration
        (subspace iteration with Rayleigh–Ritz on a k-dimensional block,
        k Hessian-vector products per iteration), stopped when every
        residual ‖Hv − λv‖ ≤ tol·max|λ|. Power iteration finds the
        largest *magnitude*; if that block contains a negative eigenvalue it
        is rerun on H + s·I with s = the largest magnitude found (positive
        semi-definite, so magnitude order = algebraic order), which converges
        more slowly.
      iters: Lanczos steps (default min(dim, max(50, 2k)); clipped to the
        number of parameters) or the power-iteration limit (default 100, per
        run).
      tol: `converged` if every residual ‖Hv − λv‖ ≤ tol·max|λ| (power
        iteration stops there).

    Returns:
      An `EigenResult`; `eigenvectors` is a pytree like params with a leading
      axis of size k.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use 'lanczos' or 'power'")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1 (got {k!r})")
    if iters is not None and iters < 1:
        raise ValueError(f"iters must be >= 1 (got {iters})")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0 (got {tol})")
    _check_key(key)
    dim, dtype = _flat_spec(params)
    if k > dim:
        raise ValueError(f"k={k} exceeds the number of parameters ({dim})")
    info = loss_lib.info_of(loss_fn)

    if method == "lanczos":
        m = min(dim, iters if iters is not None else max(50, 2 * k))
        if k > m:
            raise ValueError(f"k={k} needs at least k Lanczos steps (iters={iters})")

        @jax.jit
        def run(params, starts):
            matvec, flat, unravel = _flat_hvp(loss_fn, params)
            values, vectors, residuals, ab = _lanczos_top(matvec, starts, k, m)
            return values, jax.vmap(unravel)(vectors.astype(flat.dtype)), residuals, ab

        starts = _uniform_vectors(key, 2, dim, dtype)
        if driver.host_loops():
            values, vectors, residuals, (alphas, betas) = _lanczos_top(
                _host_flat_hvp(loss_fn, params), starts, k, m, host=True
            )
            vectors = _unravel_rows(vectors, params)
        else:
            values, vectors, residuals, (alphas, betas) = run(params, starts)
        values, residuals = np.asarray(values), np.asarray(residuals)
        scale = max(float(np.max(np.abs(values))), float(np.finfo(dtype).tiny))
        return EigenResult(
            eigenvalues=values,
            eigenvectors=vectors,
            residuals=residuals,
            iterations=m,
            converged=bool(np.all(residuals <= tol * scale)),
            history=_ritz_history(alphas, betas, k, _history_steps(m)),
            history_iterations=_history_steps(m),
            method=method,
            tol=float(tol),
            shift=0.0,
            loss_info=info,
        )

    limit = iters if iters is not None else 100

    @jax.jit
    def run_compiled(params, starts, tol, shift):
        matvec, flat, unravel = _flat_hvp(loss_fn, params)
        values, vectors, *rest = _power_top(matvec, jnp.stack(starts, axis=1), limit, tol, shift)
        return values, jax.vmap(unravel)(vectors.astype(flat.dtype)), *rest

    def run_power(params, starts, tol, shift):
        if not driver.host_loops():
            return run_compiled(params, starts, tol, shift)
        matvec = _host_flat_hvp(loss_fn, params)
        values, vectors, *rest = _power_top(matvec, jnp.stack(starts, axis=1), limit, tol, shift, host=True)
        return values, _unravel_rows(vectors, params), *rest

    # Start blocks of the first run and of a possible shifted rerun. Scalars
    # are passed as arrays so that both runs share one compiled program.
    starts = _uniform_vectors(key, 2 * k, dim, dtype)
    tol_arg = np.asarray(tol, dtype)
    values, vectors, residuals, n, done, history = run_power(params, starts[:k], tol_arg, np.zeros((), dtype))
    n = int(n)
    histories = [np.asarray(history)[:n]]
    total, shift = n, 0.0
    if np.min(np.asarray(values)) < 0:
        shift = float(np.max(np.abs(np.asarray(values))))
        values, vectors, residuals, n, done, history = run_power(params, starts[k:], tol_arg, np.asarray(shift, dtype))
        n = int(n)
        histories.append(np.asarray(history)[:n])
        total += n
    return EigenResult(
        eigenvalues=np.asarray(values),
        eigenvectors=vectors,
        residuals=np.asarray(residuals),
        iterations=total,
        converged=bool(done),
        history=np.concatenate(histories),
        history_iterations=np.arange(1, total + 1),
        method=method,
        tol=float(tol),
        shift=shift,
        loss_info=info,
    )


# ---------------------------------------------------------------------------
# Trace.


def _rademacher_like(key: jax.Array, tree: Params) -> Params:
    """A pytree like `tree` with independent ±1 entries (one draw for all leaves)."""
    flat, unravel = ravel_pytree(tree)
    return unravel(jax.random.rademacher(key, flat.shape, flat.dtype))


def _tree_vdot(a: Params, b: Params) -> jax.Array:
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def hessian_trace(
    loss_fn: LossFn,
    params: Params,
    key: jax.Array,
    *,
    n: int = 100,
    batch_size: Optional[int] = None,
) -> TraceResult:
    """Hutchinson estimate of tr(H) from n Rademacher probes.

    For z with independent ±1 entries E[zᵀHz] = tr(H), with variance
    2 Σ_{i≠j} H_ij² per probe, the smallest among probes with i.i.d.
    zero-mean, unit-variance entries (Hutchinson 1989).

    Args:
      loss_fn: `params -> scalar`.
      params: where the Hessian is taken.
      key: PRNG key; probe i uses `jax.random.split(key, n)[i]`.
      n: number of probes, ≥ 2 (needed for a standard error).
      batch_size: probes evaluated together (vectorized) inside the sequential
        `lax.map`; None (default) does one at a time, the least memory.
        Ignored when the loop runs on the host (`driver.host_loops()`):
        there the probes go one at a time.

    Returns:
      A `TraceResult` with the mean, its standard error and the samples.
    """
    if not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"n must be an integer >= 2 to give a standard error (got {n!r})")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None (got {batch_size})")
    _check_key(key)

    @jax.jit
    def samples_of(params, key):
        def sample(probe_key):
            z = _rademacher_like(probe_key, params)
            return _tree_vdot(z, hvp(loss_fn, params, z))

        return lax.map(sample, jax.random.split(key, n), batch_size=batch_size)

    if driver.host_loops():
        product, draw, dot = driver.hvp(loss_fn), driver.compiled(_rademacher_like), driver.compiled(_tree_vdot)
        samples = []
        for probe_key in jax.random.split(key, n):
            z = draw(probe_key, params)
            samples.append(dot(z, product(params, z)))
        samples = np.asarray(samples)
    else:
        samples = np.asarray(samples_of(params, key))
    return TraceResult(
        trace=float(np.mean(samples)),
        standard_error=float(np.std(samples, ddof=1) / np.sqrt(n)),
        n=int(n),
        dim=_flat_spec(params)[0],
        samples=samples,
        loss_info=loss_lib.info_of(loss_fn),
    )


# ---------------------------------------------------------------------------
# Spectral density.


def spectral_density(
    loss_fn: LossFn,
    params: Params,
    key: jax.Array,
    *,
    order: int = 30,
    n_probes: int = 4,
    sigma: Optional[float] = None,
    grid: Union[int, np.ndarray] = 1000,
    probes: Optional[jax.Array] = None,
) -> DensityResult:
    """Hessian eigenvalue density by stochastic Lanczos quadrature (Ghorbani et al. 2019).

    For each probe v (a Rademacher vector scaled to unit norm), `order`
    Lanczos steps give nodes λ_j and weights w_j with Σ_j w_j f(λ_j) ≈
    vᵀ f(H) v, and E[vᵀ f(H) v] = tr f(H) / dim; the density is the average
    over probes of Σ_j w_j N(t; λ_j, sigma²).

    Args:
      loss_fn: `params -> scalar`.
      params: where the Hessian is taken.
      key: PRNG key for the probes (and Lanczos restart directions).
      order: Lanczos steps per probe (clipped to the number of parameters).
      n_probes: number of probes (ignored if `probes` is given).
      sigma: width of the Gaussian smoothing; default 1% of the spread of the
        nodes (max − min), or 1e-3 if they coincide.
      grid: number of evaluation points spanning [min node − 5σ, max node +
        5σ] (so the density integrates to ≈ 1 over it), or the points.
      probes: optional (n_probes, dim) start vectors (normalized here), for
        example to reuse probes across checkpoints or to test exactness.

    Returns:
      A `DensityResult`; `.moment(p)` gives the SLQ estimate of tr(H^p)/dim.
    """
    if not isinstance(order, (int, np.integer)) or order < 1:
        raise ValueError(f"order must be an integer >= 1 (got {order!r})")
    if probes is None and (not isinstance(n_probes, (int, np.integer)) or n_probes < 1):
        raise ValueError(f"n_probes must be an integer >= 1 (got {n_probes!r})")
    if sigma is not None and not sigma > 0:
        raise ValueError(f"sigma must be > 0 (got {sigma})")
    _check_key(key)
    dim, dtype = _flat_spec(params)
    m = min(order, dim)
    if probes is not None:
        probes = jnp.asarray(probes, dtype)
        if probes.ndim != 2 or probes.shape[1] != dim:
            raise ValueError(f"probes must have shape (n_probes, {dim}) (got {probes.shape})")
        n_probes = probes.shape[0]

    if np.ndim(grid) == 0 and int(grid) < 2:
        raise ValueError(f"grid must be >= 2 points or an array of points (got {grid})")

    @jax.jit
    def quadrature(params, draws, probes):
        matvec, _, _ = _flat_hvp(loss_fn, params)
        if probes is None:  # Rademacher: the signs of uniform draws
            probes = jnp.where(jnp.stack(draws[1:]) < 0, -1, 1).astype(dtype)

        def one(v0):
            alphas, betas, _ = lanczos(matvec, dim, None, m, dtype, v0=v0, restart_seed=draws[0])
            theta, s = jnp.linalg.eigh(tridiagonal(alphas, betas))
            # Gauss quadrature: nodes are the Ritz values, weights the squared
            # first components of T's eigenvectors (‖v‖ = 1, so they sum to 1).
            return theta, s[0] ** 2

        # One probe at a time: each Lanczos run holds an (order, dim) basis.
        return lax.map(one, probes)

    # The restart seed, and the probes' signs unless probes are given.
    draws = _uniform_vectors(key, 1 if probes is not None else n_probes + 1, dim, dtype)
    if driver.host_loops():
        matvec = _host_flat_hvp(loss_fn, params)
        if probes is None:
            probes = jnp.where(jnp.stack(draws[1:]) < 0, -1, 1).astype(dtype)
        rules = []
        for v0 in probes:
            alphas, betas, _ = lanczos(matvec, dim, None, m, dtype, v0=v0, restart_seed=draws[0], host=True)
            theta, s = np.linalg.eigh(np.asarray(tridiagonal(alphas, betas)))
            rules.append((theta, s[0] ** 2))
        nodes, weights = (np.stack(a) for a in zip(*rules))
    else:
        nodes, weights = (np.asarray(a) for a in quadrature(params, draws, probes))
    lo, hi = float(nodes.min()), float(nodes.max())
    if sigma is None:
        sigma = 0.01 * (hi - lo) if hi > lo else 1e-3
    if np.ndim(grid) == 0:
        grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, int(grid))
    grid = np.asarray(grid, dtype=np.float64)
    gauss = np.exp(-0.5 * ((grid[:, None, None] - nodes[None]) / sigma) ** 2) / (sigma * np.sqrt(2 * np.pi))
    density = np.mean(np.sum(gauss * weights[None], axis=2), axis=1)
    return DensityResult(
        nodes=nodes,
        weights=weights,
        grid=grid,
        density=density,
        sigma=float(sigma),
        order=m,
        n_probes=int(n_probes),
        dim=int(dim),
        loss_info=loss_lib.info_of(loss_fn),
    )


def moments(result: DensityResult, p: int) -> float:
    """SLQ estimate of tr(H^p)/dim from a `DensityResult` (same as `result.moment(p)`)."""
    return result.moment(p)


# ---------------------------------------------------------------------------
# Adam's preconditioned sharpness.


def find_adam_state(opt_state: Any) -> tuple[optax.ScaleByAdamState, dict[str, Any]]:
    """The one `optax.ScaleByAdamState` inside an optax state, and hyperparameters injected around it.

    Walks the whole pytree, so chains, named chains, `inject_hyperparams`
    and jaxsam's SAM state all work.

    Args:
      opt_state: any optax optimizer state.

    Returns:
      (adam_state, hyperparams): hyperparams are those of the innermost
      `optax.inject_hyperparams` state containing the Adam state ({} if none).

    Raises:
      ValueError: no Adam state, or more than one.
    """
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(x)]
    if len(found) != 1:
        what = "none" if not found else f"{len(found)} of them"
        raise ValueError(
            "expected exactly one optax.ScaleByAdamState (from optax.adam, adamw or scale_by_adam) "
            f"in the optimizer state, found {what}"
        )
    adam = found[0]
    hyperparams: dict[str, Any] = {}
    # inject_hyperparams wraps its inner state in an Inject(Stateful)HyperparamsState;
    # nested ones are visited outside-in, so the innermost wins.
    names = ("InjectHyperparamsState", "InjectStatefulHyperparamsState")
    injected_types = tuple(getattr(optax, name) for name in names if hasattr(optax, name))
    is_injected = lambda x: isinstance(x, injected_types)  # noqa: E731

    def visit(tree):
        for node in jax.tree.leaves(tree, is_leaf=is_injected):
            inside = is_injected(node) and any(a is adam for a in jax.tree.leaves(node.inner_state, is_leaf=is_adam))
            if inside:
                hyperparams.update(node.hyperparams)
                visit(node.inner_state)

    visit(opt_state)
    return adam, hyperparams


def _hyper(value: Optional[float], injected: dict[str, Any], name: str, default: Optional[float]):
    if value is not None:
        return float(value)
    if name in injected:
        return float(np.asarray(injected[name]))
    return default


def _inverse_sqrt_preconditioner(nu: Params, bias_correction: jax.Array, eps: jax.Array, floor: jax.Array):
    """(P^{-1/2} as a flat vector, number left out): 1 / sqrt(sqrt(v̂) + ε), v̂ = nu / (1 − β₂^t).

    Coordinates with sqrt(v̂) ≤ floor·max sqrt(v̂) get 0: Adam has not moved them.
    """
    root = jnp.sqrt(ravel_pytree(nu)[0].astype(bias_correction.dtype) / bias_correction)
    moved = (root > floor * jnp.max(root)) | (floor == 0)
    return jnp.where(moved, 1 / jnp.sqrt(root + eps), 0), jnp.sum(~moved)


def preconditioned_top_eigenvalue(
    loss_fn: LossFn,
    params: Params,
    adam_state: Any,
    key: jax.Array,
    *,
    learning_rate: Optional[float] = None,
    iters: Optional[int] = None,
    tol: float = 1e-4,
    eps: Optional[float] = None,
    b1: Optional[float] = None,
    b2: Optional[float] = None,
    step: Optional[int] = None,
    floor: float = 1e-4,
) -> PreconditionedEigenResult:
    """λmax of Adam's preconditioned Hessian P^{-1/2} H P^{-1/2} (Cohen et al. 2022).

    P = diag(sqrt(v̂) + ε) with v̂ = nu / (1 − b2^step), the bias-corrected
    second moment of the last update applied (the state after t updates has
    count t). The operator v ↦ P^{-1/2} H (P^{-1/2} v) is symmetric and has
    the eigenvalues of P^{-1} H, the matrix that governs Adam's stability on a
    quadratic; it is solved by Lanczos as in `top_eigenvalues`.

    It is taken in the subspace Adam actually moves: coordinates whose
    gradient RMS sqrt(v̂) is at most `floor` times the largest one are left
    out (their rows and columns of P^{-1/2} H P^{-1/2} are zero) and counted
    in `excluded`. Without this a parameter with no training gradient has
    P ≈ ε and P^{-1} ≈ 1e8, and any curvature it has in the *measured* loss
    dominates λmax although Adam never steps along it: a bias feeding
    BatchNorm has an exactly zero train-mode gradient (its sqrt(v̂) is float32
    rounding, ~1e-7 of the gradients' scale) but changes the eval-mode loss
    (VGG16 after Adam: 1.25e8 with those 13 coordinates, 2.2e3 without).

    Args:
      loss_fn: `params -> scalar`.
      params: where the Hessian is taken.
      adam_state: an optax state containing exactly one `optax.ScaleByAdamState`
        (anywhere inside: chains, named chains, inject_hyperparams, SAM).
      key: PRNG key for the Lanczos start vector.
      learning_rate: η for the thresholds; default: an injected
        "learning_rate" hyperparameter around the Adam state, else None (the
        thresholds are then None).
      iters: Lanczos steps (default min(dim, 50)).
      tol: `converged` if the residual ≤ tol·|λ|.
      eps, b1, b2: Adam's ε, β₁, β₂; default: injected hyperparameters of
        those names, else optax.adam's defaults (1e-8, 0.9, 0.999).
      step: update count for bias correction (default the state's count).
      floor: relative gradient-RMS floor below which a coordinate counts as
        unmoved and is left out; 0 keeps every coordinate (the plain
        definition of Cohen et al.).

    optax's `eps_root` (0 in optax.adam) is not part of P here.

    Returns:
      A `PreconditionedEigenResult` with λmax and the thresholds 2/η and
      (2 + 2β₁)/((1 − β₁)η).
    """
    if iters is not None and iters < 1:
        raise ValueError(f"iters must be >= 1 (got {iters})")
    _check_key(key)
    adam, injected = find_adam_state(adam_state)
    learning_rate = _hyper(learning_rate, injected, "learning_rate", None)
    eps = _hyper(eps, injected, "eps", 1e-8)
    b1 = _hyper(b1, injected, "b1", 0.9)
    b2 = _hyper(b2, injected, "b2", 0.999)
    step = int(np.asarray(adam.count)) if step is None else int(step)
    if step < 1:
        raise ValueError(
            f"the Adam state has count {step}: no update applied yet, so there is no preconditioner"
        )
    if not 0 <= b2 < 1 or not 0 <= b1 < 1:
        raise ValueError(f"b1 and b2 must be in [0, 1) (got b1={b1}, b2={b2})")

    dim, dtype = _flat_spec(params)
    nu_dim, _ = _flat_spec(adam.nu)
    if nu_dim != dim:
        raise ValueError(
            f"the Adam state's second moment has {nu_dim} entries, the parameters {dim}: "
            "not the state of an optimizer of these parameters"
        )
    if not 0 <= floor < 1:
        raise ValueError(f"floor must be in [0, 1) (got {floor}); e.g. floor=1e-4, or 0 for every coordinate")
    m = min(dim, iters if iters is not None else 50)

    @jax.jit
    def run(params, nu, starts, bias_correction, eps, floor):
        # Hyperparameters are arguments, not constants: calls that differ
        # only in them compile to the same program (a persistent compilation
        # cache then serves them).
        matvec, _, _ = _flat_hvp(loss_fn, params)
        d, excluded = _inverse_sqrt_preconditioner(nu, bias_correction, eps, floor)
        return _lanczos_top(lambda x: d * matvec(d * x), starts, 1, m), excluded

    starts = _uniform_vectors(key, 2, dim, dtype)
    bias_correction, eps_arg = np.asarray(1 - b2**step, dtype), np.asarray(eps, dtype)
    floor_arg = np.asarray(floor, dtype)
    if driver.host_loops():
        d, excluded = driver.compiled(_inverse_sqrt_preconditioner)(adam.nu, bias_correction, eps_arg, floor_arg)
        matvec = _host_flat_hvp(loss_fn, params)
        values, _, residuals, (alphas, betas) = _lanczos_top(lambda x: d * matvec(d * x), starts, 1, m, host=True)
    else:
        (values, _, residuals, (alphas, betas)), excluded = run(params, adam.nu, starts, bias_correction, eps_arg,
                                                                floor_arg)  # fmt: skip
    value, residual = float(values[0]), float(residuals[0])
    if learning_rate is None:
        gd_threshold = adam_threshold = None
    else:
        gd_threshold = 2 / learning_rate
        adam_threshold = (2 + 2 * b1) / ((1 - b1) * learning_rate)
    return PreconditionedEigenResult(
        eigenvalue=value,
        residual=residual,
        iterations=m,
        converged=bool(residual <= tol * max(abs(value), float(np.finfo(dtype).tiny))),
        history=_ritz_history(alphas, betas, 1, _history_steps(m))[:, 0],
        history_iterations=_history_steps(m),
        learning_rate=learning_rate,
        b1=b1,
        b2=b2,
        eps=eps,
        step=step,
        floor=float(floor),
        excluded=int(excluded),
        gd_threshold=gd_threshold,
        adam_threshold=adam_threshold,
        loss_info=loss_lib.info_of(loss_fn),
    )
