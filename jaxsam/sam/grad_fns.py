"""`grad_fn`s for the SAM family from a Flax model: linen with BatchNorm, and NNX.

A SAM transform calls `grad_fn(p)` at the perturbed parameters. With
BatchNorm the forward pass has two outputs besides the loss, the logits and
the new batch statistics, and which pass's statistics to keep is a choice:
these helpers make the perturbed pass leave the model's statistics alone and,
with `has_aux=True`, return `PerturbedAux(loss, batch_stats)` of the pass, so
a transform built with `has_aux=True` keeps L(w + ε) and the perturbed pass's
statistics in its state (`jaxsam.sam_aux(opt_state)`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp


class PerturbedAux(NamedTuple):
    """What `linen_grad_fn` and `nnx_grad_fn` return beside the gradient with `has_aux=True`."""

    loss: chex.Array  # the loss of the pass (L(w + ε) for the perturbed one)
    batch_stats: Any  # the BatchNorm statistics that pass computed (the model's own are left unchanged)

    @classmethod
    def like(cls, batch_stats: Any, loss_dtype: Any = jnp.float32) -> "PerturbedAux":
        """The `aux_init` of a transform whose grad_fn comes from these helpers: a zero loss and `batch_stats`.

        Example:
          >>> import jax.numpy as jnp, jaxsam
          >>> tx = jaxsam.sam_transform(0.05, has_aux=True,
          ...                           aux_init=jaxsam.PerturbedAux.like({"bn": {"mean": jnp.zeros(4)}}))
        """
        return cls(loss=jnp.zeros([], loss_dtype), batch_stats=batch_stats)


def linen_grad_fn(
    apply_fn: Callable,
    loss_fn: Callable[[Any], chex.Array],
    batch_stats: Any,
    *args: Any,
    has_aux: bool = False,
    **kwargs: Any,
) -> Callable:
    """`grad_fn` for a Flax linen model with BatchNorm (`batch_stats` collection).

    The pass at parameters p is

        outputs, updates = apply_fn({"params": p, "batch_stats": batch_stats}, *args,
                                    mutable=["batch_stats"], **kwargs)
        loss = loss_fn(outputs)

    always starting from the same `batch_stats` (those before the step), so
    the clean pass and the perturbed pass see the same running statistics.
    Called at the clean parameters it is the clean pass: with `has_aux=True`,
    `grads, (loss, new_batch_stats) = grad_fn(params)` gives the statistics
    to keep (jaxsam keeps the clean pass's, DESIGN decision 2).

    Args:
      apply_fn: the model's `apply` (e.g. `model.apply`).
      loss_fn: outputs -> scalar loss (close over the labels).
      batch_stats: the model's current BatchNorm statistics.
      *args, **kwargs: passed to `apply_fn` after the variables (inputs, `train=True`).
      has_aux: return `(grads, PerturbedAux(loss, batch_stats))` instead of `grads`.

    Returns:
      `grad_fn(params)`, for `tx.update(..., grad_fn=grad_fn)` and for the clean gradient.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, optax, jaxsam
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, train):
      ...         return nn.Dense(2)(nn.BatchNorm(use_running_average=not train)(x))
      >>> x, y = jnp.ones((4, 3)), jnp.array([0, 1, 0, 1])
      >>> variables = Net().init(jax.random.key(0), x, train=False)
      >>> xent = lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      >>> grad_fn = jaxsam.linen_grad_fn(Net().apply, xent, variables["batch_stats"], x, train=True, has_aux=True)
      >>> grads, clean = grad_fn(variables["params"])
    """

    def loss_at(params):
        outputs, updates = apply_fn({"params": params, "batch_stats": batch_stats}, *args, mutable=["batch_stats"],
                                    **kwargs)  # fmt: skip
        loss = loss_fn(outputs)
        return loss, PerturbedAux(loss=loss, batch_stats=updates["batch_stats"])

    def grad_fn(params):
        grads, aux = jax.grad(loss_at, has_aux=True)(params)
        return (grads, aux) if has_aux else grads

    return grad_fn


def nnx_grad_fn(model: Any, loss_fn: Callable, *args: Any, wrt: Any = None, has_aux: bool = False,
                **kwargs: Any) -> Callable:  # fmt: skip
    """`grad_fn` for a Flax NNX model, for `nnx.Optimizer(model, tx, wrt=nnx.Param).update(model, grads, grad_fn=...)`.

    `nnx.Optimizer.update` hands the SAM transform the parameters as a pure
    `nnx.State` of arrays; this `grad_fn` returns the gradient of
    `loss_fn(model, *args, **kwargs)` at such a State, computed on a copy of
    the model merged from it. That avoids NNX's three traps: a closure over
    `model` itself (`nnx.grad(loss_fn)(model)`) returns a State of Variables,
    not shaped like the pure params (a pytree-structure error); merging the
    model's own Variables inside `jax.grad` raises a TraceContextError
    (here the rest of the model is made pure, `nnx.as_pure`, first); and a
    gradient from `jax.grad` on a pure State passed as `grads` is filtered to
    nothing by the optimizer's `wrt` (pass `nnx.grad`'s Variables as the
    clean `grads`, this function only as `grad_fn`).

    Build it before the clean `nnx.grad` pass: that pass updates the model's
    BatchNorm statistics and RNG counts in place, and the perturbed pass should
    start from the same ones (same statistics, same dropout masks). The
    perturbed pass never changes the model; with `has_aux=True` it returns
    `PerturbedAux(loss, batch_stats)`, the statistics as a pure State (apply
    them with `nnx.update(model, aux.batch_stats)`).

    Args:
      model: the NNX module.
      loss_fn: (model, *args, **kwargs) -> scalar loss.
      *args, **kwargs: the batch, passed to `loss_fn`.
      wrt: the optimizer's `wrt` filter (default `nnx.Param`).
      has_aux: return `(grads, PerturbedAux(loss, batch_stats))`.

    Returns:
      `grad_fn(pure_params_state)`.

    Example:
      >>> import jax.numpy as jnp, optax, jaxsam
      >>> from flax import nnx
      >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
      >>> optimizer = nnx.Optimizer(model, optax.chain(jaxsam.sam_transform(0.05), optax.sgd(0.1)), wrt=nnx.Param)
      >>> loss_fn = lambda m, x: jnp.mean(m(x) ** 2)
      >>> x = jnp.ones((4, 3))
      >>> grad_fn = jaxsam.nnx_grad_fn(model, loss_fn, x)
      >>> _ = optimizer.update(model, nnx.grad(loss_fn)(model, x), grad_fn=grad_fn)
    """
    from flax import nnx

    wrt = nnx.Param if wrt is None else wrt
    graphdef, _, rest = nnx.split(model, wrt, ...)
    rest = nnx.as_pure(rest)

    def loss_at(params):
        copy = nnx.merge(graphdef, params, rest)
        loss = loss_fn(copy, *args, **kwargs)
        return loss, PerturbedAux(loss=loss, batch_stats=nnx.as_pure(nnx.state(copy, nnx.BatchStat)))

    def grad_fn(params):
        grads, aux = jax.grad(loss_at, has_aux=True)(params)
        return (grads, aux) if has_aux else grads

    return grad_fn
