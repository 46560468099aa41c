"""Friendly-SAM, VaSSO and Momentum-SAM against hand-written references of their papers' update rules.

Tolerances (float64): a transform and its reference compute the same
expressions with different summation orders (tree norms, vdots over the
~60 parameters of the MLP), so they differ by about n·eps ≈ 60 · 2.2e-16 ≈
1.3e-14 relative per step; the perturbation moves the evaluation point by that
much times ρ, and the MLP's loss has gradient Lipschitz constant O(1), so
after a few steps 1e-12 (absolute and relative) leaves a margin of about 50.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsam
from jaxsam.sam import friendly_sam_transform, gradient_point, momentum_sam_transform, sam_transform, vasso_transform

TOL = 1e-12


def _f64(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float64), tree)


def _flat(tree):
    return jax.flatten_util.ravel_pytree(tree)


def _close(a, b, tol=TOL):
    chex.assert_trees_all_close(a, b, atol=tol, rtol=tol)


def _run(tx, loss, params, batches, lr=0.1):
    """SGD through `tx` over `batches` (each step's gradient at gradient_point); the per-step updates."""
    state, out = tx.init(params), []
    for batch in batches:
        g = jax.grad(loss)(gradient_point(state, params), batch)
        updates, state = tx.update(g, state, params, grad_fn=lambda p, b=batch: jax.grad(loss)(p, b))
        out.append(updates)
        params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
    return out, state


def _batches(batch, n):
    """n different minibatches: the fixture's batch with its rows rolled, so the gradients differ between steps."""
    x, y = batch
    return [(jnp.roll(x, 3 * i, axis=0)[:12], jnp.roll(y, 3 * i, axis=0)[:12]) for i in range(n)]


# ---------------------------------------------------------------------------
# Friendly-SAM: m_t = λ m_{t−1} + (1−λ) g_t, d_t = g_t − σ m_t, ε_t = ρ d_t/‖d_t‖.


def _reference_fsam(loss, params, batches, rho, sigma, lmbda, lr=0.1):
    w, unravel = _flat(params)
    m, out = jnp.zeros_like(w), []
    grad = lambda v, b: _flat(jax.grad(loss)(unravel(v), b))[0]  # noqa: E731
    for batch in batches:
        g = grad(w, batch)
        m = lmbda * m + (1 - lmbda) * g
        d = g - sigma * m
        u = grad(w + rho * d / jnp.linalg.norm(d), batch)
        out.append(unravel(u))
        w = w - lr * u
    return out


@pytest.mark.parametrize("sigma, lmbda", [(1.0, 0.6), (0.5, 0.95)])
def test_friendly_sam_equals_its_formula(x64, mlp_problem, sigma, lmbda):
    params, batch, loss = mlp_problem
    params, batches = _f64(params), _batches(batch, 4)
    got, state = _run(friendly_sam_transform(0.1, sigma, lmbda), loss, params, batches)
    for g, want in zip(got, _reference_fsam(loss, params, batches, 0.1, sigma, lmbda)):
        _close(g, want)
    assert int(state.count) == 4
    # Not vacuous: F-SAM's update differs from SAM's after the first step.
    sam, _ = _run(sam_transform(0.1), loss, params, batches)
    assert optax.tree.norm(optax.tree.sub(got[2], sam[2])) > 1e-4


def test_friendly_sam_sigma_zero_is_sam(x64, mlp_problem):
    params, batch, loss = mlp_problem
    batches = _batches(batch, 3)
    for got, want in zip(_run(friendly_sam_transform(0.1, sigma=0.0), loss, _f64(params), batches)[0],
                         _run(sam_transform(0.1), loss, _f64(params), batches)[0]):  # fmt: skip
        _close(got, want)


# ---------------------------------------------------------------------------
# VaSSO: d_t = (1−θ) d_{t−1} + θ g_t with d_0 = g_0, ε_t = ρ d_t/‖d_t‖.


def _reference_vasso(loss, params, batches, rho, theta, lr=0.1):
    w, unravel = _flat(params)
    d, out = None, []
    grad = lambda v, b: _flat(jax.grad(loss)(unravel(v), b))[0]  # noqa: E731
    for batch in batches:
        g = grad(w, batch)
        d = g if d is None else (1 - theta) * d + theta * g
        u = grad(w + rho * d / jnp.linalg.norm(d), batch)
        out.append(unravel(u))
        w = w - lr * u
    return out


@pytest.mark.parametrize("theta", [0.4, 0.9])
def test_vasso_equals_its_formula(x64, mlp_problem, theta):
    params, batch, loss = mlp_problem
    params, batches = _f64(params), _batches(batch, 4)
    got, _ = _run(vasso_transform(0.1, theta), loss, params, batches)
    for g, want in zip(got, _reference_vasso(loss, params, batches, 0.1, theta)):
        _close(g, want)
    sam, _ = _run(sam_transform(0.1), loss, params, batches)
    _close(got[0], sam[0])  # d_0 = g_0: the first step is SAM's
    assert optax.tree.norm(optax.tree.sub(got[2], sam[2])) > 1e-4


def test_vasso_theta_one_is_sam(x64, mlp_problem):
    params, batch, loss = mlp_problem
    batches = _batches(batch, 3)
    for got, want in zip(_run(vasso_transform(0.1, theta=1.0), loss, _f64(params), batches)[0],
                         _run(sam_transform(0.1), loss, _f64(params), batches)[0]):  # fmt: skip
        _close(got, want)


# ---------------------------------------------------------------------------
# Momentum-SAM, the paper's Figure 1 with SGD: w̃ = w − ρ v/‖v‖, g = ∇L(w̃), v ← μ v + g, w ← w − η v.


def _reference_msam(loss, params, batches, rho, mu, lr):
    w, unravel = _flat(params)
    v, trajectory = jnp.zeros_like(w), []
    for batch in batches:
        norm = jnp.linalg.norm(v)
        w_tilde = w if norm == 0 else w - rho * v / norm  # v_0 = 0: no perturbation on the first step
        g = _flat(jax.grad(loss)(unravel(w_tilde), batch))[0]
        v = mu * v + g
        w = w - lr * v
        trajectory.append(unravel(w))
    return trajectory


def test_momentum_sam_with_sgd_equals_the_papers_algorithm(x64, mlp_problem):
    params, batch, loss = mlp_problem
    params, batches = _f64(params), _batches(batch, 6)
    tx = optax.chain(momentum_sam_transform(rho=0.3, momentum=0.9), optax.sgd(0.05, momentum=0.9))
    state, w, trajectory = tx.init(params), params, []
    for b in batches:
        g = jax.grad(loss)(gradient_point(state, w), b)
        updates, state = tx.update(g, state, w)
        w = optax.apply_updates(w, updates)
        trajectory.append(w)
    for got, want in zip(trajectory, _reference_msam(loss, params, batches, 0.3, 0.9, 0.05)):
        _close(got, want)
    # Its momentum is SGD's trace (same μ, nothing chained between them), and the point it names is ρ from w.
    _close(state[0].momentum, state[1][0].trace)
    np.testing.assert_allclose(optax.tree.norm(optax.tree.sub(gradient_point(state, w), w)), 0.3, rtol=1e-12)
    plain = params
    sgd = optax.sgd(0.05, momentum=0.9)
    s = sgd.init(plain)
    for b in batches:
        u, s = sgd.update(jax.grad(loss)(plain, b), s, plain)
        plain = optax.apply_updates(plain, u)
    assert optax.tree.norm(optax.tree.sub(w, plain)) > 1e-4  # the perturbation changed the trajectory


def test_momentum_sam_with_adam_perturbs_along_adams_first_moment(x64, mlp_problem):
    """An average μ m + (1−μ) g has the direction of the sum μ v + g, so momentum=b1 gives Adam's m/‖m‖."""
    params, batch, loss = mlp_problem
    params = _f64(params)
    tx = optax.chain(momentum_sam_transform(rho=0.2, momentum=0.9), optax.adam(1e-2, b1=0.9))
    state, w = tx.init(params), params
    for b in _batches(batch, 4):
        g = jax.grad(loss)(gradient_point(state, w), b)
        updates, state = tx.update(g, state, w)
        w = optax.apply_updates(w, updates)
    mu = state[1][0].mu
    want = jax.tree.map(lambda p, m: p - 0.2 * m / optax.tree.norm(mu), w, mu)
    _close(gradient_point(state, w), want)


def test_momentum_sam_takes_one_gradient_per_step(mlp_problem):
    """The jitted step evaluates the loss's gradient once: at the point the transform names."""
    params, batch, loss = mlp_problem
    calls = []

    def counted_loss(p, b):
        jax.debug.callback(lambda: calls.append(1))
        return loss(p, b)

    tx = optax.chain(momentum_sam_transform(rho=0.5), optax.sgd(0.1, momentum=0.9))

    @jax.jit
    def step(params, state):
        g = jax.grad(counted_loss)(gradient_point(state, params), batch)
        updates, state = tx.update(g, state, params, grad_fn=lambda p: jax.grad(counted_loss)(p, batch))
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for _ in range(5):
        params, state = step(params, state)
    jax.effects_barrier()
    assert len(calls) == 5


def test_momentum_sam_rho_schedule_is_read_for_the_step_that_uses_it(x64, mlp_problem):
    params, batch, loss = mlp_problem
    params = _f64(params)
    schedule = optax.linear_schedule(0.0, 0.4, transition_steps=4)  # step t uses ρ = 0.1 t
    tx = momentum_sam_transform(rho=schedule)
    state = tx.init(params)
    for step in range(4):
        point = gradient_point(state, params)
        if step > 0:
            np.testing.assert_allclose(optax.tree.norm(optax.tree.sub(point, params)), 0.1 * step, rtol=1e-6)
        _, state = tx.update(jax.grad(loss)(point, batch), state, params)


@pytest.mark.parametrize("axis", [None, "data"], ids=["one", "mapped"])
def test_momentum_sam_mask_and_devices(x64, mlp_problem, axis):
    """mask: the point moves only the kernels; axis_name: one momentum of the averaged gradient on every shard."""
    params, (x, y), loss = mlp_problem
    params = _f64(params)
    tx = momentum_sam_transform(0.2, mask=jaxsam.kernels_only_mask, axis_name=axis)
    if axis is None:
        state = tx.init(params)
        _, state = tx.update(jax.grad(loss)(params, (x, y)), state, params)
        point = gradient_point(state, params)
        for name in params:
            chex.assert_trees_all_equal(point[name]["bias"], params[name]["bias"])
            assert jnp.any(point[name]["kernel"] != params[name]["kernel"])
        return
    shards = (x.reshape(4, 4, 5), y.reshape(4, 4))

    def per_device(shard):
        state = tx.init(params)
        return tx.update(jax.grad(loss)(params, shard), state, params)

    updates, states = jax.vmap(per_device, axis_name="data")(shards)
    mean = jax.tree.map(lambda *g: sum(g) / 4, *[jax.grad(loss)(params, (shards[0][i], shards[1][i])) for i in range(4)])
    for i in range(4):
        _close(jax.tree.map(lambda u: u[i], updates), mean)
        masked = jax.tree.map(lambda g, m: jnp.where(m, g, 0.0), mean, jaxsam.kernels_only_mask(params))
        _close(jax.tree.map(lambda v: v[i], states.momentum), masked)


# ---------------------------------------------------------------------------
# Injected and swept hyperparameters of the new members.


@pytest.mark.parametrize(
    "factory, kwargs",
    [
        (friendly_sam_transform, dict(rho=0.1, sigma=1.0, lmbda=0.6)),
        (vasso_transform, dict(rho=0.1, theta=0.4)),
        (momentum_sam_transform, dict(rho=0.3, momentum=0.9)),
    ],
    ids=["fsam", "vasso", "msam"],
)
def test_injected_hyperparameters_under_jit_equal_the_fixed_transform(x64, mlp_problem, factory, kwargs):
    params, batch, loss = mlp_problem
    params, batches = _f64(params), _batches(batch, 3)
    injected = optax.inject_hyperparams(factory)(**kwargs)
    fixed = factory(**kwargs)

    @jax.jit
    def step(state, params, batch):
        g = jax.grad(loss)(gradient_point(state, params), batch)
        return injected.update(g, state, params, grad_fn=lambda p: jax.grad(loss)(p, batch))

    want, _ = _run(fixed, loss, params, batches, lr=0.0)  # lr 0: the same params every step
    state = injected.init(params)
    for b, w in zip(batches, want):
        got, state = step(state, params, b)
        _close(got, w)
    assert step._cache_size() == 1
