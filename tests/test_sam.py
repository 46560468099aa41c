"""The SAM family against hand-written references, exact reductions and a 2-D landscape."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import jaxsam
from jaxsam.sam import (
    friendly_sam_transform,
    gradient_point,
    gsam_transform,
    looksam_transform,
    momentum_sam_transform,
    sam_transform,
    vasso_transform,
)


def _grad_fn(loss, batch):
    return lambda p: jax.grad(loss)(p, batch)


def _tree_close(a, b, tol):
    chex.assert_trees_all_close(a, b, atol=tol, rtol=tol)


def _reference_sam(loss, params, batch, rho):
    """Two-pass SAM written out: ε = ρ g/‖g‖, gradient at w + ε."""
    g = jax.grad(loss)(params, batch)
    norm = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g)))
    perturbed = jax.tree.map(lambda w, gi: w + rho * gi / norm, params, g)
    return jax.grad(loss)(perturbed, batch)


def _reference_asam(loss, params, batch, rho, eta):
    """ASAM (Kwon et al. 2021): ε = ρ T²g/‖Tg‖, T = |w| + η."""
    g = jax.grad(loss)(params, batch)
    t = jax.tree.map(lambda w: jnp.abs(w) + eta, params)
    norm = jnp.sqrt(sum(jnp.sum((ti * gi) ** 2) for ti, gi in zip(jax.tree.leaves(t), jax.tree.leaves(g))))
    perturbed = jax.tree.map(lambda w, ti, gi: w + rho * ti * ti * gi / norm, params, t, g)
    return jax.grad(loss)(perturbed, batch)


def _one_update(tx, loss, params, batch):
    state = tx.init(params)
    g = jax.grad(loss)(params, batch)
    updates, _ = tx.update(g, state, params, grad_fn=_grad_fn(loss, batch))
    return updates


# ---------------------------------------------------------------------------
# Against references.


def test_sam_equals_two_pass_reference(x64, mlp_problem):
    params, batch, loss = mlp_problem
    params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
    got = _one_update(sam_transform(rho=0.1), loss, params, batch)
    _tree_close(got, _reference_sam(loss, params, batch, 0.1), 1e-6)
    # The perturbation really moved the gradient (the check is not vacuous).
    clean = jax.grad(loss)(params, batch)
    assert optax.tree.norm(optax.tree.sub(got, clean)) > 1e-3


def test_sam_chained_with_sgd_is_minus_lr_times_reference(x64, mlp_problem):
    params, batch, loss = mlp_problem
    params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
    got = _one_update(optax.chain(sam_transform(rho=0.05), optax.sgd(0.1)), loss, params, batch)
    expected = jax.tree.map(lambda g: -0.1 * g, _reference_sam(loss, params, batch, 0.05))
    _tree_close(got, expected, 1e-6)


def test_asam_equals_its_formula(x64, mlp_problem):
    params, batch, loss = mlp_problem
    params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
    got = _one_update(sam_transform(rho=0.5, adaptive=True, eta=0.01), loss, params, batch)
    _tree_close(got, _reference_asam(loss, params, batch, 0.5, 0.01), 1e-6)
    assert optax.tree.norm(optax.tree.sub(got, _reference_sam(loss, params, batch, 0.5))) > 1e-3


def test_sam_perturbation_norm_is_rho(x64, mlp_problem):
    params, batch, loss = mlp_problem
    g = jax.grad(loss)(params, batch)
    eps = jaxsam.sam_perturbation(g, params, 0.07)
    np.testing.assert_allclose(optax.tree.norm(eps), 0.07, rtol=1e-10)
    # ASAM: the scaled perturbation T^-1 ε has norm ρ.
    eps = jaxsam.sam_perturbation(g, params, 0.07, adaptive=True, eta=0.01)
    scaled = jax.tree.map(lambda e, w: e / (jnp.abs(w) + 0.01), eps, params)
    np.testing.assert_allclose(optax.tree.norm(scaled), 0.07, rtol=1e-10)


def test_mask_perturbs_only_selected_parameters(x64, mlp_problem):
    params, batch, loss = mlp_problem
    g = jax.grad(loss)(params, batch)
    eps = jaxsam.sam_perturbation(g, params, 0.1, mask=jaxsam.kernels_only_mask)
    for layer in eps.values():
        assert jnp.all(layer["bias"] == 0)
        assert jnp.any(layer["kernel"] != 0)
    kernels_norm = jnp.sqrt(sum(jnp.sum(layer["kernel"] ** 2) for layer in g.values()))
    for name, layer in eps.items():
        _tree_close(layer["kernel"], 0.1 * g[name]["kernel"] / kernels_norm, 1e-10)
    # Through the transform: gradient at w + ε with the masked ε.
    got = _one_update(sam_transform(rho=0.1, mask=jaxsam.kernels_only_mask), loss, params, batch)
    expected = jax.grad(loss)(jax.tree.map(jnp.add, params, eps), batch)
    _tree_close(got, expected, 1e-10)


def test_rho_schedule_uses_the_transforms_step_count(x64, mlp_problem):
    params, batch, loss = mlp_problem
    schedule = optax.linear_schedule(0.0, 0.3, transition_steps=3)  # 0, 0.1, 0.2, 0.3
    tx = sam_transform(rho=schedule)
    state = tx.init(params)
    g = jax.grad(loss)(params, batch)
    for step in range(4):
        updates, state = tx.update(g, state, params, grad_fn=_grad_fn(loss, batch))
        if step == 0:
            chex.assert_trees_all_equal(updates, g)  # ρ = 0 exactly
        else:
            # optax evaluates the schedule in float32: agreement to its precision.
            _tree_close(updates, _reference_sam(loss, params, batch, 0.1 * step), 1e-6)
    assert int(state.count) == 4


def test_rho_following_lr():
    lr = optax.linear_schedule(0.1, 0.0, transition_steps=10)
    rho = jaxsam.rho_following_lr(lr, rho_max=0.05, rho_min=0.01, lr_max=0.1)
    np.testing.assert_allclose([rho(0), rho(5), rho(10)], [0.05, 0.03, 0.01], rtol=1e-6)


# ---------------------------------------------------------------------------
# Exact reductions.


@pytest.mark.parametrize(
    "make_sam",
    [
        lambda rho: sam_transform(rho=rho),
        lambda rho: sam_transform(rho=rho, adaptive=True),
        lambda rho: gsam_transform(rho=rho, alpha=0.2),
        lambda rho: looksam_transform(rho=rho, k=3),
        lambda rho: friendly_sam_transform(rho=rho),
        lambda rho: vasso_transform(rho=rho),
        lambda rho: momentum_sam_transform(rho=rho),
    ],
    ids=["sam", "asam", "gsam", "looksam", "fsam", "vasso", "msam"],
)
@pytest.mark.parametrize("rho", [0.0, optax.constant_schedule(0.0)], ids=["float", "schedule"])
@pytest.mark.parametrize("base", [lambda: optax.sgd(0.1, momentum=0.9), lambda: optax.adam(1e-2)], ids=["sgd", "adam"])
def test_rho_zero_is_exactly_the_base_optimizer(mlp_problem, make_sam, rho, base):
    params, batch, loss = mlp_problem
    tx_sam, tx_base = optax.chain(make_sam(rho), base()), base()
    p_sam, p_base = params, params
    s_sam, s_base = tx_sam.init(params), tx_base.init(params)
    for _ in range(3):
        # gradient_point is p_sam itself except for Momentum-SAM, whose gradient is taken at w + ε.
        g_sam, g_base = jax.grad(loss)(gradient_point(s_sam, p_sam), batch), jax.grad(loss)(p_base, batch)
        u_sam, s_sam = tx_sam.update(g_sam, s_sam, p_sam, grad_fn=_grad_fn(loss, batch))
        u_base, s_base = tx_base.update(g_base, s_base, p_base)
        p_sam, p_base = optax.apply_updates(p_sam, u_sam), optax.apply_updates(p_base, u_base)
    chex.assert_trees_all_equal(p_sam, p_base)


def test_gsam_alpha_zero_is_sam(x64, mlp_problem):
    params, batch, loss = mlp_problem
    _tree_close(
        _one_update(gsam_transform(rho=0.1, alpha=0.0), loss, params, batch),
        _one_update(sam_transform(rho=0.1), loss, params, batch),
        1e-12,
    )


def test_gsam_equals_its_formula(x64, mlp_problem):
    params, batch, loss = mlp_problem
    g = jax.grad(loss)(params, batch)
    g_p = _reference_sam(loss, params, batch, 0.1)
    flat_g, unravel = jax.flatten_util.ravel_pytree(g)
    flat_p, _ = jax.flatten_util.ravel_pytree(g_p)
    orthogonal = flat_g - (flat_g @ flat_p) / (flat_p @ flat_p) * flat_p
    assert abs(orthogonal @ flat_p) < 1e-10
    expected = unravel(flat_p - 0.3 * orthogonal)
    _tree_close(_one_update(gsam_transform(rho=0.1, alpha=0.3), loss, params, batch), expected, 1e-10)


def _run_steps(tx, loss, params, batch, steps, lr=0.1):
    """`steps` SGD steps through `tx`; returns the list of per-step updates."""
    state = tx.init(params)
    out = []
    for _ in range(steps):
        g = jax.grad(loss)(params, batch)
        updates, state = tx.update(g, state, params, grad_fn=_grad_fn(loss, batch))
        out.append(updates)
        params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
    return out


def test_looksam_k1_is_sam(x64, mlp_problem):
    params, batch, loss = mlp_problem
    for got, expected in zip(
        _run_steps(looksam_transform(rho=0.1, k=1), loss, params, batch, 4),
        _run_steps(sam_transform(rho=0.1), loss, params, batch, 4),
    ):
        _tree_close(got, expected, 1e-12)


def test_looksam_reuses_the_orthogonal_direction(x64, mlp_problem):
    params, batch, loss = mlp_problem
    tx = looksam_transform(rho=0.1, k=5, alpha=0.7)
    state = tx.init(params)
    g0 = jax.grad(loss)(params, batch)
    u0, state = tx.update(g0, state, params, grad_fn=_grad_fn(loss, batch))
    g_s = _reference_sam(loss, params, batch, 0.1)
    _tree_close(u0, g_s, 1e-10)
    flat_g, _ = jax.flatten_util.ravel_pytree(g0)
    flat_s, unravel = jax.flatten_util.ravel_pytree(g_s)
    g_v = flat_s - (flat_g @ flat_s) / (flat_g @ flat_g) * flat_g
    _tree_close(state.orthogonal, unravel(g_v), 1e-10)
    # A later step inside the window: g + α ‖g‖/‖g_v‖ g_v, no second gradient.
    params1 = jax.tree.map(lambda p, u: p - 0.1 * u, params, u0)
    g1 = jax.grad(loss)(params1, batch)
    u1, _ = tx.update(g1, state, params1, grad_fn=_grad_fn(loss, batch))
    flat_g1, _ = jax.flatten_util.ravel_pytree(g1)
    expected = flat_g1 + 0.7 * jnp.linalg.norm(flat_g1) / jnp.linalg.norm(g_v) * g_v
    _tree_close(u1, unravel(expected), 1e-10)


def test_looksam_evaluates_the_second_gradient_one_step_in_k(mlp_problem):
    params, batch, loss = mlp_problem
    calls = []

    def counting_grad_fn(p):
        jax.debug.callback(lambda: calls.append(1))
        return jax.grad(loss)(p, batch)

    tx = optax.chain(looksam_transform(rho=0.05, k=5), optax.sgd(0.1))

    @jax.jit
    def step(params, state):
        g = jax.grad(loss)(params, batch)
        updates, state = tx.update(g, state, params, grad_fn=counting_grad_fn)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for _ in range(20):
        params, state = step(params, state)
    jax.effects_barrier()
    assert len(calls) == 4  # steps 0, 5, 10, 15


def test_looksam_static_branch_equals_the_conditional(x64, mlp_problem):
    """`sam_step=(t % k == 0)` (the CPU train loop's two compiled steps) gives the lax.cond updates exactly."""
    params, batch, loss = mlp_problem
    tx = looksam_transform(rho=0.1, k=3, alpha=0.7)
    states = [tx.init(params), tx.init(params)]
    for t in range(7):
        g = jax.grad(loss)(params, batch)
        u_cond, states[0] = tx.update(g, states[0], params, grad_fn=_grad_fn(loss, batch))
        u_static, states[1] = tx.update(g, states[1], params, grad_fn=_grad_fn(loss, batch), sam_step=t % 3 == 0)
        _tree_close(u_static, u_cond, 1e-14)
        params = jax.tree.map(lambda p, u: p - 0.1 * u, params, u_cond)


# ---------------------------------------------------------------------------
# Behaviour: a flat and a sharp minimum.


def _two_valleys(w):
    """Minima at (±1, 0). Curvature across the valley is e^{3x}: λmax = 20.1 at
    (1, 0) (sharp) and 0.4 at (-1, 0) (flat), separated by a low ridge at x = 0."""
    x, y = w[0], w[1]
    return 0.05 * (x**2 - 1.0) ** 2 + 0.5 * jnp.exp(3.0 * x) * y**2


def _descend(tx, w0, steps=3000):
    grad = jax.grad(_two_valleys)

    def body(carry, _):
        w, state = carry
        updates, state = tx.update(grad(w), state, w, grad_fn=grad)
        return (optax.apply_updates(w, updates), state), None

    (w, _), _ = jax.jit(lambda w: jax.lax.scan(body, (w, tx.init(w)), None, length=steps))(w0)
    return w


@pytest.mark.parametrize("start", [(1.0, 0.55), (1.1, 0.5), (1.2, 0.45)])
def test_gradient_descent_ends_sharp_and_sam_ends_flat(x64, start):
    w0 = jnp.array(start)
    gd = _descend(optax.sgd(0.05), w0)
    sam = _descend(optax.chain(sam_transform(rho=0.3), optax.sgd(0.05)), w0)
    np.testing.assert_allclose(gd, [1.0, 0.0], atol=1e-3)
    np.testing.assert_allclose(sam, [-1.0, 0.0], atol=1e-2)
    lambda_max = lambda w: jnp.linalg.eigvalsh(jax.hessian(_two_valleys)(w))[-1]  # noqa: E731
    assert lambda_max(gd) > 20.0 > 0.5 > lambda_max(sam)


# ---------------------------------------------------------------------------
# Robustness, jit, checkpointing, devices.


@pytest.mark.parametrize(
    "tx",
    [sam_transform(0.05), sam_transform(0.05, adaptive=True), gsam_transform(0.05, 0.1), looksam_transform(0.05, 2),
     friendly_sam_transform(0.05), vasso_transform(0.05), momentum_sam_transform(3.0)],
    ids=["sam", "asam", "gsam", "looksam", "fsam", "vasso", "msam"],
)
def test_zero_gradient_gives_finite_updates(mlp_problem, tx):
    params, _, _ = mlp_problem
    zeros = optax.tree.zeros_like(params)
    state = tx.init(params)
    for _ in range(3):
        updates, state = tx.update(zeros, state, params, grad_fn=lambda p: zeros)
        chex.assert_tree_all_finite((updates, state, gradient_point(state, params)))


@pytest.mark.parametrize(
    "make_sam",
    [lambda: sam_transform(0.05), lambda: gsam_transform(0.05, 0.1), lambda: looksam_transform(0.05, k=3),
     lambda: friendly_sam_transform(0.05), lambda: vasso_transform(0.05), lambda: momentum_sam_transform(3.0),
     lambda: sam_transform(0.05, has_aux=True)],
    ids=["sam", "gsam", "looksam", "fsam", "vasso", "msam", "sam_aux"],
)
@pytest.mark.parametrize(
    "make_base",
    [
        lambda: optax.sgd(0.1, momentum=0.9),
        lambda: optax.adam(1e-3),
        lambda: optax.adamw(1e-3, weight_decay=5e-4),
        lambda: optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9)),
    ],
    ids=["sgd", "adam", "adamw", "decay+sgd"],
)
def test_jit_and_checkpointed_state_give_the_same_next_update(tmp_path, mlp_problem, make_sam, make_base):
    params, batch, loss = mlp_problem
    tx = optax.chain(make_sam(), make_base())
    with_loss = lambda p: (jax.grad(loss)(p, batch), loss(p, batch))  # noqa: E731 (has_aux: the perturbed loss)

    @jax.jit
    def step(params, state):
        g = jax.grad(loss)(gradient_point(state, params), batch)
        grad_fn = with_loss if isinstance(state[0], jaxsam.AuxState) else _grad_fn(loss, batch)
        updates, state = tx.update(g, state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state, updates

    state = tx.init(params)
    for _ in range(2):
        params, state, _ = step(params, state)
    # Save and restore the whole optimizer state with orbax, as training will.
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "state", state)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(tmp_path / "state", jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
    chex.assert_trees_all_equal_structs(restored, state)
    _, _, expected = step(params, state)
    _, _, got = step(params, restored)
    chex.assert_trees_all_equal(got, expected)
    # The eager (un-jitted) update agrees with the jitted one.
    g = jax.grad(loss)(gradient_point(restored, params), batch)
    grad_fn = with_loss if isinstance(restored[0], jaxsam.AuxState) else _grad_fn(loss, batch)
    eager, _ = tx.update(g, restored, params, grad_fn=grad_fn)
    _tree_close(eager, expected, 1e-6)


@pytest.mark.parametrize("make_sam", [sam_transform, gsam_transform, looksam_transform], ids=["sam", "gsam", "looksam"])
def test_axis_name_perturbs_each_shard_with_its_own_gradient(x64, mlp_problem, make_sam):
    """m-sharpness: per-shard SAM gradients, averaged over the mapped axis."""
    params, (x, y), loss = mlp_problem
    shards = (x.reshape(4, 4, 5), y.reshape(4, 4))
    tx = make_sam(0.1, axis_name="data")
    state = tx.init(params)

    def per_device(shard):
        g = jax.grad(loss)(params, shard)
        updates, _ = tx.update(g, state, params, grad_fn=_grad_fn(loss, shard))
        return updates

    got = jax.vmap(per_device, axis_name="data")(shards)
    per_shard = [_reference_sam(loss, params, (shards[0][i], shards[1][i]), 0.1) for i in range(4)]
    expected_sam = jax.tree.map(lambda *leaves: sum(leaves) / 4, *per_shard)
    for i in range(4):  # every device ends with the same averaged result
        got_i = jax.tree.map(lambda leaf: leaf[i], got)
        if make_sam is sam_transform:
            _tree_close(got_i, expected_sam, 1e-10)
        else:  # step 0: GSAM/LookSAM decompose the averaged gradients; alpha terms differ from SAM
            chex.assert_tree_all_finite(got_i)
            _tree_close(got_i, jax.tree.map(lambda leaf: leaf[0], got), 1e-12)
    # The averaged SAM gradient differs from SAM on the whole batch: m-sharpness is real.
    whole = _reference_sam(loss, params, (x, y), 0.1)
    assert optax.tree.norm(optax.tree.sub(expected_sam, whole)) > 1e-4


# ---------------------------------------------------------------------------
# Bad arguments.


@pytest.mark.parametrize(
    "build, error, message",
    [
        (lambda: sam_transform(rho=-0.1), ValueError, r"rho must be a finite number >= 0 \(got -0.1\); e.g. sam_transform\(rho=0.05\)"),
        (lambda: sam_transform(rho="big"), TypeError, "rho must be a number, an array or an optax schedule"),
        (lambda: sam_transform(rho=0.5, adaptive=True, eta=-1.0), ValueError, "eta must be >= 0"),
        (lambda: gsam_transform(rho=-1.0), ValueError, "gsam_transform: rho must be"),
        (lambda: gsam_transform(rho=0.05, alpha=float("nan")), ValueError, "alpha must be a finite number"),
        (lambda: looksam_transform(rho=0.05, k=0), ValueError, r"k must be an integer >= 1 \(got 0\)"),
        (lambda: looksam_transform(rho=0.05, k=2.5), ValueError, "k must be an integer >= 1"),
        (lambda: looksam_transform(rho=0.05, alpha=-0.1), ValueError, "alpha must be >= 0"),
        (lambda: sam_transform(adaptive=True, adaptive_leaves="kernel"), ValueError,
         "adaptive_leaves must be one of all, weights, kernels"),
        (lambda: friendly_sam_transform(rho=-1.0), ValueError, "friendly_sam_transform: rho must be"),
        (lambda: friendly_sam_transform(lmbda=1.0), ValueError, r"lmbda must be in \[0, 1\) \(got 1.0\)"),
        (lambda: friendly_sam_transform(sigma=-1.0), ValueError, "sigma must be >= 0"),
        (lambda: vasso_transform(theta=0.0), ValueError, r"theta must be in \(0, 1\] \(got 0.0\)"),
        (lambda: momentum_sam_transform(rho=-3.0), ValueError, r"rho must be a finite number >= 0 .* momentum_sam"),
        (lambda: momentum_sam_transform(momentum=1.0), ValueError, r"momentum must be in \[0, 1\)"),
    ],
)
def test_bad_arguments_say_how_to_call(build, error, message):
    with pytest.raises(error, match=message):
        build()


@pytest.mark.parametrize("make_sam", [sam_transform, gsam_transform, looksam_transform, friendly_sam_transform,
                                      vasso_transform])
def test_missing_grad_fn_or_params_says_how_to_call(mlp_problem, make_sam):
    params, batch, loss = mlp_problem
    tx = optax.chain(make_sam(0.05), optax.sgd(0.1))
    state = tx.init(params)
    g = jax.grad(loss)(params, batch)
    with pytest.raises(TypeError, match=r"needs grad_fn.*grad_fn=lambda p: jax.grad\(loss_fn\)\(p, batch\)"):
        tx.update(g, state, params)
    with pytest.raises(TypeError, match="needs the current params"):
        tx.update(g, state, grad_fn=_grad_fn(loss, batch))
    with pytest.raises(TypeError, match="grad_fn must be a function"):
        tx.update(g, state, params, grad_fn=g)


@pytest.mark.parametrize("make_sam", [sam_transform, gsam_transform, looksam_transform, friendly_sam_transform,
                                      vasso_transform])
def test_a_grad_fn_returning_a_pair_is_one_clear_error(mlp_problem, make_sam):
    params, batch, loss = mlp_problem
    tx = optax.chain(make_sam(0.05), optax.sgd(0.1))
    g = jax.grad(loss)(params, batch)
    pair = lambda p: jax.value_and_grad(loss)(p, batch)  # noqa: E731
    with pytest.raises(TypeError, match=r"grad_fn returned a pair .* return the gradient alone"):
        tx.update(g, tx.init(params), params, grad_fn=pair)


# ---------------------------------------------------------------------------
# Hyperparameters as optax has them: arrays, tracers, injected, swept.


def test_inject_hyperparams_under_jit_equals_the_fixed_transform(x64, mlp_problem):
    """ρ injected (an array in the state, a tracer under jit) gives the same update as ρ fixed, and
    changing it in the state changes the step without recompiling; an injected ρ = 0 is the clean gradient."""
    params, batch, loss = mlp_problem
    params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
    g = jax.grad(loss)(params, batch)
    injected = optax.chain(optax.inject_hyperparams(sam_transform)(rho=0.1), optax.sgd(0.1))
    looksam = optax.inject_hyperparams(looksam_transform, static_args=("k",))(rho=0.1, k=1, alpha=0.7)

    @jax.jit
    def update(state, params):
        return injected.update(g, state, params, grad_fn=_grad_fn(loss, batch))

    state = injected.init(params)
    got, state = update(state, params)
    want = _one_update(optax.chain(sam_transform(rho=0.1), optax.sgd(0.1)), loss, params, batch)
    _tree_close(got, want, 1e-12)
    state[0].hyperparams["rho"] = jnp.zeros_like(state[0].hyperparams["rho"])
    clean, _ = update(state, params)
    _tree_close(clean, jax.tree.map(lambda x: -0.1 * x, g), 1e-15)
    assert update._cache_size() == 1
    got_looksam, _ = jax.jit(lambda s: looksam.update(g, s, params, grad_fn=_grad_fn(loss, batch)))(
        looksam.init(params))
    _tree_close(got_looksam, _reference_sam(loss, params, batch, 0.1), 1e-12)  # k = 1 is SAM


def test_vmap_over_rho_sweeps_sam(x64, mlp_problem):
    params, batch, loss = mlp_problem
    params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
    g = jax.grad(loss)(params, batch)
    rhos = jnp.array([0.0, 0.05, 0.2])

    def sam_gradient(rho):
        tx = sam_transform(rho=rho)
        return tx.update(g, tx.init(params), params, grad_fn=_grad_fn(loss, batch))[0]

    swept = jax.jit(jax.vmap(sam_gradient))(rhos)
    for i, rho in enumerate([0.0, 0.05, 0.2]):
        want = g if rho == 0.0 else _reference_sam(loss, params, batch, rho)
        _tree_close(jax.tree.map(lambda x: x[i], swept), want, 1e-12)
