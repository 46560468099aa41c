"""has_aux (the perturbed pass's loss and BatchNorm statistics in the state), the linen and NNX grad_fns, nnx.Optimizer."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxsam
from jaxsam.sam import (
    PerturbedAux,
    friendly_sam_transform,
    gradient_point,
    gsam_transform,
    looksam_transform,
    momentum_sam_transform,
    sam_aux,
    sam_transform,
    vasso_transform,
)

GRAD_FN_MEMBERS = {
    "sam": lambda **kw: sam_transform(0.1, **kw),
    "asam": lambda **kw: sam_transform(0.5, adaptive=True, **kw),
    "gsam": lambda **kw: gsam_transform(0.1, 0.2, **kw),
    "looksam": lambda **kw: looksam_transform(0.1, k=2, **kw),
    "fsam": lambda **kw: friendly_sam_transform(0.1, **kw),
    "vasso": lambda **kw: vasso_transform(0.1, **kw),
}


def _recording(loss, batch, points):
    """grad_fn returning (gradient, loss) and recording where it was called (eager calls only)."""

    def grad_fn(p):
        points.append(p)
        return jax.grad(loss)(p, batch), loss(p, batch)

    return grad_fn


# ---------------------------------------------------------------------------
# has_aux in the transforms.


@pytest.mark.parametrize("member", list(GRAD_FN_MEMBERS))
def test_has_aux_keeps_the_perturbed_pass_loss_in_the_state(x64, mlp_problem, member):
    params, batch, loss = mlp_problem
    params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
    tx = optax.chain(GRAD_FN_MEMBERS[member](has_aux=True), optax.sgd(0.1))
    plain = optax.chain(GRAD_FN_MEMBERS[member](), optax.sgd(0.1))
    state, plain_state = tx.init(params), plain.init(params)
    assert float(sam_aux(state)) == 0.0 and sam_aux(state).dtype == jnp.float64  # aux_init: a loss like params
    for step in range(3):
        points = []
        g = jax.grad(loss)(params, batch)
        # LookSAM's branch decided in Python (its sam_step), so grad_fn runs eagerly and can record its point.
        extra = {"sam_step": step % 2 == 0} if member == "looksam" else {}
        updates, state = tx.update(g, state, params, grad_fn=_recording(loss, batch, points), **extra)
        want, plain_state = plain.update(g, plain_state, params, grad_fn=lambda p: jax.grad(loss)(p, batch), **extra)
        chex.assert_trees_all_close(updates, want, atol=1e-14, rtol=1e-14)  # has_aux changes nothing else
        if member == "looksam" and step % 2 == 1:
            assert not points  # a reuse step: no perturbed pass, the aux stays the last SAM step's
            continue
        (point,) = points
        np.testing.assert_allclose(sam_aux(state), loss(point, batch), rtol=1e-14)
        assert float(sam_aux(state)) > float(loss(params, batch))  # ε climbs: L(w + ε) > L(w)
        params = optax.apply_updates(params, updates)
    assert isinstance(state[0], jaxsam.AuxState) and int(state[0].inner.count) == 3
    assert optax.tree.get(state, "aux") is sam_aux(state)


def test_rho_zero_keeps_the_aux_and_calls_no_grad_fn(mlp_problem):
    params, batch, loss = mlp_problem
    points = []
    tx = sam_transform(optax.constant_schedule(0.0), has_aux=True)
    state = tx.init(params)
    updates, state = tx.update(jax.grad(loss)(params, batch), state, params, grad_fn=_recording(loss, batch, points))
    assert float(state.aux) == 0.0
    chex.assert_trees_all_equal(updates, jax.grad(loss)(params, batch))


def test_has_aux_under_jit_scan_and_injected_rho(mlp_problem):
    """One state structure through lax.scan and the traced-ρ lax.cond; ρ changed in the state changes the aux."""
    params, batch, loss = mlp_problem
    tx = optax.chain(optax.inject_hyperparams(sam_transform)(rho=0.1, has_aux=True),
                     optax.sgd(0.1))  # fmt: skip
    grad_fn = lambda p: (jax.grad(loss)(p, batch), loss(p, batch))  # noqa: E731

    def body(carry, _):
        w, state = carry
        updates, state = tx.update(jax.grad(loss)(w, batch), state, w, grad_fn=grad_fn)
        return (optax.apply_updates(w, updates), state), sam_aux(state)

    run = jax.jit(lambda w, s: jax.lax.scan(body, (w, s), None, length=4))
    (w, state), perturbed = run(params, tx.init(params))
    assert perturbed.shape == (4,) and bool(jnp.all(jnp.diff(perturbed) < 0))  # the perturbed loss falls
    state[0].hyperparams["rho"] = jnp.zeros_like(state[0].hyperparams["rho"])
    _, unchanged = run(w, state)
    np.testing.assert_array_equal(unchanged, jnp.full(4, perturbed[-1]))  # ρ = 0: no perturbed pass


def test_aux_is_averaged_over_the_device_axis(x64, mlp_problem):
    params, (x, y), loss = mlp_problem
    shards = (x.reshape(4, 4, 5), y.reshape(4, 4))
    tx = sam_transform(0.1, axis_name="data", has_aux=True)

    def per_device(shard):
        g = jax.grad(loss)(params, shard)
        return tx.update(g, tx.init(params), params, grad_fn=lambda p: (jax.grad(loss)(p, shard), loss(p, shard)))[1]

    aux = jax.vmap(per_device, axis_name="data")(shards).aux
    want = []
    for i in range(4):
        shard = (shards[0][i], shards[1][i])
        g = jax.grad(loss)(params, shard)
        want.append(loss(jax.tree.map(jnp.add, params, jaxsam.sam_perturbation(g, params, 0.1)), shard))
    np.testing.assert_allclose(aux, np.full(4, np.mean(want)), rtol=1e-12)


@pytest.mark.parametrize(
    "has_aux, grad_fn, message",
    [
        (True, lambda loss, batch: lambda p: jax.grad(loss)(p, batch), r"has_aux=True: grad_fn must return a pair"),
        (True, lambda loss, batch: lambda p: jax.value_and_grad(loss)(p, batch), r"returned \(value, gradient\)"),
        (True, lambda loss, batch: lambda p: (jax.grad(loss)(p, batch), (loss(p, batch), 1.0)),
         "aux .* is not shaped like aux_init"),
        (False, lambda loss, batch: lambda p: (jax.grad(loss)(p, batch), loss(p, batch)),
         r"returned a pair .* or build the transform with has_aux=True"),
    ],
    ids=["bare_gradient", "value_and_grad_order", "aux_unlike_aux_init", "pair_without_has_aux"],
)
@pytest.mark.parametrize("member", ["sam", "gsam", "looksam", "fsam", "vasso"])
def test_a_wrong_grad_fn_return_is_one_clear_error(mlp_problem, has_aux, grad_fn, message, member):
    params, batch, loss = mlp_problem
    tx = GRAD_FN_MEMBERS[member](has_aux=True) if has_aux else GRAD_FN_MEMBERS[member]()
    with pytest.raises(TypeError, match=message):
        tx.update(jax.grad(loss)(params, batch), tx.init(params), params, grad_fn=grad_fn(loss, batch))


def test_sam_aux_needs_exactly_one_aux_state(mlp_problem):
    params, _, _ = mlp_problem
    with pytest.raises(ValueError, match="holds 0 SAM states with aux"):
        sam_aux(optax.chain(sam_transform(0.1), optax.sgd(0.1)).init(params))


# ---------------------------------------------------------------------------
# linen with BatchNorm.


class _BNNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(6)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(3)(jnp.tanh(x))


def _xent(labels):
    return lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def test_linen_grad_fn_with_batchnorm_equals_a_hand_written_two_pass_step(x64, mlp_problem):
    _, (x, y), _ = mlp_problem
    x = x.astype(jnp.float64)
    model = _BNNet()
    variables = jax.tree.map(lambda v: v.astype(jnp.float64), model.init(jax.random.key(1), x, train=False))
    params, stats = variables["params"], variables["batch_stats"]
    grad_fn = jaxsam.linen_grad_fn(model.apply, _xent(y), stats, x, train=True, has_aux=True)
    tx = optax.chain(sam_transform(0.1, has_aux=True, aux_init=PerturbedAux.like(stats, jnp.float64)),
                     optax.sgd(0.1))  # fmt: skip
    grads, clean = grad_fn(params)
    updates, state = tx.update(grads, tx.init(params), params, grad_fn=grad_fn)

    def manual(p):  # the pass written out: train-mode BatchNorm from the statistics before the step
        logits, new = model.apply({"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
        return _xent(y)(logits), new["batch_stats"]

    (loss0, stats0), g0 = jax.value_and_grad(manual, has_aux=True)(params)
    point = jax.tree.map(lambda w, g: w + 0.1 * g / optax.tree.norm(g0), params, g0)
    (loss1, stats1), g1 = jax.value_and_grad(manual, has_aux=True)(point)
    tol = dict(atol=1e-12, rtol=1e-12)
    chex.assert_trees_all_close((grads, clean.loss, clean.batch_stats), (g0, loss0, stats0), **tol)
    chex.assert_trees_all_close(updates, jax.tree.map(lambda g: -0.1 * g, g1), **tol)
    chex.assert_trees_all_close((sam_aux(state).loss, sam_aux(state).batch_stats), (loss1, stats1), **tol)
    # The two passes' statistics differ (the check is not vacuous), and the perturbed loss is higher.
    assert optax.tree.norm(optax.tree.sub(stats0, stats1)) > 1e-6 and loss1 > loss0


# ---------------------------------------------------------------------------
# NNX and nnx.Optimizer.


class _NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(5, 6, rngs=rngs)
        self.bn = nnx.BatchNorm(6, momentum=0.9, rngs=rngs)
        self.l2 = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.bn(self.l1(x))))


def _nnx_loss(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


NNX_MEMBERS = dict(GRAD_FN_MEMBERS, msam=lambda **kw: momentum_sam_transform(0.5, **kw))


def _functional_run(tx, batches):
    """The same training on pure pytrees: clean pass keeps its statistics, grad_fn starts from the old ones."""
    graphdef, params, stats, rest = nnx.split(_NNXNet(nnx.Rngs(0)), nnx.Param, nnx.BatchStat, ...)
    params, stats, rest = nnx.as_pure(params), nnx.as_pure(stats), nnx.as_pure(rest)
    state = tx.init(params)
    for x, y in batches:
        def loss_and_stats(p, stats=stats, x=x, y=y):
            copy = nnx.merge(graphdef, p, stats, rest)
            return _nnx_loss(copy, x, y), nnx.as_pure(nnx.state(copy, nnx.BatchStat))

        g, stats = jax.grad(loss_and_stats, has_aux=True)(gradient_point(state, params))
        grad_fn = lambda p, f=loss_and_stats: jax.grad(lambda q: f(q)[0])(p)  # noqa: E731
        updates, state = tx.update(g, state, params, grad_fn=grad_fn)
        params = optax.apply_updates(params, updates)
    return params, stats


def _nnx_step(model, optimizer, x, y, momentum_sam):
    if momentum_sam:  # one gradient, at the point the transform names; its pass's statistics are kept
        params = nnx.as_pure(nnx.state(model, nnx.Param))
        nnx.update(model, gradient_point(nnx.as_pure(optimizer.opt_state), params))
        grads = nnx.grad(_nnx_loss)(model, x, y)
        nnx.update(model, params)
        optimizer.update(model, grads)
    else:
        grad_fn = jaxsam.nnx_grad_fn(model, _nnx_loss, x, y)  # before the clean pass changes the statistics
        optimizer.update(model, nnx.grad(_nnx_loss)(model, x, y), grad_fn=grad_fn)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "nnx_jit"])
@pytest.mark.parametrize("member", list(NNX_MEMBERS))
def test_nnx_optimizer_trains_like_the_functional_transform(mlp_problem, member, jit):
    _, (x, y), _ = mlp_problem
    batches = [(jnp.roll(x, 4 * i, 0)[:12], jnp.roll(y, 4 * i, 0)[:12]) for i in range(3)]
    tx = optax.chain(NNX_MEMBERS[member](), optax.sgd(0.1, momentum=0.9))
    model = _NNXNet(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    step = nnx.jit(_nnx_step, static_argnums=4) if jit else _nnx_step
    for xb, yb in batches:
        step(model, optimizer, xb, yb, member == "msam")
    params, stats = _functional_run(tx, batches)
    # Same float32 math in two programs: rounding differs by ~1e-7 per step, 1e-5 leaves a margin after 3.
    chex.assert_trees_all_close(nnx.as_pure(nnx.state(model, nnx.Param)), params, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(nnx.as_pure(nnx.state(model, nnx.BatchStat)), stats, atol=1e-5, rtol=1e-5)
    # Not vacuous: the SAM family moved the parameters differently from plain SGD.
    plain_params, _ = _functional_run(optax.sgd(0.1, momentum=0.9), batches)
    assert optax.tree.norm(optax.tree.sub(params, plain_params)) > 1e-4


def test_nnx_has_aux_keeps_the_perturbed_loss_and_statistics_in_the_optimizer(mlp_problem):
    _, (x, y), _ = mlp_problem
    model = _NNXNet(nnx.Rngs(0))
    stats_before = nnx.as_pure(nnx.state(model, nnx.BatchStat))
    tx = optax.chain(sam_transform(0.1, has_aux=True, aux_init=PerturbedAux.like(stats_before)), optax.sgd(0.1))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        grad_fn = jaxsam.nnx_grad_fn(model, _nnx_loss, x, y, has_aux=True)
        grads, clean = grad_fn(nnx.as_pure(nnx.state(model, nnx.Param)))
        optimizer.update(model, nnx.grad(_nnx_loss)(model, x, y), grad_fn=grad_fn)
        return clean.loss

    clean_loss = step(model, optimizer)
    aux = sam_aux(nnx.as_pure(optimizer.opt_state))
    assert float(aux.loss) > float(clean_loss)  # L(w + ε) > L(w)
    # The model kept the clean pass's statistics; the perturbed pass's differ and sit in the state.
    stats_after = nnx.as_pure(nnx.state(model, nnx.BatchStat))
    assert optax.tree.norm(optax.tree.sub(stats_after, aux.batch_stats)) > 1e-6
    assert optax.tree.norm(optax.tree.sub(stats_after, stats_before)) > 1e-6
