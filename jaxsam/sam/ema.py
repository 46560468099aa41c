"""Friendly-SAM and VaSSO: members that perturb along a moving average of past minibatch gradients.

Both keep one parameter-sized average in their state and, like SAM, take the
second gradient through `grad_fn`, so a step costs two gradients.

Sources of the update rules: the papers' method sections as rendered in
secondary sources available here, checked against the authors' code
(github.com/nblt/F-SAM `utils.py` FriendlySAM, github.com/BingcongLi/VaSSO
`solver/vasso.py`); equation numbers of the PDFs could not be checked here, so
none are quoted.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from jaxsam.sam import _common as c
from jaxsam.sam._common import GradFn, Leaves, Mask, Rho


class FriendlySAMState(NamedTuple):
    """State of `friendly_sam_transform`."""

    count: chex.Array  # int32 number of updates so far; the ρ schedule reads it.
    ema: optax.Updates  # m_t: moving average of the (device-averaged) minibatch gradients.


class VaSSOState(NamedTuple):
    """State of `vasso_transform`."""

    count: chex.Array  # int32 number of updates so far.
    direction: optax.Updates  # d_t: the variance-suppressed average of the minibatch gradients.


def _ema_init(state_type):
    def init_fn(params):
        return state_type(jnp.zeros([], jnp.int32), optax.tree.zeros_like(params))

    return init_fn


def friendly_sam_transform(
    rho: Rho = 0.05,
    sigma: float = 1.0,
    lmbda: float = 0.95,
    *,
    adaptive: bool = False,
    eta: float = 0.01,
    eps: float = 1e-12,
    axis_name: Optional[str] = None,
    mask: Mask = None,
    adaptive_leaves: Leaves = "all",
    has_aux: bool = False,
    aux_init: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Friendly-SAM (F-SAM; Li, Zhou, He, Cheng & Huang, CVPR 2024, "Friendly Sharpness-Aware Minimization").

    SAM's ascent direction, the minibatch gradient g_t, is the full-batch
    gradient plus the batch's stochastic gradient noise; F-SAM perturbs along
    the noise alone. The full-batch part is estimated by a moving average of
    past minibatch gradients:

        m_t = λ m_{t−1} + (1 − λ) g_t,      m_{−1} = 0,
        d_t = g_t − σ m_t,
        ε_t = ρ d_t / ‖d_t‖,                returns ∇L_B(w_t + ε_t).

    σ = 1 and λ ∈ (0, 1) as in the paper's experiments. With σ = 1,
    d_t = λ (g_t − m_{t−1}): the same direction as the authors' code, which
    subtracts the average before g_t enters it (their average starts at
    m_0 = g_0 instead of 0, so the first steps differ). σ = 0 is SAM.

    With `axis_name`, m_t averages the device-averaged gradient (one estimate
    of the full gradient, the same on every device) and each device perturbs
    along its own noise g_t − σ m_t; the perturbed gradients are averaged.
    The average is updated on every step, also where ρ is zero.

    Args:
      rho: ball radius ρ >= 0, a number, array or schedule (the authors use
        SAM's ρ: 0.05 on CIFAR-10, 0.1-0.2 on CIFAR-100).
      sigma: σ >= 0, how much of the estimated full gradient is removed (1).
      lmbda: λ in [0, 1), the average's decay; default 0.95, the authors'
        code default (their run.sh example uses 0.6).
      adaptive, eta, eps, axis_name, mask, adaptive_leaves, has_aux, aux_init: as in `sam_transform`.

    Returns:
      An `optax.GradientTransformationExtraArgs`; call `update(grads, state, params, grad_fn=...)`.
      Its state, `FriendlySAMState(count, ema)`, is a pytree of arrays.

    Example:
      >>> import optax, jaxsam
      >>> tx = optax.chain(jaxsam.friendly_sam_transform(rho=0.05, sigma=1.0, lmbda=0.95),
      ...                  optax.sgd(0.05, momentum=0.9))
    """
    name = "friendly_sam_transform"
    example = "rho=0.05, sigma=1.0, lmbda=0.95"
    ascent = c.ascent(name, rho, adaptive=adaptive, eta=eta, eps=eps, mask=mask, adaptive_leaves=adaptive_leaves,
                      has_aux=has_aux, axis_name=axis_name, example=example)  # fmt: skip
    c.check_nonnegative(sigma, "sigma", name, example)
    c.check_interval(lmbda, "lmbda", name, example, low_open=False, high_open=True)

    def update_core(updates, state: FriendlySAMState, params, grad_fn: Optional[GradFn], aux, **extra_args):
        del extra_args
        c.check_update_args(name, params, grad_fn, has_aux)
        rho_t = c.rho_at(rho, state.count)
        clean = c.pmean(updates, axis_name)
        ema = jax.tree.map(lambda m, g: (lmbda * m + (1 - lmbda) * g).astype(m.dtype), state.ema, clean)
        noise = jax.tree.map(lambda g, m: g - sigma * m, updates, ema)

        def friendly_branch():
            perturbed, new_aux = ascent(grad_fn, noise, params, rho_t, aux)
            return c.pmean(perturbed, axis_name), new_aux

        result, aux = c.unless_rho_zero(rho, rho_t, friendly_branch, lambda: (clean, aux))
        return result, FriendlySAMState(count=optax.safe_increment(state.count), ema=ema), aux

    return c.with_aux(_ema_init(FriendlySAMState), update_core, has_aux=has_aux, aux_init=aux_init)


def vasso_transform(
    rho: Rho = 0.05,
    theta: float = 0.9,
    *,
    adaptive: bool = False,
    eta: float = 0.01,
    eps: float = 1e-12,
    axis_name: Optional[str] = None,
    mask: Mask = None,
    adaptive_leaves: Leaves = "all",
    has_aux: bool = False,
    aux_init: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """VaSSO (Li & Giannakis, NeurIPS 2023, "Enhancing Sharpness-Aware Optimization Through Variance Suppression").

    SAM's adversary ε = ρ g_t/‖g_t‖ follows one minibatch's gradient, whose
    variance makes it "over-friendly"; VaSSO perturbs along a moving average
    of the minibatch gradients, which suppresses that variance:

        d_t = (1 − θ) d_{t−1} + θ g_t,      d_0 = g_0,
        ε_t = ρ d_t / ‖d_t‖,                returns ∇L_B(w_t + ε_t).

    θ = 1 is SAM. d_0 = g_0 as the authors' code starts it (the first step is
    SAM's). With `axis_name`, d_t averages the device-averaged gradient, so
    every device perturbs to the same point and takes its own batch's
    gradient there; the perturbed gradients are averaged. d_t is updated on
    every step, also where ρ is zero.

    Args:
      rho: ball radius ρ >= 0, a number, array or schedule (the authors' code
        default 0.05; 0.1-0.2 in their CIFAR-100 runs).
      theta: θ in (0, 1], the weight of the new gradient (0.9, the authors'
        code default and their example runs).
      adaptive, eta, eps, axis_name, mask, adaptive_leaves, has_aux, aux_init: as in `sam_transform`.

    Returns:
      An `optax.GradientTransformationExtraArgs`; call `update(grads, state, params, grad_fn=...)`.
      Its state, `VaSSOState(count, direction)`, is a pytree of arrays.

    Example:
      >>> import optax, jaxsam
      >>> tx = optax.chain(jaxsam.vasso_transform(rho=0.1, theta=0.9), optax.sgd(0.05, momentum=0.9))
    """
    name = "vasso_transform"
    example = "rho=0.05, theta=0.9"
    ascent = c.ascent(name, rho, adaptive=adaptive, eta=eta, eps=eps, mask=mask, adaptive_leaves=adaptive_leaves,
                      has_aux=has_aux, axis_name=axis_name, example=example)  # fmt: skip
    c.check_interval(theta, "theta", name, example, low_open=True, high_open=False)

    def update_core(updates, state: VaSSOState, params, grad_fn: Optional[GradFn], aux, **extra_args):
        del extra_args
        c.check_update_args(name, params, grad_fn, has_aux)
        rho_t = c.rho_at(rho, state.count)
        clean = c.pmean(updates, axis_name)
        first = state.count == 0
        direction = jax.tree.map(
            lambda d, g: jnp.where(first, g, (1 - theta) * d + theta * g).astype(d.dtype), state.direction, clean)

        def vasso_branch():
            perturbed, new_aux = ascent(grad_fn, direction, params, rho_t, aux)
            return c.pmean(perturbed, axis_name), new_aux

        result, aux = c.unless_rho_zero(rho, rho_t, vasso_branch, lambda: (clean, aux))
        return result, VaSSOState(count=optax.safe_increment(state.count), direction=direction), aux

    return c.with_aux(_ema_init(VaSSOState), update_core, has_aux=has_aux, aux_init=aux_init)
