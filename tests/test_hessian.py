"""Hessian measures against dense Hessians of tiny networks, in float64.

Tolerances: eigenvalues and moments are compared with absolute errors on
O(1) Hessians (relative where the scale is not O(1), stated at each check);
Hutchinson and multi-probe SLQ estimates within 3 of their standard errors.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from jaxsam.geometry import hessian
from jaxsam.geometry import loss as loss_lib
from jaxsam.sam import sam_transform

from conftest import mlp_loss

# ---------------------------------------------------------------------------
# Problems and references.


@jax.jit
def _mlp_hessian(params, batch):
    flat, unravel = ravel_pytree(params)
    return jax.hessian(lambda x: mlp_loss(unravel(x), batch))(flat)


def _like_mlp_init(rng, sizes=(5, 7, 3)):
    """conftest.mlp_init's parameters, drawn with NumPy (no random-number program to compile)."""
    return {
        f"dense_{i}": {
            "kernel": rng.standard_normal((n_in, n_out)) / np.sqrt(n_in),
            "bias": 0.1 * rng.standard_normal(n_out),
        }
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:]))
    }


@pytest.fixture(scope="module")
def mlp_case():
    """The conftest tanh MLP (66 parameters, 16 examples) in float64 and its dense Hessian, built once."""
    rng = np.random.default_rng(3)
    params = _like_mlp_init(rng)
    batch = (rng.standard_normal((16, 5)), rng.integers(0, 3, 16))
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        h = np.asarray(_mlp_hessian(params, batch))
    finally:
        jax.config.update("jax_enable_x64", previous)
    return params, batch, h


def _mlp_loss_fn(batch):
    return loss_lib.from_function(lambda p: mlp_loss(p, batch), subset="tiny")


class Mlp(NamedTuple):
    loss_fn: Any  # carries info {"subset": "tiny"}
    params: Any
    h: np.ndarray  # dense Hessian at params
    batch: Any


@pytest.fixture
def mlp(x64, mlp_case):
    """The MLP problem as float64 jax arrays, with its dense Hessian."""
    params, batch, h = mlp_case
    assert h.shape == (66, 66) and np.linalg.eigvalsh(h)[0] < 0  # indefinite: "largest algebraic" matters
    return Mlp(_mlp_loss_fn(batch), jax.tree.map(jnp.asarray, params), h, batch)


class _TinyCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Conv(4, (3, 3))(x))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(3)(x)


def _cnn_problem():
    model = _TinyCNN()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 6, 6, 2))
    y = rng.integers(0, 3, 6)
    # Flax's parameter structure, filled with NumPy draws (fan-in scaled).
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))), shapes)

    def loss(p):
        logp = jax.nn.log_softmax(model.apply({"params": p}, x))
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

    return loss, params


def _dense_hessian(loss_fn, params) -> np.ndarray:
    flat, unravel = ravel_pytree(params)
    return np.asarray(jax.jit(jax.hessian(lambda x: loss_fn(unravel(x))))(flat))


def _flat(tree) -> np.ndarray:
    return np.asarray(ravel_pytree(tree)[0])


def _rows(stacked, k):
    """The k pytrees of a leading-axis-k pytree, flattened: (k, dim)."""
    return np.stack([_flat(jax.tree.map(lambda x: x[i], stacked)) for i in range(k)])


# ---------------------------------------------------------------------------
# hvp.


def _check_hvp(loss_fn, params, h):
    flat, unravel = ravel_pytree(params)
    v = unravel(jnp.asarray(np.random.default_rng(7).standard_normal(flat.shape)))
    got = jax.jit(lambda p, v: hessian.hvp(loss_fn, p, v))(params, v)
    assert jax.tree.structure(got) == jax.tree.structure(params)
    want = h @ _flat(v)
    assert np.abs(want).max() > 1e-2  # not vacuous
    np.testing.assert_allclose(_flat(got), want, rtol=0, atol=1e-10)


def test_hvp_matches_dense_hessian_mlp(mlp):
    _check_hvp(mlp.loss_fn, mlp.params, mlp.h)


def test_hvp_matches_dense_hessian_cnn(x64):
    loss_fn, params = _cnn_problem()
    _check_hvp(loss_fn, params, _dense_hessian(loss_fn, params))


# ---------------------------------------------------------------------------
# Top eigenvalues. Eigenvalues of the O(1) MLP Hessian: absolute error 1e-6.


def _check_eigenpairs(res, h, k):
    want = np.linalg.eigvalsh(h)[::-1][:k]  # largest algebraic
    assert res.eigenvalues.shape == res.residuals.shape == (k,)
    np.testing.assert_allclose(res.eigenvalues, want, rtol=0, atol=1e-6)
    vectors = _rows(res.eigenvectors, k)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-10)
    true_residuals = np.linalg.norm(vectors @ h - res.eigenvalues[:, None] * vectors, axis=1)
    assert np.all(true_residuals < 1e-5), true_residuals
    # The reported residuals are the true ones.
    np.testing.assert_allclose(res.residuals, true_residuals, rtol=0, atol=1e-10)


def test_lanczos_top3_matches_eigh(mlp):
    res = hessian.top_eigenvalues(mlp.loss_fn, mlp.params, jax.random.key(0), k=3, method="lanczos", tol=1e-6)
    _check_eigenpairs(res, mlp.h, 3)
    assert res.iterations == 50 and res.converged and res.method == "lanczos"  # default iters, < dim = 66
    # The history ends at the returned values.
    assert res.history.shape == (len(res.history_iterations), 3) and res.history_iterations[-1] == 50
    np.testing.assert_allclose(res.history[-1], res.eigenvalues, atol=1e-12)
    assert np.all(np.isnan(res.history[0, 1:]))  # one Ritz value after one step
    # JSON record without the eigenvectors, carrying the loss description.
    record = json.loads(json.dumps(res.to_dict()))
    assert "eigenvectors" not in record and record["loss_info"] == {"subset": "tiny"}
    assert len(record["eigenvalues"]) == 3


def test_power_top3_matches_eigh_with_shift(mlp):
    # The MLP's spectrum is ~[0.895, 0.611, 0.583, 0.534, ..., -0.530, -0.599]:
    # the three largest magnitudes include -0.599, so power iteration must
    # rerun on the shifted (PSD) Hessian, where the gap between 0.583 and
    # 0.534 needs a few hundred iterations.
    res = hessian.top_eigenvalues(
        mlp.loss_fn, mlp.params, jax.random.key(0), k=3, method="power", iters=5000, tol=1e-13
    )
    _check_eigenpairs(res, mlp.h, 3)
    assert res.shift == pytest.approx(np.abs(np.linalg.eigvalsh(mlp.h)).max(), abs=1e-6)
    assert res.converged and res.iterations < 10000 and res.method == "power"
    assert res.history.shape == (res.iterations, 3) and not np.isnan(res.history).any()
    np.testing.assert_allclose(res.history[-1], res.eigenvalues, atol=1e-12)


def test_power_top1_needs_no_shift(mlp):
    res = hessian.top_eigenvalues(mlp.loss_fn, mlp.params, jax.random.key(1), k=1, method="power", iters=500, tol=1e-13)
    _check_eigenpairs(res, mlp.h, 1)
    assert res.shift == 0 and res.converged and res.iterations < 500


def test_lanczos_survives_repeated_eigenvalues_and_clips_iters(x64):
    # A quadratic with a triple top eigenvalue: the Krylov space of one start
    # vector has dimension 4 (distinct eigenvalues), so Lanczos must restart.
    d = jnp.array([3.0, 3.0, 3.0, 1.0, 1.0, -2.0, -2.0, 0.5])
    loss_fn = lambda p: 0.5 * jnp.sum(d * p["w"] ** 2)  # noqa: E731
    res = hessian.top_eigenvalues(loss_fn, {"w": jnp.ones(8)}, jax.random.key(0), k=3, iters=1000)
    assert res.iterations == 8  # clipped to the number of parameters
    np.testing.assert_allclose(res.eigenvalues, [3, 3, 3], atol=1e-10)
    vectors = _rows(res.eigenvectors, 3)
    np.testing.assert_allclose(vectors @ vectors.T, np.eye(3), atol=1e-10)
    np.testing.assert_allclose(vectors[:, 3:], 0, atol=1e-10)  # in the eigenspace of 3
    assert np.all(res.residuals < 1e-10) and res.converged and res.loss_info == {}


def _float32_quadratic(eigenvalues, seed=0):
    """(loss, params, H) for L(w) = ½wᵀHw in float32 with H's spectrum given (H itself in float64)."""
    q, _ = np.linalg.qr(np.random.RandomState(seed).randn(len(eigenvalues), len(eigenvalues)))
    h = q @ np.diag(eigenvalues) @ q.T
    h32 = jnp.asarray(h, jnp.float32)
    return (lambda p: 0.5 * p["w"] @ h32 @ p["w"]), {"w": jnp.ones(len(eigenvalues), jnp.float32)}, h


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_float32_residuals_are_the_true_ones_and_decide_converged(method):
    """In float32 the Lanczos relation's β_m·|s_m| underflows to 0.0 once a pair has converged, and
    a power iteration whose estimates stop changing can be far from its eigenvector. The reported
    residuals are ‖Hv − λv‖ of the returned vectors (float32 products: to 1e-6·λmax of the float64
    value), never 0.0, and `converged` is read from them."""
    spectrum = np.concatenate([[100.0, 90.0, 80.0, 79.9], np.linspace(50, -5, 96)])  # λ3 ≈ λ4: slow for power
    loss_fn, params, h = _float32_quadratic(spectrum)
    iters = 100 if method == "lanczos" else 30
    res = hessian.top_eigenvalues(loss_fn, params, jax.random.key(0), k=3, method=method, iters=iters, tol=1e-4)
    vectors = np.asarray(_rows(res.eigenvectors, 3), np.float64)
    true_residuals = np.linalg.norm(vectors @ h - res.eigenvalues[:, None] * vectors, axis=1)
    assert np.all(res.residuals > 0), res.residuals
    np.testing.assert_allclose(res.residuals, true_residuals, rtol=0, atol=1e-6 * spectrum.max())
    assert res.converged == bool(np.all(res.residuals <= 1e-4 * np.max(np.abs(res.eigenvalues))))
    if method == "lanczos":
        assert res.converged
    else:  # 30 block iterations cannot separate λ3 = 80 from λ4 = 79.9: not converged, and says so
        assert not res.converged and res.iterations == 30


# ---------------------------------------------------------------------------
# Trace.


def test_hutchinson_trace_within_three_standard_errors(mlp):
    h, n = mlp.h, 100
    res = hessian.hessian_trace(mlp.loss_fn, mlp.params, jax.random.key(0), n=n, batch_size=10)
    assert res.samples.shape == (n,) and res.dim == 66 and res.n == n
    assert abs(res.trace - np.trace(h)) < 3 * res.standard_error
    # Rademacher probes: Var(zᵀHz) = 2 Σ_{i≠j} H_ij²; the estimated standard
    # error is the exact one up to sampling noise.
    exact_se = np.sqrt(2 * (np.sum(h**2) - np.sum(np.diag(h) ** 2)) / n)
    assert 0.6 * exact_se < res.standard_error < 1.6 * exact_se
    json.dumps(res.to_dict())


# ---------------------------------------------------------------------------
# Spectral density.


def test_slq_is_exact_gauss_quadrature_and_unbiased(mlp):
    # For a unit start vector v, m Lanczos steps give a Gauss rule exact for
    # vᵀ H^p v with p ≤ 2m − 1: with m = 3, moments 0..5 of every probe are
    # exact (to 1e-9 relative). Over 64 Rademacher probes the moments estimate
    # tr(H^p)/dim, within 3 standard errors, with the Rademacher spread
    # Var(vᵀAv) = 2 Σ_{i≠j} A_ij² / dim² (A = H^p, v = z/√dim).
    h, dim, n = mlp.h, 66, 64
    probes = np.random.default_rng(4).choice([-1.0, 1.0], size=(n, dim))
    v = probes / np.sqrt(dim)
    res = hessian.spectral_density(mlp.loss_fn, mlp.params, jax.random.key(0), order=3, probes=probes, grid=200)
    assert res.nodes.shape == res.weights.shape == (n, 3) and res.n_probes == n and res.order == 3
    assert res.grid.shape == res.density.shape == (200,)
    np.testing.assert_allclose(res.weights.sum(axis=1), 1, atol=1e-12)
    for p in range(6):
        a = np.linalg.matrix_power(h, p)
        per_probe = np.sum(res.weights * res.nodes**p, axis=1)
        np.testing.assert_allclose(per_probe, np.einsum("pi,ij,pj->p", v, a, v), rtol=1e-9, atol=1e-12)
        if p in (1, 2):
            se = per_probe.std(ddof=1) / np.sqrt(n)
            exact_se = np.sqrt(2 * (np.sum(a**2) - np.sum(np.diag(a) ** 2)) / n) / dim
            assert 0.6 * exact_se < se < 1.6 * exact_se
            assert abs(res.moment(p) - np.trace(a) / dim) < 3 * se
            assert hessian.moments(res, p) == res.moment(p) == pytest.approx(np.mean(per_probe), abs=1e-15)
    assert np.trapezoid(res.density, res.grid) == pytest.approx(1, abs=1e-3)


def test_slq_with_order_dim_finds_the_spectrum_with_multiplicities(x64):
    # A diagonal quadratic with repeated eigenvalues, order 100 clipped to
    # dim = 8: each probe's Krylov space holds only the 4 distinct
    # eigenvalues, so Lanczos restarts; the restarted blocks give the other
    # copies, with weight 0. For a normalized Rademacher probe on a diagonal
    # Hessian, vᵀH^p v = Σ d_i^p / dim exactly.
    d = np.array([3.0, 3.0, 3.0, 1.0, 1.0, -2.0, -2.0, 0.5])
    loss_fn = lambda p: 0.5 * jnp.sum(d * p["w"] ** 2)  # noqa: E731
    res = hessian.spectral_density(loss_fn, {"w": jnp.ones(8)}, jax.random.key(0), order=100, n_probes=2)
    assert res.order == 8 and res.nodes.shape == (2, 8) and res.dim == 8
    np.testing.assert_allclose(res.weights.sum(axis=1), 1, atol=1e-12)
    for nodes in res.nodes:
        np.testing.assert_allclose(np.sort(nodes), np.sort(d), atol=1e-10)
    for p in range(5):
        assert res.moment(p) == pytest.approx(np.mean(d**p), abs=1e-10)
    assert np.trapezoid(res.density, res.grid) == pytest.approx(1, abs=1e-3)
    assert res.grid[0] < d.min() and res.grid[-1] > d.max() and res.sigma == pytest.approx(0.05)  # 1% of 5
    record = json.loads(json.dumps(res.to_dict()))
    assert record["loss_info"] == {} and len(record["density"]) == 1000


# ---------------------------------------------------------------------------
# Adam's preconditioned sharpness: λmax(P^{-1/2} H P^{-1/2}) to relative 1e-6.


def _adam_steps(tx, mlp, steps, **update_kwargs):
    """`steps` optimizer updates on the MLP loss (one jitted step): (params, state)."""
    grad = jax.grad(mlp.loss_fn)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(grad(params), state, params, **update_kwargs)
        return optax.apply_updates(params, updates), state

    params, state = mlp.params, tx.init(mlp.params)
    for _ in range(steps):
        params, state = step(params, state)
    return params, state


def _dense_preconditioned_lmax(mlp, params, state, b2, eps=1e-8):
    adam = hessian.find_adam_state(state)[0]
    v_hat = _flat(adam.nu) / (1 - b2 ** int(adam.count))
    d = 1 / np.sqrt(np.sqrt(v_hat) + eps)
    h = np.asarray(_mlp_hessian(params, mlp.batch))
    return np.linalg.eigvalsh(d[:, None] * h * d[None, :])[-1]


def test_preconditioned_top_eigenvalue_matches_dense(mlp):
    lr = 0.01
    params, state = _adam_steps(optax.adam(lr), mlp, 3)
    want = _dense_preconditioned_lmax(mlp, params, state, b2=0.999)
    key = jax.random.key(0)
    res = hessian.preconditioned_top_eigenvalue(mlp.loss_fn, params, state, key, learning_rate=lr, iters=1000)
    assert res.eigenvalue == pytest.approx(want, rel=1e-6)
    assert res.iterations == 66 and res.step == 3 and res.converged and res.residual < 1e-6 * abs(want)
    assert res.gd_threshold == pytest.approx(2 / lr)
    assert res.adam_threshold == pytest.approx(38 / lr)  # (2 + 2·0.9)/((1 − 0.9) η)
    assert (res.b1, res.b2, res.eps) == (0.9, 0.999, 1e-8) and res.loss_info == {"subset": "tiny"}
    json.dumps(res.to_dict())


def test_a_warm_start_from_the_top_eigenvector_is_exact_in_one_step(mlp):
    """start= (lanczos, restarted, preconditioned): from the top eigenvector the first Ritz pair is the answer,
    where a random start after one step is not; a start of the wrong size or zero is refused."""
    top = np.linalg.eigh(mlp.h)
    exact = ravel_pytree(mlp.params)[1](jnp.asarray(top.eigenvectors[:, -1]))  # as a pytree like the params
    key = jax.random.key(0)
    cold = hessian.top_eigenvalues(mlp.loss_fn, mlp.params, key, iters=1)
    warm = hessian.top_eigenvalues(mlp.loss_fn, mlp.params, key, iters=1, start=exact)
    assert warm.eigenvalues[0] == pytest.approx(top.eigenvalues[-1], rel=1e-10) and warm.residuals[0] < 1e-8
    assert cold.eigenvalues[0] < 0.99 * top.eigenvalues[-1]
    flat = hessian.top_eigenvalues(mlp.loss_fn, mlp.params, key, k=2, method="restarted",
                                   start=top.eigenvectors[:, -1])  # fmt: skip
    assert flat.eigenvalues[0] == pytest.approx(top.eigenvalues[-1], rel=1e-10)

    params, state = _adam_steps(optax.adam(0.01), mlp, 3)
    want = _dense_preconditioned_lmax(mlp, params, state, b2=0.999)
    full = hessian.preconditioned_top_eigenvalue(mlp.loss_fn, params, state, key, iters=1000)
    again = hessian.preconditioned_top_eigenvalue(mlp.loss_fn, params, state, key, iters=1, start=full.eigenvector)
    assert again.eigenvalue == pytest.approx(want, rel=1e-10)
    assert "eigenvector" not in full.to_dict()
    with pytest.raises(ValueError, match="start has 3 entries, the parameters 66"):
        hessian.top_eigenvalues(mlp.loss_fn, mlp.params, key, start=np.ones(3))
    with pytest.raises(ValueError, match="start must be a finite, nonzero vector"):
        hessian.preconditioned_top_eigenvalue(mlp.loss_fn, params, state, key, start=np.zeros(66))
    with pytest.raises(ValueError, match="start applies to method='lanczos' and 'restarted'"):
        hessian.top_eigenvalues(mlp.loss_fn, mlp.params, key, method="power", start=exact)


def test_preconditioned_leaves_out_coordinates_adam_never_moved(x64):
    """A parameter with no training gradient (like a bias feeding BatchNorm in train mode) that
    does change the measured loss: its ν̂ = 0 gives P⁻¹ = 1/ε = 1e8, and with it λmax would be
    1e8 × its curvature. Left out, λmax is that of the coordinates Adam moves, and it is counted."""
    rng = np.random.RandomState(0)
    q, _ = np.linalg.qr(rng.randn(4, 4))
    a = q @ np.diag([3.0, 1.0, 0.5, 0.1]) @ q.T
    c = rng.randn(4)
    train_loss = lambda p: 0.5 * p["w"] @ a @ p["w"] + c @ p["w"]  # noqa: E731
    measured_loss = lambda p: train_loss(p) + 50.0 * p["b"] @ p["b"]  # noqa: E731
    params = {"b": jnp.zeros(1), "w": jnp.asarray(rng.randn(4))}
    tx = optax.adam(0.01)
    state = tx.init(params)
    for _ in range(5):
        updates, state = tx.update(jax.grad(train_loss)(params), state, params)
        params = optax.apply_updates(params, updates)
    nu_w = np.asarray(state[0].nu["w"]) / (1 - 0.999**5)
    d = 1 / np.sqrt(np.sqrt(nu_w) + 1e-8)
    want = np.linalg.eigvalsh(d[:, None] * a * d[None, :])[-1]
    key = jax.random.key(0)
    res = hessian.preconditioned_top_eigenvalue(measured_loss, params, state, key, iters=5)
    assert res.eigenvalue == pytest.approx(want, rel=1e-9) and res.excluded == 1 and res.floor == 1e-4
    every = hessian.preconditioned_top_eigenvalue(measured_loss, params, state, key, iters=5, floor=0.0)
    assert every.excluded == 0 and every.eigenvalue == pytest.approx(100.0 / 1e-8, rel=1e-6)  # 2·50 / ε
    with pytest.raises(ValueError, match="floor must be in"):
        hessian.preconditioned_top_eigenvalue(measured_loss, params, state, key, floor=1.0)


@pytest.mark.parametrize("how", ["chain", "inject_hyperparams"])
def test_preconditioned_finds_adam_inside_other_states(mlp, how):
    # Adam after clipping in a chain: found; no learning rate given, so the
    # thresholds are unknown. Adam under inject_hyperparams: η, β₁, β₂ are
    # read from the injected hyperparameters.
    if how == "chain":
        tx, b2 = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.01)), 0.999
    else:
        tx, b2 = optax.inject_hyperparams(optax.adam)(learning_rate=0.02, b1=0.8, b2=0.99), 0.99
    params, state = _adam_steps(tx, mlp, 2)
    res = hessian.preconditioned_top_eigenvalue(mlp.loss_fn, params, state, jax.random.key(0), iters=1000)
    assert res.eigenvalue == pytest.approx(_dense_preconditioned_lmax(mlp, params, state, b2=b2), rel=1e-6)
    assert res.step == 2 and res.b2 == b2
    if how == "chain":
        assert res.learning_rate is None and res.gd_threshold is None and res.adam_threshold is None
    else:
        assert (res.learning_rate, res.b1) == pytest.approx((0.02, 0.8))
        assert res.gd_threshold == pytest.approx(100) and res.adam_threshold == pytest.approx(3.6 / (0.2 * 0.02))


def test_find_adam_state_inside_sam_and_named_chains(mlp):
    tx = optax.chain(
        sam_transform(rho=0.05), optax.named_chain(("clip", optax.clip(1.0)), ("adam", optax.adam(0.01)))
    )
    adam, injected = hessian.find_adam_state(tx.init(mlp.params))
    assert isinstance(adam, optax.ScaleByAdamState) and injected == {}
    assert jax.tree.structure(adam.nu) == jax.tree.structure(mlp.params)


def test_missing_or_ambiguous_adam_state_is_a_clear_error(mlp):
    loss_fn, params, key = mlp.loss_fn, mlp.params, jax.random.key(0)
    with pytest.raises(ValueError, match=r"expected exactly one optax.ScaleByAdamState .* found none"):
        hessian.preconditioned_top_eigenvalue(loss_fn, params, optax.sgd(0.1, momentum=0.9).init(params), key)
    two = optax.chain(optax.adam(0.1), optax.adam(0.1)).init(params)
    with pytest.raises(ValueError, match="found 2 of them"):
        hessian.preconditioned_top_eigenvalue(loss_fn, params, two, key)
    with pytest.raises(ValueError, match="count 0"):
        hessian.preconditioned_top_eigenvalue(loss_fn, params, optax.adam(0.1).init(params), key)


# ---------------------------------------------------------------------------
# Bad input.


def test_restarted_with_too_few_parameters_for_a_krylov_space_is_exact_lanczos():
    loss = lambda w: 0.5 * jnp.sum(jnp.array([4.0, 1.0, -2.0]) * w**2)  # noqa: E731
    res = hessian.top_eigenvalues(loss, jnp.zeros(3), jax.random.key(0), k=2, method="restarted")
    np.testing.assert_allclose(res.eigenvalues, [4.0, 1.0], rtol=1e-6)
    assert res.iterations == 3 and res.converged and res.method == "restarted"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "arnoldi"}, "unknown method 'arnoldi'"),
        ({"k": 0}, "k must be an integer >= 1"),
        ({"k": 67}, "exceeds the number of parameters"),
        ({"iters": 0}, "iters must be >= 1"),
    ],
)
def test_bad_eigen_arguments(mlp, kwargs, message):
    loss_fn, params = mlp.loss_fn, mlp.params
    with pytest.raises(ValueError, match=message) as info:
        hessian.top_eigenvalues(loss_fn, params, jax.random.key(0), **kwargs)
    assert "\n" not in str(info.value)


def test_bad_trace_and_density_arguments(mlp):
    loss_fn, params = mlp.loss_fn, mlp.params
    with pytest.raises(ValueError, match="n must be an integer >= 2"):
        hessian.hessian_trace(loss_fn, params, jax.random.key(0), n=1)
    with pytest.raises(ValueError, match="order must be"):
        hessian.spectral_density(loss_fn, params, jax.random.key(0), order=0)
    with pytest.raises(ValueError, match=r"probes must have shape \(n_probes, 66\)"):
        hessian.spectral_density(loss_fn, params, jax.random.key(0), probes=np.ones((2, 5)))
