"""jaxsam.geometry.eigen: top-k eigenpairs from matvecs against numpy.linalg.eigh and scipy's eigsh (ARPACK).

Every operator here is a dense symmetric 200 x 200 matrix Q diag(spectrum) Qᵀ
with a known spectrum, so all tests share one compiled program per solver
setting. Counts of products are compared with eigsh on the same operator,
with the same k, which, tol and start vector.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse.linalg as sla
from jax.flatten_util import ravel_pytree

from jaxsam.geometry import eigen

N = 200
LOWERING = "/jax/core/compile/jaxpr_to_mlir_module_duration"  # one event per program lowered


def _matrix(spectrum, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((N, N)))
    return (q * np.asarray(spectrum, np.float64)) @ q.T


def _bulk(seed, top, low=-0.5, high=0.5):
    s = np.random.default_rng(seed).uniform(low, high, N)
    s[: len(top)] = top
    return s


SPECTRA = {
    "separated": _bulk(1, [10.0, 6.0, 3.0]),
    "clustered": _bulk(2, [1.0, 0.99, 0.98]),
    "tiny gaps": _bulk(3, [1.0, 1 - 1e-4, 1 - 2e-4]),
    "negative": _bulk(4, [2.0, 1.5, 1.2, -4.0]),
    "uniform": np.linspace(-1.0, 1.0, N),
}


def _v0(dtype=np.float64, seed=5):
    return np.random.default_rng(seed).uniform(-1, 1, N).astype(dtype)


@jax.jit
def _apply(a, x):
    return a @ x


def _operator(a):
    a = jnp.asarray(a)
    return functools.partial(_apply, a)


def _eigsh_matvecs(a, k, which="LA", tol=1e-6, v0=None):
    count = [0]

    def matvec(x):
        count[0] += 1
        return a @ x

    op = sla.LinearOperator(a.shape, matvec=matvec, dtype=a.dtype)
    values = sla.eigsh(op, k=k, which=which, tol=tol, v0=v0, return_eigenvectors=False)
    return count[0], values


def _explicit(a, res):
    """True relative residuals of the returned pairs, in float64."""
    x, theta = np.asarray(res.eigenvectors, np.float64), np.asarray(res.eigenvalues, np.float64)
    return np.linalg.norm(x @ a - theta[:, None] * x, axis=1) / np.abs(theta)


@pytest.mark.parametrize("name", sorted(SPECTRA))
def test_top3_match_eigh_within_the_residual_bound_in_no_more_matvecs_than_eigsh(name, x64):
    a = _matrix(SPECTRA[name])
    res = eigen.top_eigenpairs(_operator(a), jnp.asarray(_v0()), 3, tol=1e-6, host=True)
    exact = np.linalg.eigvalsh(a)[::-1][:3]
    assert bool(res.converged) and np.all(np.asarray(res.residuals) <= 1e-6)
    history = np.asarray(res.history)
    np.testing.assert_array_equal(history[int(res.matvecs) - 1], res.eigenvalues)
    assert np.isnan(history[0, 1:]).all() and not np.isnan(history[2 : int(res.matvecs)]).any()
    assert np.isnan(history[int(res.matvecs) :]).all()
    # Some eigenvalue lies within ‖r‖ of each Ritz value (Kahan's bound, Parlett 1998);
    # the pairs are the top three, so the i-th exact one (rounding of eigh: 1e-14).
    np.testing.assert_array_less(np.abs(np.asarray(res.eigenvalues) - exact), np.asarray(res.residual_norms) + 1e-12)
    np.testing.assert_allclose(_explicit(a, res), res.residuals, rtol=1e-6, atol=1e-13)
    matvecs, values = _eigsh_matvecs(a, 3, v0=_v0())
    np.testing.assert_allclose(np.sort(values)[::-1], exact, rtol=1e-5)
    assert int(res.matvecs) <= matvecs, (int(res.matvecs), matvecs)


def test_largest_magnitude_finds_the_negative_end(x64):
    a = _matrix(SPECTRA["negative"])
    res = eigen.top_eigenpairs(_operator(a), jnp.asarray(_v0()), 3, which="LM", host=True)
    np.testing.assert_allclose(res.eigenvalues, [-4.0, 2.0, 1.5], rtol=1e-9)
    assert bool(res.converged) and int(res.matvecs) <= _eigsh_matvecs(a, 3, "LM", v0=_v0())[0]


def test_a_repeated_eigenvalue_needs_a_block_of_two_and_one_vector_still_returns_true_pairs(x64):
    a = _matrix(_bulk(6, [5.0, 5.0, 4.0, 3.5]))
    single = eigen.top_eigenpairs(_operator(a), jnp.asarray(_v0()), 3, host=True)
    # A Krylov space from one vector holds one direction of each eigenspace
    # (ARPACK's eigsh returns the same three values here): honest, not the top three.
    np.testing.assert_allclose(single.eigenvalues, [5.0, 4.0, 3.5], rtol=1e-9)
    assert bool(single.converged)
    block = eigen.top_eigenpairs(_operator(a), jnp.asarray(_v0()), 3, block_size=2, host=True)
    np.testing.assert_allclose(block.eigenvalues, [5.0, 5.0, 4.0], rtol=1e-9)
    x = np.asarray(block.eigenvectors)
    np.testing.assert_allclose(x @ x.T, np.eye(3), atol=1e-9)
    assert bool(block.converged) and np.all(_explicit(a, block) <= 1e-6)


# One small basis (a restart every few products) for the restart tests, so they share their programs.
SMALL = dict(krylov_dim=12)


def test_thick_restart_converges_in_a_small_basis_without_more_matvecs_than_eigsh(x64):
    a = _matrix(SPECTRA["uniform"])
    res = eigen.top_eigenpairs(_operator(a), jnp.asarray(_v0()), 3, **SMALL, host=True)
    assert int(res.restarts) > 0 and bool(res.converged) and np.all(_explicit(a, res) <= 1e-6)
    np.testing.assert_allclose(res.eigenvalues, np.linalg.eigvalsh(a)[::-1][:3], rtol=1e-9)
    assert int(res.matvecs) <= _eigsh_matvecs(a, 3, v0=_v0())[0]


def test_without_stored_products_the_check_is_explicit_and_counted(x64):
    a = _matrix(SPECTRA["clustered"])
    kept = eigen.top_eigenpairs(_operator(a), jnp.asarray(_v0()), 3, **SMALL, host=True)
    lean = eigen.top_eigenpairs(_operator(a), jnp.asarray(_v0()), 3, **SMALL, store_products=False, host=True)
    assert int(kept.restarts) > 0 and bool(lean.converged)
    np.testing.assert_allclose(lean.eigenvalues, kept.eigenvalues, rtol=1e-9)
    # The same Lanczos steps (products do not steer the basis), then one check of k products.
    assert int(lean.matvecs) == int(kept.matvecs) + 3
    np.testing.assert_allclose(_explicit(a, lean), lean.residuals, rtol=1e-6, atol=1e-13)


def test_host_and_compiled_loops_agree_and_each_compiles_once(x64):
    a, b = _matrix(SPECTRA["clustered"]), _matrix(SPECTRA["tiny gaps"], seed=1)
    options = dict(SMALL, store_products=False)
    solve = jax.jit(lambda m, v0: eigen.top_eigenpairs(lambda x: m @ x, v0, 3, **options, host=False))
    events = []
    listener = lambda event, *_, **__: events.append(event)  # noqa: E731
    first = solve(jnp.asarray(a), jnp.asarray(_v0()))
    host = eigen.top_eigenpairs(_operator(a), jnp.asarray(_v0()), 3, **options, host=True)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        second = solve(jnp.asarray(b), jnp.asarray(_v0()))
        host_b = eigen.top_eigenpairs(_operator(b), jnp.asarray(_v0()), 3, **options, host=True)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert events.count(LOWERING) == 0, events  # a second matrix of the same shape compiles nothing
    for one, other in ((host, first), (host_b, second)):
        assert int(one.restarts) > 0 and bool(one.converged)
        for field in ("matvecs", "restarts", "converged"):
            assert int(getattr(one, field)) == int(getattr(other, field)), field
        np.testing.assert_allclose(one.eigenvalues, other.eigenvalues, rtol=1e-12)
        np.testing.assert_allclose(one.eigenvectors, other.eigenvectors, atol=1e-10)
        np.testing.assert_allclose(one.residuals, other.residuals, rtol=1e-6, atol=1e-14)
        np.testing.assert_allclose(one.history, other.history, rtol=1e-12)  # NaN where NaN
    np.testing.assert_allclose(second.eigenvalues, [1.0, 1 - 1e-4, 1 - 2e-4], rtol=1e-9)


def test_float32_residuals_are_the_true_ones_not_the_underflowing_estimate():
    a = _matrix(SPECTRA["clustered"])
    a32 = jnp.asarray(a, jnp.float32)
    stored = eigen.top_eigenpairs(_operator(a32), jnp.asarray(_v0(np.float32)), 3, verify=False, host=True)
    assert stored.eigenvectors.dtype == jnp.float32 and bool(stored.converged)
    reported, explicit = np.asarray(stored.residuals, np.float64), _explicit(a, stored)
    assert np.all(reported > 0)
    # Both are ‖Hx − θx‖ of the same float32 pair; the reported one uses the stored
    # products Wᵀy for Hx. They differ by the rounding of a float32 product of a unit
    # vector, about ε‖A‖ each: 2ε‖A‖/|θ| bounds the difference.
    bound = 2 * np.finfo(np.float32).eps * np.max(np.abs(SPECTRA["clustered"])) / np.abs(np.asarray(stored.eigenvalues))
    np.testing.assert_array_less(np.abs(reported - explicit), bound)
    assert np.all(explicit <= 1e-6 + bound)
    # float32 at tol 1e-6 (< 1000ε) confirms the pass with k explicit products by default.
    checked = eigen.top_eigenpairs(_operator(a32), jnp.asarray(_v0(np.float32)), 3, host=True)
    assert bool(checked.converged) and int(checked.matvecs) == int(stored.matvecs) + 3
    products = np.asarray(jax.vmap(_operator(a32))(checked.eigenvectors), np.float64)
    x = np.asarray(checked.eigenvectors, np.float64)
    values = np.asarray(checked.eigenvalues, np.float64)
    # The solver forms hx − θx in float32: an error of about ε|θ|, ε on the relative residual.
    np.testing.assert_allclose(np.linalg.norm(products - values[:, None] * x, axis=1) / values, checked.residuals,
                               rtol=0, atol=np.finfo(np.float32).eps)  # fmt: skip


def test_a_solve_cut_short_reports_not_converged_with_true_residuals(x64):
    a = _matrix(SPECTRA["uniform"])
    res = eigen.top_eigenpairs(_operator(a), jnp.asarray(_v0()), 3, max_matvecs=15, host=True)
    # 15 Lanczos products, then k explicit ones for the reported residuals.
    assert not bool(res.converged) and int(res.matvecs) == 15 + 3
    np.testing.assert_allclose(_explicit(a, res), res.residuals, rtol=1e-6)
    assert np.max(np.asarray(res.residuals)) > 1e-6
    # Cut right after a restart, without stored products: the final check is of the kept vectors.
    lean = eigen.top_eigenpairs(_operator(a), jnp.asarray(_v0()), 3, **SMALL, store_products=False, max_matvecs=12,
                                host=True)  # fmt: skip
    assert int(lean.restarts) == 1 and int(lean.matvecs) == 12 + 3 and not bool(lean.converged)
    np.testing.assert_allclose(_explicit(a, lean), lean.residuals, rtol=1e-6)
    for cut in (res, lean):  # the reported vectors are the Ritz vectors of the reported values
        x = np.asarray(cut.eigenvectors)
        np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-12)
        np.testing.assert_allclose(np.einsum("ij,jk,ik->i", x, a, x), cut.eigenvalues, rtol=1e-12)


def test_an_operator_accurate_to_1e_4_stalls_there_instead_of_spending_max_matvecs(x64):
    # Like a float32 network Hessian (linear to about 2e-6): a product with a small
    # nonlinear error, so no residual gets below about its size.
    a = jnp.asarray(_matrix(SPECTRA["separated"]))
    noisy = jax.jit(lambda x: a @ x + 1e-4 * jnp.linalg.norm(x) * jnp.sin(1e3 * x))
    res = eigen.top_eigenpairs(noisy, jnp.asarray(_v0()), 3, host=True)
    assert bool(res.stalled) and not bool(res.converged) and int(res.matvecs) < 150
    np.testing.assert_allclose(res.eigenvalues, [10.0, 6.0, 3.0], rtol=1e-4)
    explicit = np.linalg.norm(jax.vmap(noisy)(res.eigenvectors) - res.eigenvalues[:, None] * res.eigenvectors, axis=1)
    # An unconverged end reports residuals of explicit products (Wᵀy is off by the noise).
    np.testing.assert_allclose(explicit / np.abs(np.asarray(res.eigenvalues)), res.residuals, rtol=1e-6)
    assert 1e-6 < np.max(np.asarray(res.residuals)) < 1e-3


def test_an_invariant_start_and_an_exactly_zero_eigenvalue_converge(x64):
    a = _matrix(np.concatenate([[3.0, 2.0], np.zeros(N - 2)]))
    # The Krylov space of v0 is invariant after 2 products; the 3rd pair is 0 to rounding.
    res = eigen.top_eigenpairs(_operator(a), jnp.asarray(_v0()), 3, host=True)
    np.testing.assert_allclose(res.eigenvalues[:2], [3.0, 2.0], rtol=1e-12)
    assert abs(float(res.eigenvalues[2])) < 1e-12 and bool(res.converged) and int(res.matvecs) == 3
    e1 = jnp.zeros(N, jnp.float64).at[0].set(1.0)
    diag = eigen.top_eigenpairs(_operator(np.diag(np.arange(N, 0, -1.0))), e1, 3, host=True)
    np.testing.assert_allclose(diag.eigenvalues, [N, N - 1, N - 2], rtol=1e-9)


def test_flat_operator_on_a_pytree(x64):
    a = _matrix(SPECTRA["separated"])
    like = {"w": jnp.zeros((10, 15)), "b": jnp.zeros(50)}
    matvec, unravel = eigen.flat_operator(lambda t: unravel(_operator(a)(ravel_pytree(t)[0])), like)
    res = eigen.top_eigenpairs(matvec, jnp.asarray(_v0()), 3, host=True)
    np.testing.assert_allclose(res.eigenvalues, [10.0, 6.0, 3.0], rtol=1e-9)
    assert jax.vmap(unravel)(res.eigenvectors)["w"].shape == (3, 10, 15)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=0), "k must be"),
        (dict(k=3, which="BE"), "which="),
        (dict(k=3, krylov_dim=3), "krylov_dim=3"),
        (dict(k=3, keep=2), "keep=2"),
        (dict(k=3, block_size=2, v0=np.ones((3, N))), "v0 must have shape"),
        (dict(k=3, v0=np.ones(N, np.int32)), "floating point"),
        (dict(k=199), "too small"),
    ],
)
def test_bad_options_name_the_fix(kwargs, match):
    kwargs = {"v0": np.ones(N, np.float32), **kwargs}
    with pytest.raises(ValueError, match=match):
        eigen.top_eigenpairs(lambda x: x, jnp.asarray(kwargs.pop("v0")), **kwargs)
