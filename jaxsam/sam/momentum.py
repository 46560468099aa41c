"""Momentum-SAM: the perturbation from the momentum, so a step takes one gradient.

SAM-type transforms receive the clean gradient and evaluate the perturbed one
through `grad_fn`. Momentum-SAM's perturbation does not depend on the current
batch, so the train step can take its single gradient directly at the
perturbed point; the transform tells it where that point is:

    point = jaxsam.gradient_point(opt_state, params)      # w_t + ε_t (params itself for other members)
    grads = jax.grad(loss_fn)(point, batch)               # the one gradient of the step
    updates, opt_state = tx.update(grads, opt_state, params)
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from jaxsam.sam import _common as c
from jaxsam.sam._common import Mask, Params, Rho


class MomentumSAMState(NamedTuple):
    """State of `momentum_sam_transform`; `gradient_point` reads it."""

    count: chex.Array  # int32 number of updates so far; the ρ schedule reads it.
    momentum: optax.Updates  # v_t = μ v_{t−1} + g_t over the gradients this transform returned (masked entries only).
    scale: chex.Array  # −ρ_t / (‖v_t‖ + eps): the next gradient point is w + scale · v_t.


def momentum_sam_transform(
    rho: Rho = 3.0,
    momentum: float = 0.9,
    *,
    eps: float = 1e-12,
    axis_name: Optional[str] = None,
    mask: Mask = None,
) -> optax.GradientTransformationExtraArgs:
    """Momentum-SAM (MSAM; Becker, Altrock & Risse 2024, "Momentum-SAM: Sharpness Aware Minimization without
    Computational Overhead").

    Perturbs along the negative momentum direction instead of the current
    gradient, so no second gradient is needed (the paper's Figure 1, SGD with
    Momentum-SAM):

        w̃_t = w_t − ρ v_t / ‖v_t‖,           v_0 = 0 (the first step is the base optimizer's),
        g_t = ∇L_B(w̃_t),                     the step's only gradient, taken by the caller,
        v_{t+1} = μ v_t + g_t,
        then the base optimizer steps from w_t with g_t (SGD: w_{t+1} = w_t − η v_{t+1}).

    The train step must take its gradient at `gradient_point(opt_state,
    params)` (w̃_t) and pass it as `updates`; `update` returns it unchanged
    (averaged over `axis_name`) and needs neither `params` nor `grad_fn`, so
    a step costs one forward and backward pass. Everything else that pass
    produces (the loss, BatchNorm statistics) belongs to w̃_t, as in the
    authors' code, which keeps the network at the perturbed point.

    v is this transform's own momentum of the gradients it returns. With
    `momentum` equal to SGD's momentum (or Adam's b1: an average μ m + (1−μ) g
    has the same direction as the sum) it has the direction of the base
    optimizer's momentum, without reading the base optimizer's state (which
    optax lays out differently for every optimizer). Weight decay chained after
    this transform is not in v (the authors' SGD adds it to the gradient
    before its momentum).

    Args:
      rho: ρ >= 0, the perturbation's norm, a number, array or schedule; the
        authors use ρ = 3 (CIFAR-100 and ImageNet, SGD and AdamW), a far larger
        ball than SAM's, because the loss rises slowly along −v.
      momentum: μ in [0, 1), the decay of v (use the base optimizer's).
      eps: added to ‖v‖ so v = 0 (the first step, a zero gradient) gives ε = 0.
      axis_name: inside a per-device mapped step, average the gradient over
        this axis (v and the gradient point are then the same on every device).
      mask: perturb only the selected parameters (v keeps only their entries).

    Returns:
      An `optax.GradientTransformationExtraArgs`; call `update(grads_at_point, state, params)`.
      Its state, `MomentumSAMState(count, momentum, scale)`, is a pytree of arrays.

    Example:
      >>> import jax, jax.numpy as jnp, optax, jaxsam
      >>> loss = lambda w: jnp.sum((w - 1.0) ** 2)
      >>> w = jnp.zeros(3)
      >>> tx = optax.chain(jaxsam.momentum_sam_transform(rho=0.1, momentum=0.9), optax.sgd(0.1, momentum=0.9))
      >>> state = tx.init(w)
      >>> for _ in range(3):
      ...     g = jax.grad(loss)(jaxsam.gradient_point(state, w))   # one gradient per step
      ...     updates, state = tx.update(g, state, w)
      ...     w = optax.apply_updates(w, updates)
    """
    name = "momentum_sam_transform"
    example = "rho=3.0, momentum=0.9"
    c.check_rho(rho, name, example)
    c.check_interval(momentum, "momentum", name, example, low_open=False, high_open=True)

    def init_fn(params: Params) -> MomentumSAMState:
        return MomentumSAMState(count=jnp.zeros([], jnp.int32), momentum=optax.tree.zeros_like(params),
                                scale=jnp.zeros([], optax.tree.dtype(params, "highest")))  # fmt: skip

    def update_fn(updates, state: MomentumSAMState, params: Optional[Params] = None, **extra_args):
        del params, extra_args  # the gradient was taken at gradient_point(state, params) already
        grads = c.pmean(updates, axis_name)
        selected = c.select(c.resolve_mask(mask, grads), grads)
        velocity = jax.tree.map(lambda v, g: (momentum * v + g).astype(v.dtype), state.momentum, selected)
        count = optax.safe_increment(state.count)
        scale = -c.rho_at(rho, count) / (optax.tree.norm(velocity) + eps)  # ρ of the step that will use it
        return grads, MomentumSAMState(count=count, momentum=velocity, scale=scale.astype(state.scale.dtype))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def gradient_point(opt_state: Any, params: Params) -> Params:
    """Where the train step takes its gradient: w + ε for Momentum-SAM, `params` itself for every other member.

    Finds the `MomentumSAMState` anywhere in `opt_state` (a chain,
    `inject_hyperparams`, `MultiSteps`, `nnx.as_pure(optimizer.opt_state)`).
    Without one it returns `params` unchanged (the same object), so a train
    step written with it computes exactly what it computed before for SAM,
    ASAM, GSAM, LookSAM, F-SAM, VaSSO and the base optimizer.

    Args:
      opt_state: the whole optimizer state.
      params: the current (unperturbed) parameters w_t.

    Returns:
      w_t − ρ v_t/‖v_t‖ with the dtypes of `params`, or `params`.

    Example:
      >>> import jax.numpy as jnp, optax, jaxsam
      >>> w = jnp.ones(2)
      >>> jaxsam.gradient_point(optax.sgd(0.1).init(w), w) is w
      True
    """
    found = c.find_states(opt_state, MomentumSAMState)
    if not found:
        return params
    if len(found) > 1:
        raise ValueError(f"gradient_point: the optimizer state holds {len(found)} Momentum-SAM states; chain one")
    state = found[0]
    return jax.tree.map(lambda w, v: (w + state.scale * v).astype(jnp.result_type(w)), params, state.momentum)
