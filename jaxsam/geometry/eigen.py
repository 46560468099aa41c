"""Top-k eigenpairs of a symmetric operator known only through matvecs: thick-restart band Lanczos.

For a network's Hessian one product H·v costs two to three gradients, so the
number of products is the whole cost. `top_eigenpairs` spends them on one
growing Krylov space and stops at the first product after which every wanted
pair has a true relative residual ‖Hx − θx‖ ≤ tol·|θ|:

* Band Lanczos (Ruhe 1979, Math. Comp. 33, "Implementation aspects of band
  Lanczos algorithms ...") with full reorthogonalization (classical
  Gram–Schmidt twice, Giraud et al. 2005): the Krylov space of `block_size`
  start vectors, one product at a time. block_size=1 is plain Lanczos
  (Lanczos 1950): from one start vector a Krylov space holds one direction of
  each eigenspace, so it (like ARPACK) returns one copy of a repeated
  eigenvalue; b start vectors find up to b copies.
* Rayleigh–Ritz on P = sym(V Wᵀ), V the orthonormal basis and W = H V, read
  off the Gram–Schmidt coefficients: a restart is just a change of basis.
* Thick restart (Wu & Simon 2000, SIAM J. Matrix Anal. Appl. 22) at
  `krylov_dim` vectors: keep the `keep` best Ritz vectors with their products
  (Yᵀ V, Yᵀ W: no new product) and go on from the pending Lanczos vectors;
  equivalent to ARPACK's implicit restart with exact shifts (Lehoucq &
  Sorensen 1996, SIAM J. Matrix Anal. Appl. 17).
* Honest residuals: with W kept (`store_products`), H x = Wᵀy for a Ritz
  vector x = Vᵀy by linearity, so the residuals ‖Wᵀy − θVᵀy‖ cost no product.
  They differ from a fresh ‖Hx − θx‖ by the products' own error: 3e-8
  relative for float32 matrices, 1.7e-7 for a float32 ResNet18 Hessian,
  whose products are linear only to about 2e-6 (the float32 softmax at
  confident examples); where that matters (`verify`) k explicit products,
  counted, confirm a pass. Without W (half the memory) the Lanczos estimate
  (β·|s| for block_size 1, 0.0 in float32 once converged) only schedules
  those checks. An unconverged end (max_matvecs, or `patience` products
  without progress: the operator's accuracy reached) reports explicit ones.

Measured, products for top-3 to relative residual 1e-6 against
scipy.sparse.linalg.eigsh (ARPACK; same k, which, tol and start vector):
the 200 x 200 spectra of tests/test_eigen.py 11, 23, 30, 17, 86 vs 21, 37,
38, 21, 120; the trained :cpu ResNet18 on 512 images (`python
scripts/bench.py --sections lanczos`) 17 vs 21 with float64 products, 19 vs
21 to 1e-5 with float32 ones (1e-6 is below their accuracy: this solver
stalls at 2.3e-6 and says so, eigsh claims 1e-6 at a true 1.8e-6). Plain
Lanczos (no restart) needs the fewest; krylov_dim=40 costs 1-3% more on
spectra needing 200 products, 12 up to 30%; block_size=2 20-60% more.

Memory for n parameters, m = krylov_dim, b = block_size, itemsize s:
(m + b)·n·s for V, m·n·s for W (store_products), k·n·s for the Ritz vectors
and keep·n·s transient at a restart: full-width ResNet18 (11.2M float32
parameters), m = 40: 1.8 GB for V, 1.8 GB for W.

    d = jnp.concatenate([jnp.array([5.0, 4.0, 3.0]), jnp.linspace(-1.0, 1.0, 997)])
    res = top_eigenpairs(lambda x: d * x, jnp.ones(1000), 3)   # H = diag(d)
    res.eigenvalues, res.converged       # [5., 4., 3.] to float32 rounding, True
    res.residuals, res.matvecs           # each ≤ 1e-6; 18 (15 + 3 to verify)
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

__all__ = ["Eigenpairs", "top_eigenpairs", "flat_operator", "WHICH"]

MatVec = Callable[[jax.Array], jax.Array]
# Largest algebraic, smallest algebraic, largest magnitude (ARPACK's names).
WHICH = ("LA", "SA", "LM")
# Products with the basis in full precision: TF32/bf16 passes of an
# accelerator's default precision would cost the basis its orthogonality.
_HIGHEST = lax.Precision.HIGHEST


class Eigenpairs(NamedTuple):
    """What `top_eigenpairs` found (jax arrays; a pytree, so it leaves `jax.jit`).

    Attributes:
      eigenvalues: (k,) Ritz values, best first in the order of `which`.
      eigenvectors: (k, n) unit Ritz vectors, row i for eigenvalues[i].
      residuals: (k,) true relative residuals ‖Hx − θx‖/|θ|.
      residual_norms: (k,) ‖Hx − θx‖. Some eigenvalue of H lies within it of θ
        (Kahan), and within residual_norm²/gap once θ is gap from the rest of
        the spectrum (Kato–Temple; both in Parlett 1998, "The Symmetric
        Eigenvalue Problem").
      converged: every residual_norm ≤ tol·|θ|, or, for an eigenvalue that is
        0 to working precision, |θ| and residual_norm ≤ m·ε·‖H‖ (m the
        Krylov dimension, ε the dtype's, ‖H‖ the largest |Ritz value|).
      matvecs: products used, explicit checks included.
      restarts: thick restarts done.
      stalled: stopped unconverged because `patience` products did not halve
        the largest relative residual: the residuals reached the accuracy of
        the operator itself (a float32 network Hessian: about 2e-6).
      history: (max_matvecs, k) the wanted Ritz values after each product
        (row i after product i + 1; NaN before k exist, for the products of
        explicit checks and past the end).
    """

    eigenvalues: jax.Array
    eigenvectors: jax.Array
    residuals: jax.Array
    residual_norms: jax.Array
    converged: jax.Array
    matvecs: jax.Array
    restarts: jax.Array
    stalled: jax.Array
    history: jax.Array


class _Config(NamedTuple):
    """Static settings: each distinct one compiles its own step functions."""

    k: int
    keep: int
    block: int
    store: bool


class _State(NamedTuple):
    basis: jax.Array  # (m + b, n): rows < count have products, the next b are pending, the rest zero
    products: jax.Array  # (m, n) H·basis rows (store_products) or (0, n)
    coeffs: jax.Array  # (m + b, m): column j = basis · H basis[j]; the upper triangle is P
    count: jax.Array  # rows with products
    matvecs: jax.Array
    restarts: jax.Array
    draws: jax.Array  # random replacement vectors drawn so far (breakdowns)
    theta: jax.Array  # (keep,) best Ritz values of the current basis
    coords: jax.Array  # (m, keep) their eigenvectors of P
    vectors: jax.Array  # (k, n) Ritz vectors whose residuals are `norms`
    norms: jax.Array  # (k,) true residual norms of `vectors`
    scale: jax.Array  # largest |Ritz value|: the ‖H‖ of the rounding floor
    check: jax.Array  # the screen (estimate, or Wᵀy residual with verify) asks for an explicit check
    screen: jax.Array  # factor on tol for that screen; tightened after a failed check
    checked: jax.Array  # `norms` are from explicit products of the current `vectors`
    verify: jax.Array  # a passing Wᵀy residual is confirmed by an explicit check
    done: jax.Array
    which: jax.Array  # index into WHICH: an argument, so each `which` shares the compiled steps
    best: jax.Array  # the largest relative residual when it last halved
    since: jax.Array  # products since then
    patience: jax.Array  # products allowed without halving before the solve counts as stalled
    stalled: jax.Array


def _dot(a, b):
    return jnp.dot(a, b, precision=_HIGHEST)


def _orthogonalize(w, basis):
    """(w minus its projection on basis rows, the coefficients): Gram–Schmidt twice (zero rows do nothing)."""
    c1 = _dot(basis, w)
    w = w - _dot(c1, basis)
    c2 = _dot(basis, w)
    return w - _dot(c2, basis), c1 + c2


def _combine(y, basis):
    """yᵀ basis[:m] for y (m, r), written against the whole (m + b, n) buffer (zero-padded y): no slice copy."""
    return _dot(jnp.pad(y, ((0, basis.shape[0] - y.shape[0]), (0, 0))).T, basis)


def _fresh(key, index, basis):
    """A random unit vector orthogonal to the basis rows: the continuation after a breakdown."""
    u = jax.random.uniform(jax.random.fold_in(key, index), basis.shape[1:], basis.dtype, -1, 1)
    u, _ = _orthogonalize(u, basis)
    return u / jnp.linalg.norm(u)


def _score(theta, which):
    """Larger is wanted first; `which` indexes WHICH."""
    return jnp.select([which == 0, which == 1], [theta, -theta], jnp.abs(theta))


def _rayleigh_ritz(coeffs, count, which, cfg):
    """(theta (keep,), coords (m, keep), largest |θ|) of P = V Wᵀ on the rows with products."""
    m = coeffs.shape[1]
    active = jnp.arange(m) < count
    upper = jnp.triu(coeffs[:m])
    p = upper + jnp.triu(upper, 1).T
    p = jnp.where(active[:, None] & active[None, :], p, 0)
    # Rows without products get the diagonal value -(2‖P‖∞ + 1), below every
    # eigenvalue of the active block (‖P‖∞ ≥ its spectral radius), so the
    # blocks stay decoupled and those eigenvectors are found by their support.
    sentinel = -(2 * jnp.max(jnp.sum(jnp.abs(p), axis=1)) + 1)
    p = p + jnp.diag(jnp.where(active, 0, sentinel))
    theta, s = jnp.linalg.eigh(p)
    real = jnp.sum(jnp.where(active[:, None], s, 0) ** 2, axis=0) > 0.5
    order = jnp.argsort(-jnp.where(real, _score(theta, which), -jnp.inf))[: cfg.keep]
    scale = jnp.max(jnp.where(real, jnp.abs(theta), 0))
    return theta[order], s[:, order], scale


def _passes(norms, theta, scale, tol, m):
    """Every pair within tol relative, or an eigenvalue and residual both at the rounding floor m·ε·‖H‖.

    The floor: a residual Wᵀy − θVᵀy sums m products, each rounded to about
    ε‖H‖, so below m·ε·‖H‖ (worst case) it is not resolved, and an eigenvalue
    that small is 0 to working precision, where no relative test can pass.
    """
    floor = m * jnp.finfo(theta.dtype).eps * scale
    zero = (jnp.abs(theta) <= floor) & (norms <= floor)
    return jnp.all((norms <= tol * jnp.abs(theta)) | zero)


def _progress(state: _State, norms, theta, done):
    """(best, since, stalled) after true residuals `norms`: stalled once `patience` products did not halve them.

    A float32 network Hessian is linear only to about 2e-6 relative (its
    products of v, w and (v + w)/2 disagree by that much, from the softmax's
    p(1 − p) at confident examples), so residuals stop there however many
    products follow; the solve then stops instead of spending max_matvecs.
    """
    worst = jnp.max(norms / jnp.maximum(jnp.abs(theta), jnp.finfo(theta.dtype).tiny))
    improved = worst <= state.best / 2
    best = jnp.where(improved, worst, state.best)
    since = jnp.where(improved, 0, state.since)
    return best, since, ~done & ~improved & (since >= state.patience)


def _step(state: _State, w: jax.Array, tol: jax.Array, key: jax.Array, cfg: _Config) -> _State:
    """One product w = H basis[count] into the basis: coefficients, next pending vector, Ritz pairs, residuals."""
    m, b, j = state.coeffs.shape[1], cfg.block, state.count
    w = w.astype(state.basis.dtype)
    products = lax.dynamic_update_index_in_dim(state.products, w, j, 0) if cfg.store else state.products
    r, c = _orthogonalize(w, state.basis)
    norm = jnp.linalg.norm(r)
    # Breakdown: H basis[j] lies in the span (an invariant subspace). After two
    # Gram–Schmidt passes the remainder of such a vector is rounding, at most
    # about ε‖w‖ per basis row: (m + b)·ε‖w‖ bounds it.
    breakdown = norm <= (m + b) * jnp.finfo(w.dtype).eps * jnp.linalg.norm(w)
    new = lax.cond(breakdown, lambda: _fresh(key, state.draws, state.basis), lambda: r / jnp.where(breakdown, 1, norm))
    basis = lax.dynamic_update_index_in_dim(state.basis, new, j + b, 0)
    c = lax.dynamic_update_index_in_dim(c, jnp.where(breakdown, 0, norm), j + b, 0)
    coeffs = lax.dynamic_update_index_in_dim(state.coeffs, c, j, 1)
    count = j + 1
    theta, coords, scale = _rayleigh_ritz(coeffs, count, state.which, cfg)
    scale = jnp.maximum(state.scale, scale)
    y = coords[:, : cfg.k]
    if cfg.store:
        # H x = Wᵀ y for x = Vᵀ y: the true residual without a product.
        vectors = _combine(y, basis)
        norms = jnp.linalg.norm(_dot(y.T, products) - theta[: cfg.k, None] * vectors, axis=1)
        passed = (count >= cfg.k) & _passes(norms, theta[: cfg.k], scale, state.screen * tol, m)
        done, check, checked = passed & ~state.verify, passed & state.verify, jnp.zeros((), bool)
        best, since, stalled = _progress(state._replace(since=state.since + 1), norms, theta[: cfg.k], done)
        best, since = jnp.where(count >= cfg.k, best, state.best), jnp.where(count >= cfg.k, since, 0)
        stalled = stalled & (count >= cfg.k)
    else:
        # In exact arithmetic H x − θx = Σ (pending row)·(its coupling to x).
        couplings = lax.dynamic_slice_in_dim(coeffs, count, b, 0)
        estimate = jnp.linalg.norm(_dot(couplings, y), axis=0)
        vectors, norms, done, checked = state.vectors, state.norms, state.done, jnp.zeros((), bool)
        check = (count >= cfg.k) & _passes(estimate, theta[: cfg.k], scale, state.screen * tol, m)
        best, since, stalled = state.best, state.since + 1, state.stalled  # judged at the explicit checks
    return state._replace(basis=basis, products=products, coeffs=coeffs, count=count, matvecs=state.matvecs + 1,
                          draws=state.draws + breakdown, theta=theta, coords=coords, vectors=vectors, norms=norms,
                          scale=scale, check=check, checked=checked, done=done, best=best, since=since,
                          stalled=stalled)  # fmt: skip


def _ritz_vectors(state: _State, k: int) -> jax.Array:
    return _combine(state.coords[:, :k], state.basis)


def _checked(state: _State, vectors: jax.Array, hx: jax.Array, tol: jax.Array, cfg: _Config) -> _State:
    """The explicit check: residuals of `vectors` from their products hx (k products, counted)."""
    theta = state.theta[: cfg.k]
    norms = jnp.linalg.norm(hx.astype(vectors.dtype) - theta[:, None] * vectors, axis=1)
    done = _passes(norms, theta, state.scale, tol, state.coeffs.shape[1])
    # A failed check means the screen ran ahead of the truth: ask it for ten
    # times less before the next check (the estimate, which underflows), or
    # twice less (the Wᵀy residual, off by the products' own error).
    screen = jnp.where(done, state.screen, state.screen / (2 if cfg.store else 10))
    best, since, stalled = _progress(state, norms, theta, done)
    return state._replace(vectors=vectors, norms=norms, done=done, screen=screen, check=jnp.zeros((), bool),
                          checked=jnp.ones((), bool), matvecs=state.matvecs + cfg.k, best=best, since=since,
                          stalled=stalled)  # fmt: skip


def _restart(state: _State, cfg: _Config) -> _State:
    """Thick restart: basis = [keep Ritz vectors, the b pending vectors], products and coefficients to match."""
    m, keep, b = state.coeffs.shape[1], cfg.keep, cfg.block
    y = state.coords
    basis = state.basis.at[:keep].set(_combine(y, state.basis))
    basis = basis.at[keep : keep + b].set(state.basis[m : m + b]).at[keep + b :].set(0)
    products = state.products
    if cfg.store:
        products = products.at[:keep].set(_dot(y.T, products)).at[keep:].set(0)
    # P is diag(θ) on the kept vectors; the pending rows' couplings to them are
    # the old couplings times y (the "arrow" of Wu & Simon's restarted T).
    coeffs = jnp.zeros_like(state.coeffs).at[jnp.arange(keep), jnp.arange(keep)].set(state.theta)
    coeffs = coeffs.at[keep : keep + b, :keep].set(_dot(state.coeffs[m : m + b], y))
    # The kept Ritz vectors are now basis rows 0..keep-1 themselves.
    coords = jnp.eye(m, keep, dtype=y.dtype)
    return state._replace(basis=basis, products=products, coeffs=coeffs, count=jnp.asarray(keep, state.count.dtype),
                          coords=coords, restarts=state.restarts + 1)  # fmt: skip


def _initial(starts, key, which, patience, verify, m: int, cfg: _Config) -> _State:
    """The state before the first product: the b start vectors orthonormalized (random ones where dependent)."""
    b, n = starts.shape
    dtype = starts.dtype
    basis = jnp.zeros((m + b, n), dtype)
    draws = jnp.zeros((), jnp.int32)
    for i in range(b):
        r, _ = _orthogonalize(starts[i], basis)
        norm = jnp.linalg.norm(r)
        bad = ~(norm > (m + b) * jnp.finfo(dtype).eps * jnp.linalg.norm(starts[i]))
        basis = basis.at[i].set(jnp.where(bad, _fresh(key, draws, basis), r / jnp.where(bad, 1, norm)))
        draws = draws + bad
    zero, false = jnp.zeros((), dtype), jnp.zeros((), bool)
    return _State(basis=basis, products=jnp.zeros((m if cfg.store else 0, n), dtype),
                  coeffs=jnp.zeros((m + b, m), dtype), count=jnp.zeros((), jnp.int32),
                  matvecs=jnp.zeros((), jnp.int32), restarts=jnp.zeros((), jnp.int32), draws=draws,
                  theta=jnp.zeros((cfg.keep,), dtype), coords=jnp.zeros((m, cfg.keep), dtype),
                  vectors=jnp.zeros((cfg.k, n), dtype), norms=jnp.full((cfg.k,), jnp.inf, dtype), scale=zero,
                  check=false, screen=jnp.ones((), dtype), checked=false, verify=jnp.asarray(verify, bool), done=false,
                  which=jnp.asarray(which, jnp.int32), best=jnp.full((), jnp.inf, dtype),
                  since=jnp.zeros((), jnp.int32), patience=jnp.asarray(patience, jnp.int32), stalled=false)  # fmt: skip


# Host-driven steps: compiled once per shapes and configuration, shared by all
# calls; the state is donated, so the basis is updated in place.
_initial_host = jax.jit(_initial, static_argnums=(5, 6))
_step_host = jax.jit(_step, static_argnums=4, donate_argnums=0)
_checked_host = jax.jit(_checked, static_argnums=4, donate_argnums=0)
_restart_host = jax.jit(_restart, static_argnums=1, donate_argnums=0)
_ritz_vectors_host = jax.jit(_ritz_vectors, static_argnums=1)
_row = jax.jit(lambda basis, i: lax.dynamic_index_in_dim(basis, i, 0, keepdims=False))


def _wanted(state: _State, k: int) -> jax.Array:
    """The k wanted Ritz values, NaN where fewer than k exist: one row of the history."""
    return jnp.where(jnp.arange(k) < state.count, state.theta[:k], jnp.nan)


_wanted_host = jax.jit(_wanted, static_argnums=1)


def _solve_host(matvec, starts, key, which, patience, verify, tol, max_matvecs, m, cfg):
    """The loop in Python: `matvec` on concrete arrays, everything else in the compiled steps above."""
    state = _initial_host(starts, key, which, patience, verify, m, cfg)
    history = np.full((max_matvecs, cfg.k), np.nan, starts.dtype)
    while not bool(state.done | state.stalled) and int(state.matvecs) < max_matvecs:
        state = _step_host(state, matvec(_row(state.basis, state.count)), tol, key, cfg)
        history[int(state.matvecs) - 1] = np.asarray(_wanted_host(state, cfg.k))
        if bool(state.check):
            vectors = _ritz_vectors_host(state, cfg.k)
            state = _checked_host(state, vectors, jnp.stack([matvec(x) for x in vectors]), tol, cfg)
        if not bool(state.done | state.stalled) and int(state.count) == m:
            state = _restart_host(state, cfg)
    if not bool(state.done | state.checked):  # an unconverged end: its residuals from explicit products
        vectors = _ritz_vectors_host(state, cfg.k)
        state = _checked_host(state, vectors, jnp.stack([matvec(x) for x in vectors]), tol, cfg)
    return state, jnp.asarray(history)


def _solve_compiled(matvec, starts, key, which, patience, verify, tol, max_matvecs, m, cfg):
    """The same steps in one `lax.while_loop` (traceable; `matvec` is traced inside)."""

    def check(state):
        vectors = _ritz_vectors(state, cfg.k)
        return _checked(state, vectors, lax.map(matvec, vectors), tol, cfg)

    def body(carry):
        state, history = carry
        state = _step(state, matvec(lax.dynamic_index_in_dim(state.basis, state.count, 0, False)), tol, key, cfg)
        history = lax.dynamic_update_index_in_dim(history, _wanted(state, cfg.k), state.matvecs - 1, 0)
        state = lax.cond(state.check, check, lambda s: s, state)
        restart = ~state.done & ~state.stalled & (state.count == m)
        return lax.cond(restart, functools.partial(_restart, cfg=cfg), lambda s: s, state), history

    history = jnp.full((max_matvecs, cfg.k), jnp.nan, starts.dtype)
    state, history = lax.while_loop(lambda c: ~c[0].done & ~c[0].stalled & (c[0].matvecs < max_matvecs), body,
                                    (_initial(starts, key, which, patience, verify, m, cfg), history))  # fmt: skip
    return lax.cond(state.done | state.checked, lambda s: s, check, state), history


def _is_traced(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def top_eigenpairs(
    matvec: MatVec,
    v0: jax.Array,
    k: int,
    *,
    tol: float = 1e-6,
    which: str = "LA",
    max_matvecs: int = 500,
    patience: int | None = None,
    krylov_dim: int | None = None,
    keep: int | None = None,
    block_size: int = 1,
    store_products: bool = True,
    verify: bool | None = None,
    host: bool | None = None,
    key: jax.Array | None = None,
) -> Eigenpairs:
    """The k wanted eigenpairs of a symmetric operator, to true relative residual tol (module docstring).

    Args:
      matvec: `x -> H x` on flat (n,) vectors, H symmetric (output cast to v0's dtype).
      v0: (n,) start vector or (block_size, n) start block (the missing rows
        drawn from `key`); its dtype (float32, float64) is the working one.
      k: number of eigenpairs.
      tol: stop once every ‖Hx − θx‖ ≤ tol·|θ| (`Eigenpairs.converged`).
      which: "LA" largest algebraic (a Hessian's top), "SA" smallest
        algebraic, "LM" largest magnitude.
      max_matvecs: at most this many products (a last explicit check may add k).
      patience: stop (`stalled`) after this many products that did not halve
        the largest relative residual. Default 50: twice the longest such run
        in the tests' spectra (26, evenly spaced, krylov_dim=12; 17 with 40).
      krylov_dim: basis size m at which to restart, the memory knob; default
        min(n − block_size, max(40, 2(k + block_size))); m ≥ max_matvecs is
        plain Lanczos, the fewest products.
      keep: Ritz vectors kept at a restart, k ≤ keep < m; default k + (m − k)//2
        (the fewest products, or within 2%, among keep = 8, 10, 20, 30 for
        m = 30, 40 on spectra needing ten and more restarts).
      block_size: start vectors; the multiplicity of a repeated eigenvalue
        to get every copy of it (1 needs the fewest products).
      store_products: keep W = H V (twice the memory); False checks with k
        explicit products when the Lanczos estimate says converged.
      verify: confirm a pass of the Wᵀy residuals with k explicit products
        (counted) and report theirs. Default: tol < 1000ε of v0's dtype (a
        product's own error, 16ε measured for a float32 ResNet18 Hessian,
        is then over 2% of tol); float32 below 1.2e-4, float64 below 2e-13.
      host: True drives the loop from Python (`matvec` on concrete arrays,
        the steps compiled once per shapes at module level); False compiles
        one `lax.while_loop`, traceable in `jax.jit`. Default: False when v0
        is traced (else pass host=False inside jit), True on the CPU backend
        (XLA:CPU runs a network's gradient ~10x slower inside a loop).
      key: PRNG key for extra start vectors and breakdown continuations
        (default `jax.random.key(0)`).

    Returns:
      An `Eigenpairs` record (jax arrays).

    Raises:
      ValueError: an option out of range (the message names it).

    Example:
      >>> d = jnp.concatenate([jnp.array([5.0, 4.0, 3.0]), jnp.linspace(-1.0, 1.0, 997)])
      >>> res = top_eigenpairs(lambda x: d * x, jnp.ones(1000), 3)
      >>> int(res.matvecs), bool(res.converged)
      (18, True)
      >>> solve = jax.jit(lambda d, v0: top_eigenpairs(lambda x: d * x, v0, 3, host=False))
      >>> solve(d, jnp.ones(1000)).eigenvalues  # the same numbers, one compiled program
    """
    if which not in WHICH:
        raise ValueError(f"which={which!r}: use one of {WHICH}")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1 (got {k!r})")
    if not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1 (got {block_size!r})")
    v0 = jnp.asarray(v0)
    if v0.ndim not in (1, 2) or (v0.ndim == 2 and v0.shape[0] != block_size):
        raise ValueError(f"v0 must have shape (n,) or (block_size={block_size}, n) (got {v0.shape})")
    if not jnp.issubdtype(v0.dtype, jnp.floating):
        raise ValueError(f"v0 must be floating point: it sets the working dtype (got {v0.dtype})")
    n = v0.shape[-1]
    m = krylov_dim if krylov_dim is not None else min(n - block_size, max(40, 2 * (k + block_size)))
    keep = keep if keep is not None else k + (m - k) // 2
    if not k < m <= n - block_size:
        raise ValueError(f"krylov_dim={m} must satisfy k={k} < krylov_dim <= n - block_size = {n - block_size}"
                         + (" (n is too small for a Krylov method: use numpy.linalg.eigh)" if k >= n - block_size
                            else ""))  # fmt: skip
    if not k <= keep < m:
        raise ValueError(f"keep={keep} must satisfy k={k} <= keep < krylov_dim={m}")
    patience = 50 if patience is None else patience
    for name, value, low in (("tol", tol, 0), ("max_matvecs", max_matvecs, 1), ("patience", patience, 1)):
        if not value >= low:
            raise ValueError(f"{name} must be >= {low} (got {value})")
    start_key, key = jax.random.split(jax.random.key(0) if key is None else key)
    traced = _is_traced(v0)
    host = (not traced and jax.default_backend() == "cpu") if host is None else host
    if host and traced:
        raise ValueError("host=True drives the loop from Python and cannot run inside jax.jit: use host=False")
    if v0.ndim == 1:
        extra = jax.random.uniform(start_key, (block_size - 1, n), v0.dtype, -1, 1)
        starts = jnp.concatenate([v0[None], extra])
    else:
        starts = v0
    cfg = _Config(k=int(k), keep=int(keep), block=int(block_size), store=bool(store_products))
    tol_arg = jnp.asarray(tol, v0.dtype)
    solve = _solve_host if host else _solve_compiled
    if verify is None:  # the Wᵀy residual is off by a product's error: 16ε measured, 2% of tol at 1000ε
        verify = bool(tol < 1000 * jnp.finfo(v0.dtype).eps)
    state, history = solve(matvec, starts, key, np.int32(WHICH.index(which)), np.int32(patience), np.bool_(verify),
                           tol_arg, int(max_matvecs), m, cfg)  # fmt: skip
    theta = state.theta[: cfg.k]
    return Eigenpairs(
        eigenvalues=theta,
        eigenvectors=state.vectors,
        residuals=state.norms / jnp.maximum(jnp.abs(theta), jnp.finfo(theta.dtype).tiny),
        residual_norms=state.norms,
        converged=state.done,
        matvecs=state.matvecs,
        restarts=state.restarts,
        stalled=state.stalled,
        history=history,
    )


def flat_operator(tree_matvec: Callable[[Any], Any], like: Any) -> tuple[MatVec, Callable[[jax.Array], Any]]:
    """(flat matvec, unravel) for an operator on pytrees like `like` (`jax.flatten_util.ravel_pytree`).

    The flat matvec casts its input to the pytree's dtype and its output back
    to the input's, so a float64 solve of a float32 operator works.

    Example:
      >>> mv, unravel = flat_operator(lambda v: hvp(loss_fn, params, v), params)
      >>> res = top_eigenpairs(mv, jax.random.normal(key, (n,)), 3)
      >>> vectors = jax.vmap(unravel)(res.eigenvectors)
    """
    flat, unravel = ravel_pytree(like)

    def matvec(x):
        return ravel_pytree(tree_matvec(unravel(x.astype(flat.dtype))))[0].astype(x.dtype)

    return matvec, unravel
