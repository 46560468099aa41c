"""The SAM family inside optax pipelines: ASAM's ball conventions, MultiSteps, the order of a chain, ρ schedules on CPU."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsam
from jaxsam.sam import sam_perturbation, sam_transform

# float64, the same few elementwise products and one norm on both sides: 1e-12 is ~1e4 ulps.
TOL = dict(atol=1e-12, rtol=1e-12)


def _conv_bn_params(key):
    """Leaves named as flax names them: a kernel, its bias, a BatchNorm scale and offset (some weights zero)."""
    k = jax.random.split(key, 5)
    kernel = jax.random.normal(k[0], (3, 3, 2, 4), jnp.float64).at[0, 0, 0, 0].set(0.0)
    return {
        "conv": {"kernel": kernel, "bias": 0.1 * jax.random.normal(k[1], (4,), jnp.float64)},
        "bn": {"scale": 1.0 + 0.1 * jax.random.normal(k[2], (4,), jnp.float64),
               "bias": 0.1 * jax.random.normal(k[3], (4,), jnp.float64)},
    }  # fmt: skip


def _reference_ball(grads, params, rho, t_of, eps):
    """ε = ρ T² g / (‖T g‖ + eps), written out per leaf with T from `t_of(path_name, w)`."""
    flat_g = jax.tree_util.tree_flatten_with_path(grads)[0]
    flat_w = jax.tree.leaves(params)
    ts = [t_of("/".join(str(p.key) for p in path), w) for (path, _), w in zip(flat_g, flat_w)]
    norm = jnp.sqrt(sum(jnp.sum((t * g) ** 2) for t, (_, g) in zip(ts, flat_g)))
    leaves = [rho * t * t * g / (norm + eps) for t, (_, g) in zip(ts, flat_g)]
    return jax.tree.unflatten(jax.tree.structure(grads), leaves)


# The three conventions of the README's table, with the option values that reproduce each.
CONVENTIONS = {
    # jaxsam's default: T = |w| + η on every leaf.
    "jaxsam": (dict(eta=0.01, adaptive_leaves="all", eps=1e-12), lambda name, w: jnp.abs(w) + 0.01, 1e-12),
    # Kwon et al.'s asam.py: T = |w| + η on parameters whose PyTorch name has "weight" (convolution and
    # BatchNorm weights), T = 1 on biases; 1e-16 beside the norm.
    "kwon": (dict(eta=0.01, adaptive_leaves="weights", eps=1e-16),
             lambda name, w: jnp.ones_like(w) if name.endswith("bias") else jnp.abs(w) + 0.01, 1e-16),
    # davda54/sam's adaptive=True: T = |w| on every leaf, no η; 1e-12 beside the norm.
    "davda54": (dict(eta=0.0, adaptive_leaves="all", eps=1e-12), lambda name, w: jnp.abs(w), 1e-12),
    # Only kernels scaled (biases and both BatchNorm leaves T = 1).
    "kernels": (dict(eta=0.01, adaptive_leaves="kernels", eps=1e-12),
                lambda name, w: jnp.abs(w) + 0.01 if w.ndim >= 2 else jnp.ones_like(w), 1e-12),
}


@pytest.mark.parametrize("convention", list(CONVENTIONS))
def test_asam_ball_conventions_equal_their_formulas(x64, convention):
    options, t_of, eps = CONVENTIONS[convention]
    params = _conv_bn_params(jax.random.key(0))
    grads = jax.tree.map(lambda w: jnp.cos(3.0 * w) + 0.1, params)
    got = sam_perturbation(grads, params, 0.5, adaptive=True, **options)
    chex.assert_trees_all_close(got, _reference_ball(grads, params, 0.5, t_of, eps), **TOL)
    if convention == "davda54":  # T = |w|: a zero weight is never perturbed (η keeps it perturbable)
        assert got["conv"]["kernel"][0, 0, 0, 0] == 0.0
    else:
        assert got["conv"]["kernel"][0, 0, 0, 0] != 0.0


def test_the_conventions_are_different_balls(x64):
    params = _conv_bn_params(jax.random.key(1))
    grads = jax.tree.map(lambda w: jnp.sin(2.0 * w) + 0.2, params)
    balls = {k: sam_perturbation(grads, params, 0.5, adaptive=True, **v[0]) for k, v in CONVENTIONS.items()}
    names = list(balls)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert optax.tree.norm(optax.tree.sub(balls[a], balls[b])) > 1e-3, (a, b)


def test_adaptive_leaves_as_a_pytree_and_through_the_transform(x64, mlp_problem):
    params, batch, loss = mlp_problem
    params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
    g = jax.grad(loss)(params, batch)
    tree = jax.tree.map(lambda w: w.ndim >= 2, params)
    chex.assert_trees_all_close(sam_perturbation(g, params, 0.5, adaptive=True, adaptive_leaves=tree),
                                sam_perturbation(g, params, 0.5, adaptive=True, adaptive_leaves="kernels"), **TOL)
    tx = sam_transform(0.5, adaptive=True, adaptive_leaves="weights")
    got, _ = tx.update(g, tx.init(params), params, grad_fn=lambda p: jax.grad(loss)(p, batch))
    eps = sam_perturbation(g, params, 0.5, adaptive=True, adaptive_leaves="weights")
    chex.assert_trees_all_close(got, jax.grad(loss)(jax.tree.map(jnp.add, params, eps), batch), **TOL)


# ---------------------------------------------------------------------------
# optax.MultiSteps: what happens, pinned down.


def _micro(batch, k):
    x, y = batch
    return [(x[i::k], y[i::k]) for i in range(k)]


def test_multisteps_around_sam_perturbs_with_the_accumulated_gradient_and_steps_with_the_last_microbatch(x64, mlp_problem):
    """MultiSteps(chain(sam, sgd), k) calls SAM on every micro-batch with the running mean of the micro-batch
    gradients; the update it emits (on the k-th) is the last micro-batch's gradient at w + ρ ḡ/‖ḡ‖."""
    params, batch, loss = mlp_problem
    params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
    micro = _micro(batch, 4)
    tx = optax.MultiSteps(optax.chain(sam_transform(0.1), optax.sgd(1.0)), every_k_schedule=4)
    state, calls = tx.init(params), []
    for b in micro:
        def grad_fn(p, b=b):
            jax.debug.callback(lambda: calls.append(1))  # counts executions, not MultiSteps's traces
            return jax.grad(loss)(p, b)

        updates, state = tx.update(jax.grad(loss)(params, b), state, params, grad_fn=grad_fn)
    mean = jax.tree.map(lambda *g: sum(g) / 4, *[jax.grad(loss)(params, b) for b in micro])
    eps = sam_perturbation(mean, params, 0.1)
    want = jax.tree.map(lambda g: -g, jax.grad(loss)(jax.tree.map(jnp.add, params, eps), micro[-1]))
    # MultiSteps weights its running mean by 1/(n+1) in float32 (6e-8 relative), which reaches ε: 1e-6.
    chex.assert_trees_all_close(updates, want, atol=1e-6, rtol=1e-6)
    jax.effects_barrier()
    assert len(calls) == 4  # a second gradient on every micro-batch, three of them thrown away


def test_sam_before_multisteps_is_per_microbatch_sam_averaged(x64, mlp_problem):
    """chain(sam, MultiSteps(sgd)): each micro-batch perturbed with its own gradient (m-sharpness with
    m = the micro-batch), the k perturbed gradients averaged into one base step."""
    params, batch, loss = mlp_problem
    params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
    micro = _micro(batch, 4)
    tx = optax.chain(sam_transform(0.1), optax.MultiSteps(optax.sgd(1.0), every_k_schedule=4).gradient_transformation())
    state = tx.init(params)
    for b in micro:
        updates, state = tx.update(jax.grad(loss)(params, b), state, params, grad_fn=lambda p, b=b: jax.grad(loss)(p, b))
    per_micro = []
    for b in micro:
        g = jax.grad(loss)(params, b)
        per_micro.append(jax.grad(loss)(jax.tree.map(jnp.add, params, sam_perturbation(g, params, 0.1)), b))
    # MultiSteps's float32 running-mean weights again: 1e-6.
    chex.assert_trees_all_close(updates, jax.tree.map(lambda *g: -sum(g) / 4, *per_micro), atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------
# SAM first in the chain, and what goes wrong otherwise.


def test_a_clip_before_sam_is_lost_and_after_sam_clips(x64, mlp_problem):
    params, batch, loss = mlp_problem
    params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
    g = jax.grad(loss)(params, batch)
    grad_fn = lambda p: jax.grad(loss)(p, batch)  # noqa: E731
    clip = 0.1 * float(optax.tree.norm(g))  # well below the gradient's norm: clipping is active

    def update(tx):
        return tx.update(g, tx.init(params), params, grad_fn=grad_fn)[0]

    unclipped = update(optax.chain(sam_transform(0.1), optax.sgd(1.0)))
    clip_first = update(optax.chain(optax.clip_by_global_norm(clip), sam_transform(0.1), optax.sgd(1.0)))
    sam_first = update(optax.chain(sam_transform(0.1), optax.clip_by_global_norm(clip), optax.sgd(1.0)))
    # Clipping first only rescales the clean gradient, which ε normalizes away, and grad_fn's gradient
    # is never clipped: the update is SAM's unclipped one.
    chex.assert_trees_all_close(clip_first, unclipped, **TOL)
    assert float(optax.tree.norm(unclipped)) > 5 * clip
    np.testing.assert_allclose(optax.tree.norm(sam_first), clip, rtol=1e-12)


def test_weight_decay_before_sam_tilts_the_ball_and_is_dropped(x64, mlp_problem):
    params, batch, loss = mlp_problem
    params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
    g = jax.grad(loss)(params, batch)
    wd = 0.5
    tx = optax.chain(optax.add_decayed_weights(wd), sam_transform(0.1), optax.sgd(1.0))
    got, _ = tx.update(g, tx.init(params), params, grad_fn=lambda p: jax.grad(loss)(p, batch))
    tilted = jax.tree.map(lambda gi, w: gi + wd * w, g, params)
    eps = sam_perturbation(tilted, params, 0.1)
    no_decay = jax.tree.map(lambda x: -x, jax.grad(loss)(jax.tree.map(jnp.add, params, eps), batch))
    chex.assert_trees_all_close(got, no_decay, **TOL)  # ε along g + λw, and no λw in the step
    right = optax.chain(sam_transform(0.1), optax.add_decayed_weights(wd), optax.sgd(1.0))
    got_right, _ = right.update(g, right.init(params), params, grad_fn=lambda p: jax.grad(loss)(p, batch))
    sam_grad = jax.grad(loss)(jax.tree.map(jnp.add, params, sam_perturbation(g, params, 0.1)), batch)
    chex.assert_trees_all_close(got_right, jax.tree.map(lambda s, w: -(s + wd * w), sam_grad, params), **TOL)


def test_a_scheduled_rho_on_cpu_selects_instead_of_branching(mlp_problem):
    """XLA:CPU runs gradients inside lax.cond several times slower (GSAM with its ρ schedule: 12x the base step),
    so there the SAM result and the clean one are both computed and selected; elsewhere it is a real cond."""
    params, batch, loss = mlp_problem
    tx = jaxsam.gsam_transform(optax.linear_schedule(0.05, 0.0, 10), alpha=0.1)
    g = jax.grad(loss)(params, batch)
    jaxpr = jax.make_jaxpr(lambda s: tx.update(g, s, params, grad_fn=lambda p: jax.grad(loss)(p, batch)))(tx.init(params))
    has_cond = any(eqn.primitive.name == "cond" for eqn in jaxpr.jaxpr.eqns)
    assert has_cond == (jax.default_backend() != "cpu")


def test_jaxsam_exports_every_member():
    for name in ("sam_transform", "gsam_transform", "looksam_transform", "friendly_sam_transform", "vasso_transform",
                 "momentum_sam_transform", "gradient_point", "sam_aux", "linen_grad_fn", "nnx_grad_fn",
                 "PerturbedAux", "kernels_only_mask", "weights_mask", "rho_following_lr"):  # fmt: skip
        assert getattr(jaxsam, name) is getattr(jaxsam.sam, name)
    for name in jaxsam.sam.__all__:
        assert hasattr(jaxsam.sam, name)
