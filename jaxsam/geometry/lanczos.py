"""Top Hessian eigenvalues: the Lanczos method with full reorthogonalization, and block power iteration.

* `top_eigenvalues(loss_fn, params, key, k=3)`: the k largest (algebraic)
  eigenvalues of the Hessian and their eigenvectors, by the Lanczos method
  (Lanczos 1950) with full reorthogonalization, or by block power iteration
  (the method of PyHessian, Yao et al. 2020, "PyHessian: Neural Networks
  Through the Lens of the Hessian"). Residuals ‖Hv − λv‖ come from an
  explicit Hessian-vector product of each returned vector.
* `lanczos(matvec, dim, key, iters)`: the Lanczos process on any symmetric
  operator of flat vectors, traceable (or host-driven), for callers with
  their own operator.

Only Hessian-vector products are needed, never the Hessian. The Krylov
algebra runs on the flattened parameter vector (`jax.flatten_util`), in the
parameters' dtype but at least float32. The measures' loops are `driver.Loop`s
(`LANCZOS`, `RESIDUALS`): one compiled loop on accelerators, driven from
Python on the CPU backend, each cached by shapes.

    res = top_eigenvalues(loss_fn, params, jax.random.key(0), k=3)
    res.eigenvalues, res.residuals, res.converged
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

from jaxsam.geometry import driver
from jaxsam.geometry import loss as loss_lib
from jaxsam.geometry.records import EigenResult

MatVec = Callable[[jax.Array], jax.Array]
METHODS = ("lanczos", "restarted", "power")
# The Krylov basis is multiplied against every new vector: keep those products
# in full precision (no TF32/bf16 passes on accelerators), or the basis loses
# orthogonality at the accelerator's low precision.
_HIGHEST = lax.Precision.HIGHEST
# At most this many rows in a Lanczos history (one small eigen-solve each).
_MAX_HISTORY = 50


# --------------------------------------------------------------------------- flat vectors


def flat_spec(tree: Any) -> tuple[int, Any]:
    """(length, dtype) of the flattened pytree, without computing it.

    The dtype is the Krylov vectors' one: the parameters', but at least
    float32 (Lanczos in bfloat16 would be meaningless).
    """
    spec = jax.eval_shape(lambda t: ravel_pytree(t)[0], tree)
    return int(spec.shape[0]), jnp.promote_types(spec.dtype, jnp.float32)


def ravel(tree: Any) -> jax.Array:
    return ravel_pytree(tree)[0]


def unravel(x: jax.Array, like: Any) -> Any:
    """The flat vector x as a pytree like `like` (in like's dtypes); traceable."""
    flat, unflatten = ravel_pytree(like)
    return unflatten(x.astype(flat.dtype))


@jax.jit
def unravel_rows(rows: jax.Array, like: Any) -> Any:
    """Each row of `rows` as a pytree like `like`, stacked on a leading axis."""
    return jax.vmap(lambda x: unravel(x, like))(rows)


@functools.partial(jax.jit, static_argnames=("dim", "dtype"))
def _uniform_vector(key: jax.Array, index: jax.Array, dim: int, dtype: Any) -> jax.Array:
    return jax.random.uniform(jax.random.fold_in(key, index), (dim,), dtype, -1, 1)


def uniform_vectors(key: jax.Array, n: int, dim: int, dtype: Any) -> list[jax.Array]:
    """n vectors uniform in [-1, 1]^dim, vector i from `fold_in(key, i)`, each drawn by its own call.

    Random numbers are drawn outside the measures' programs (see `lanczos`)
    by one module-level jitted function that compiles once per (dim, dtype).
    """
    return [_uniform_vector(key, i, dim, np.dtype(dtype)) for i in range(n)]


def start_vectors(key: jax.Array, n: int, dim: int, dtype: Any, start: Any = None) -> list[jax.Array]:
    """`uniform_vectors(key, n, dim, dtype)`, the first replaced by `start` when it is given.

    `start` is a pytree like the parameters or a flat vector of `dim` entries,
    e.g. an eigenvector of an earlier call (a warm start).
    """
    vectors = uniform_vectors(key, n, dim, dtype)
    if start is not None:
        v = jnp.asarray(ravel(start), dtype)
        if v.shape != (dim,):
            raise ValueError(f"start has {v.size} entries, the parameters {dim}: pass a vector like the parameters")
        if not bool(jnp.isfinite(v).all()) or float(jnp.linalg.norm(v)) == 0:
            raise ValueError("start must be a finite, nonzero vector")
        vectors[0] = v
    return vectors


def check_key(key: Any) -> None:
    if key is None:
        raise ValueError("a PRNG key is required, e.g. jax.random.key(0)")


# --------------------------------------------------------------------------- the Lanczos process


def _orthogonalize(w: jax.Array, basis: jax.Array) -> jax.Array:
    """w minus its projection on the rows of `basis` (zero rows do nothing), done twice.

    One classical Gram–Schmidt pass loses orthogonality in floating point;
    a second pass restores it to working precision ("twice is enough").
    """
    for _ in range(2):
        w = w - jnp.dot(jnp.dot(basis, w, precision=_HIGHEST), basis, precision=_HIGHEST)
    return w


def _start(v0: jax.Array, iters: int) -> tuple:
    v0 = v0 / jnp.linalg.norm(v0)
    zero = jnp.zeros((), v0.dtype)
    basis = jnp.zeros((iters + 1, v0.shape[0]), v0.dtype).at[0].set(v0)
    return basis, jnp.zeros((iters,), v0.dtype), jnp.zeros((iters,), v0.dtype), v0, jnp.zeros_like(v0), zero, zero


def _step(j, carry, v, av, restart_seed):
    """One Lanczos step given av = A v_j: the new α, β and the next basis vector."""
    basis, alphas, betas, _, v_prev, beta_prev, scale = carry
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
    # than lax.cond: both sides are cheap next to the product.)
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


def _matvec_query(j, carry, consts, static):
    return carry[3]  # the current Lanczos vector: the next product is A v_j


def _matvec_update(j, carry, v, av, consts, static):
    return _step(j, carry, v, av, consts[0])


def lanczos(
    matvec: MatVec,
    dim: int,
    key: jax.Array | None,
    iters: int,
    dtype: Any = jnp.float32,
    *,
    v0: jax.Array | None = None,
    restart_seed: jax.Array | None = None,
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
        draws no random numbers.
      host: run the loop in Python (`matvec` on concrete arrays) instead of a
        `lax.fori_loop`; same numbers.

    Returns:
      (alphas (m,), betas (m,), basis (m, dim)): the tridiagonal matrix T
      with diagonal alphas and off-diagonals betas[:-1] satisfies T = Q A Qᵀ
      with Q = basis (orthonormal rows), so the eigenvalues θ_i of T are Ritz
      values of A and y_i = Qᵀ s_i (s_i the unit eigenvectors of T) the Ritz
      vectors. betas[-1] = β_m is the norm of the part of A q_m outside the
      basis; by the Lanczos relation A Qᵀ = Qᵀ T + β_m q_{m+1} e_mᵀ the
      residual of a Ritz pair is ‖A y_i − θ_i y_i‖ = β_m |s_i[m−1]| in exact
      arithmetic. If the Krylov space is exhausted early (A has fewer
      distinct eigenvalues than m, as seen from the start vector) the process
      restarts from a direction orthogonal to the basis and records a zero
      off-diagonal, so T stays exact: the new block's eigenvalues are further
      eigenvalues of A and carry zero weight in the first row of T's eigenvectors.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> a = jnp.diag(jnp.arange(1.0, 6.0))
      >>> alphas, betas, _ = lanczos(lambda x: a @ x, 5, jax.random.key(0), 5)
      >>> round(float(jnp.linalg.eigvalsh(tridiagonal(alphas, betas))[-1]), 4)
      5.0
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
    carry = _start(jnp.asarray(v0, dtype), iters)
    consts = (jnp.asarray(restart_seed, dtype),)
    basis, alphas, betas, *_ = driver.fori_loop(iters, _matvec_query, matvec, _matvec_update, carry, consts,
                                                host=host)  # fmt: skip
    return alphas, betas, basis[:iters]


def tridiagonal(alphas: jax.Array, betas: jax.Array) -> jax.Array:
    """T from `lanczos`'s output (betas[-1], the coupling to the next vector, is not in T)."""
    off = betas[:-1]
    return jnp.diag(alphas) + jnp.diag(off, 1) + jnp.diag(off, -1)


# --------------------------------------------------------------------------- the Lanczos process as a measure's loop
# inputs: {"v0", "restart_seed"} flat vectors, optionally "d": the operator is
# x ↦ d ⊙ H(d ⊙ x) (Adam's preconditioned Hessian), else x ↦ H x.
# static: (iters, keep_basis).


def _operand(inputs: dict, x: jax.Array) -> jax.Array:
    return inputs["d"] * x if "d" in inputs else x


def _lanczos_init(params, inputs, static):
    return _start(inputs["v0"], static[0])


def _lanczos_query(j, carry, params, inputs, static):
    v = carry[3]
    return unravel(_operand(inputs, v), params), v


def _lanczos_update(j, carry, v, hx, params, inputs, static):
    av = _operand(inputs, ravel(hx).astype(v.dtype))
    return _step(j, carry, v, av, inputs["restart_seed"])


def _lanczos_finish(carry, params, inputs, static):
    iters, keep_basis = static
    basis, alphas, betas = carry[:3]
    return (alphas, betas, basis[:iters]) if keep_basis else (alphas, betas)


LANCZOS = driver.Loop("hvp", _lanczos_init, _lanczos_query, _lanczos_update, _lanczos_finish)


def _residuals_init(params, inputs, static):
    return jnp.zeros_like(inputs["vectors"])


def _residuals_query(i, products, params, inputs, static):
    return unravel(_operand(inputs, inputs["vectors"][i]), params), None


def _residuals_update(i, products, _, hx, params, inputs, static):
    return products.at[i].set(_operand(inputs, ravel(hx).astype(products.dtype)))


def _residuals_finish(products, params, inputs, static):
    return jnp.linalg.norm(products - inputs["values"][:, None] * inputs["vectors"], axis=1)


# ‖A y_i − θ_i y_i‖ of each row y_i of inputs["vectors"], from one explicit product each.
RESIDUALS = driver.Loop("hvp", _residuals_init, _residuals_query, _residuals_update, _residuals_finish)


@functools.partial(jax.jit, static_argnums=3)
def _ritz_pairs(alphas: jax.Array, betas: jax.Array, basis: jax.Array, k: int):
    """(top-k Ritz values, their vectors (k, dim)) from a Lanczos run."""
    theta, s = jnp.linalg.eigh(tridiagonal(alphas, betas))
    order = jnp.argsort(theta)[::-1][:k]  # largest algebraic first
    values, s = theta[order], s[:, order]
    return values, jnp.dot(s.T, basis, precision=_HIGHEST)


def lanczos_top(loss_fn, params, starts: Sequence[jax.Array], k: int, iters: int, d: jax.Array | None = None):
    """Top-k Ritz pairs of H (or of d ⊙ H ⊙ d): (values, vectors (k, dim), residuals, (alphas, betas)).

    `starts`: the start vector and the restart seed. The residuals come from
    k more products A y, one per returned vector, not from the Lanczos
    relation: its β_m·|s_m| is exact only in exact arithmetic and underflows
    to 0.0 in float32 once a pair has converged (measured: 0.0 reported where
    ‖Hy − θy‖/θ was 1.5e-6).
    """
    operator = {} if d is None else {"d": d}
    inputs = {"v0": starts[0], "restart_seed": starts[1], **operator}
    alphas, betas, basis = driver.run(LANCZOS, loss_fn, params, inputs, steps=iters, static=(iters, True))
    values, vectors = _ritz_pairs(alphas, betas, basis, k)
    residuals = driver.run(RESIDUALS, loss_fn, params, {"vectors": vectors, "values": values, **operator}, steps=k)
    return values, vectors, residuals, (alphas, betas)


def history_steps(iters: int) -> np.ndarray:
    """At most _MAX_HISTORY Lanczos step counts, evenly spread, ending at iters."""
    return np.unique(np.ceil(np.linspace(1, iters, min(iters, _MAX_HISTORY))).astype(int))


def ritz_history(alphas: np.ndarray, betas: np.ndarray, k: int, steps: np.ndarray) -> np.ndarray:
    """(len(steps), k): the top-k Ritz values after each of `steps` Lanczos steps (NaN if fewer than k).

    Host-side NumPy: the matrices are at most iters × iters.
    """
    alphas, betas = np.asarray(alphas, np.float64), np.asarray(betas, np.float64)[:-1]
    history = np.full((len(steps), k), np.nan)
    for row, j in enumerate(steps):
        t = np.diag(alphas[:j]) + np.diag(betas[: j - 1], 1) + np.diag(betas[: j - 1], -1)
        values = np.linalg.eigvalsh(t)[::-1][:k]
        history[row, : len(values)] = values
    return history


# --------------------------------------------------------------------------- the measure


def top_eigenvalues(
    loss_fn: Any,
    params: Any,
    key: jax.Array,
    *,
    k: int = 1,
    method: str = "lanczos",
    iters: int | None = None,
    tol: float = 1e-4,
    start: Any = None,
) -> EigenResult:
    """The k largest (algebraic) Hessian eigenvalues and unit eigenvectors.

    "Largest" means the top of the spectrum, not the largest magnitude: a
    large negative eigenvalue is not returned ahead of a small positive one.

    Args:
      loss_fn: a `LossFunction` or any `params -> scalar`.
      params: where the Hessian is taken.
      key: PRNG key for the start vector(s).
      k: number of eigenpairs, 1 ≤ k ≤ number of parameters.
      method: "lanczos" (default): `iters` Lanczos steps with full
        reorthogonalization, then Ritz pairs of the tridiagonal matrix; exact
        once iters = number of parameters; a fixed cost. "restarted":
        thick-restart Lanczos (`eigen.top_eigenpairs`) until every pair has
        ‖Hv − λv‖ ≤ tol·|λ|: the fewest Hessian-vector products for a
        tolerance (fewer than scipy's eigsh in bench.py's `lanczos` section);
        with fewer than k + 2 parameters it is "lanczos" to that many steps.
        "power": block power iteration (subspace iteration with Rayleigh–Ritz
        on a k-dimensional block, k Hessian-vector products per iteration),
        stopped when every residual ‖Hv − λv‖ ≤ tol·max|λ|. Power iteration
        finds the largest *magnitude*; if that block contains a negative
        eigenvalue it is rerun on H + s·I with s = the largest magnitude
        found (positive semi-definite, so magnitude order = algebraic
        order), which converges more slowly.
      iters: Lanczos steps (default min(dim, max(50, 2k)); clipped to the
        number of parameters), the restarted solver's limit on products
        (default 500), or the power-iteration limit (default 100, per run).
      tol: "lanczos": `converged` if every residual ‖Hv − λv‖ ≤ tol·max|λ|;
        "restarted": the target, every ‖Hv − λv‖ ≤ tol·|λ| (float32 products
        are accurate to about 2e-6 relative: below that the solve stalls and
        says so); "power": both the stop and `converged`, as "lanczos".
      start: "lanczos" and "restarted": the start vector (a pytree like
        params, or flat) instead of a random one; the top eigenvector of an
        earlier call at nearby parameters makes a few steps accurate (a warm
        start, e.g. tracking λmax during training).

    Returns:
      An `EigenResult`; `eigenvectors` is a pytree like params with a leading
      axis of size k.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> loss = lambda w: 0.5 * jnp.sum(jnp.array([4.0, 1.0, -2.0]) * w**2)
      >>> r = top_eigenvalues(loss, jnp.zeros(3), jax.random.key(0), k=2, iters=3)
      >>> [round(float(v), 4) for v in r.eigenvalues]
      [4.0, 1.0]
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {METHODS}")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1 (got {k!r})")
    if iters is not None and iters < 1:
        raise ValueError(f"iters must be >= 1 (got {iters})")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0 (got {tol})")
    check_key(key)
    dim, dtype = flat_spec(params)
    if k > dim:
        raise ValueError(f"k={k} exceeds the number of parameters ({dim})")
    if method == "power":
        from jaxsam.geometry import power

        if start is not None:
            raise ValueError("start applies to method='lanczos' and 'restarted'")
        return power.top_eigenvalues_power(loss_fn, params, key, k=k, iters=iters, tol=tol)
    if method == "restarted":
        from jaxsam.geometry import restarted  # it builds on this module

        if restarted.fits(dim, k):
            return _restarted_result(loss_fn, params, key, k, iters, tol, dim, dtype, start)
        iters = dim  # too few parameters for a Krylov space to restart: exact Lanczos
    m = min(dim, iters if iters is not None else max(50, 2 * k))
    if k > m:
        raise ValueError(f"k={k} needs at least k Lanczos steps (iters={iters})")
    values, vectors, residuals, (alphas, betas) = lanczos_top(loss_fn, params,
                                                              start_vectors(key, 2, dim, dtype, start), k, m)  # fmt: skip
    values, residuals = np.asarray(values), np.asarray(residuals)
    scale = max(float(np.max(np.abs(values))), float(np.finfo(dtype).tiny))
    return EigenResult(
        eigenvalues=values,
        eigenvectors=unravel_rows(vectors, params),
        residuals=residuals,
        iterations=m,
        converged=bool(np.all(residuals <= tol * scale)),
        history=ritz_history(alphas, betas, k, history_steps(m)),
        history_iterations=history_steps(m),
        method=method,
        tol=float(tol),
        shift=0.0,
        loss_info=loss_lib.info_of(loss_fn),
    )


def _restarted_result(loss_fn, params, key, k, iters, tol, dim, dtype, start=None) -> EigenResult:
    """`top_eigenvalues(method="restarted")` (see there)."""
    from jaxsam.geometry import restarted

    top = restarted.restarted_top(loss_fn, params, start_vectors(key, 1, dim, dtype, start)[0], k=k, tol=tol,
                                  max_matvecs=iters if iters is not None else 500, key=jax.random.fold_in(key, 1))  # fmt: skip
    return EigenResult(
        eigenvalues=top.eigenvalues,
        eigenvectors=unravel_rows(top.eigenvectors, params),
        residuals=top.residual_norms,
        iterations=top.matvecs,
        converged=top.converged,
        history=top.history,
        history_iterations=top.history_matvecs,
        method="restarted",
        tol=float(tol),
        shift=0.0,
        loss_info=loss_lib.info_of(loss_fn),
    )
