"""SAM, ASAM, GSAM and LookSAM: the members that perturb along the clean minibatch gradient."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from jaxsam.sam import _common as c
from jaxsam.sam._common import GradFn, Leaves, Mask, Rho


class SAMState(NamedTuple):
    """State of `sam_transform` and `gsam_transform`."""

    count: chex.Array  # int32 number of updates so far; the ρ schedule reads it.


class LookSAMState(NamedTuple):
    """State of `looksam_transform`."""

    count: chex.Array  # int32 number of updates so far.
    orthogonal: optax.Updates  # g_v: part of the last SAM gradient orthogonal to its clean gradient.


def _count_state(params) -> SAMState:
    del params
    return SAMState(count=jnp.zeros([], jnp.int32))


def rho_following_lr(
    lr_schedule: optax.Schedule, rho_max: float, rho_min: float = 0.0, *, lr_max: float, lr_min: float = 0.0
) -> optax.Schedule:
    """ρ proportional to the learning rate, as GSAM (Zhuang et al. 2022, eq. 9) uses:

        ρ_t = ρ_min + (ρ_max − ρ_min) (lr_t − lr_min) / (lr_max − lr_min).

    The SAM transforms count their own updates, which is the same count the
    optimizer chained after them passes to `lr_schedule`.

    Example:
      >>> import optax, jaxsam
      >>> lr = optax.cosine_decay_schedule(0.1, 1000)
      >>> rho = jaxsam.rho_following_lr(lr, 0.05, 0.005, lr_max=0.1)
    """
    example = "lr_schedule, rho_max=0.05, lr_max=0.1"
    c.check_nonnegative(rho_min, "rho_min", "rho_following_lr", example)
    c.check_nonnegative(rho_max, "rho_max", "rho_following_lr", example)
    if not lr_max > lr_min:
        raise ValueError(f"rho_following_lr: lr_max must exceed lr_min (got lr_max={lr_max!r}, lr_min={lr_min!r})")

    def schedule(count):
        fraction = (lr_schedule(count) - lr_min) / (lr_max - lr_min)
        return jnp.maximum(rho_min + (rho_max - rho_min) * fraction, 0.0)

    return schedule


def sam_transform(
    rho: Rho = 0.05,
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
    """SAM (Foret et al. 2021), or ASAM (Kwon et al. 2021) with `adaptive=True`.

    Returns ∇L(w + ε) with ε = ρ g/‖g‖ (SAM) or
    ε = ρ T² g/‖T g‖, T = |w| + η (ASAM), where g is the clean gradient passed
    as `updates`.

    Args:
      rho: ball radius ρ >= 0: a number, an array (traced ones too:
        `inject_hyperparams`, `vmap`), or an optax schedule of the step count.
      adaptive: use ASAM's scale-invariant ball.
      eta: ASAM's η >= 0 (0: davda54/sam's T = |w|).
      eps: added to the norm in ε's denominator.
      axis_name: inside a per-device mapped step, perturb with the device's own
        gradient and `pmean` the perturbed gradients over this axis.
      mask: perturb only the selected parameters (pytree of bools or a
        function params -> pytree of bools, e.g. `kernels_only_mask`).
      adaptive_leaves: which leaves ASAM scales by |w| + η (others: T = 1):
        "all", "weights" (not named "bias": Kwon et al.'s code), "kernels", or
        a pytree / function like `mask`.
      has_aux: `grad_fn` returns `(gradient, aux)` (as `jax.grad(...,
        has_aux=True)`); the perturbed pass's aux is kept in the state
        (`AuxState(inner, aux)`, read with `jaxsam.sam_aux(opt_state)`).
      aux_init: the aux before the first perturbed pass, a pytree shaped like
        the aux (e.g. `PerturbedAux.like(batch_stats)`); default a scalar loss.

    Returns:
      An `optax.GradientTransformationExtraArgs`; call `update(grads, state,
      params, grad_fn=...)`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, jaxsam
      >>> loss = lambda w, x: jnp.sum((x @ w) ** 2)
      >>> w, x = jnp.ones(3), jnp.eye(3)
      >>> tx = optax.chain(jaxsam.sam_transform(rho=0.05), optax.sgd(0.1))
      >>> state = tx.init(w)
      >>> g = jax.grad(loss)(w, x)
      >>> updates, state = tx.update(g, state, w, grad_fn=lambda p: jax.grad(loss)(p, x))
      >>> w = optax.apply_updates(w, updates)
    """
    name = "sam_transform"
    ascent = c.ascent(name, rho, adaptive=adaptive, eta=eta, eps=eps, mask=mask, adaptive_leaves=adaptive_leaves,
                      has_aux=has_aux, axis_name=axis_name, example="rho=0.5, adaptive=True, eta=0.01")  # fmt: skip

    def update_core(updates, state: SAMState, params, grad_fn: Optional[GradFn], aux, **extra_args):
        del extra_args
        c.check_update_args(name, params, grad_fn, has_aux)
        rho_t = c.rho_at(rho, state.count)
        perturbed, aux = c.unless_rho_zero(rho, rho_t, lambda: ascent(grad_fn, updates, params, rho_t, aux),
                                           lambda: (updates, aux))  # fmt: skip
        return c.pmean(perturbed, axis_name), SAMState(count=optax.safe_increment(state.count)), aux

    return c.with_aux(_count_state, update_core, has_aux=has_aux, aux_init=aux_init)


def gsam_transform(
    rho: Rho = 0.05,
    alpha: float = 0.1,
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
    """GSAM (Zhuang et al. 2022): SAM with the surrogate-gap correction.

    With g the clean gradient and g_p = ∇L(w + ε) the SAM gradient, split g
    into its component along g_p and the orthogonal rest,

        g_⊥ = g − (⟨g, g_p⟩ / ‖g_p‖²) g_p,

    and return g_p − α g_⊥: descending g_p minimizes the perturbed loss, and
    ascending g_⊥ shrinks the surrogate gap L(w + ε) − L(w) without fighting
    g_p. α = 0 is SAM. The paper pairs it with a ρ proportional to the
    learning rate (`rho_following_lr`). With `axis_name`, both gradients are
    averaged over devices before the decomposition.

    Args:
      rho: ball radius ρ >= 0 or a schedule.
      alpha: weight α of the ascent along g_⊥ (the paper uses 0.01-0.3).
      adaptive, eta, eps, axis_name, mask, adaptive_leaves, has_aux, aux_init: as in `sam_transform`.

    Returns:
      An `optax.GradientTransformationExtraArgs`; call `update(grads, state, params, grad_fn=...)`.

    Example:
      >>> import optax, jaxsam
      >>> lr = optax.cosine_decay_schedule(0.1, 1000)
      >>> tx = optax.chain(
      ...     jaxsam.gsam_transform(jaxsam.rho_following_lr(lr, 0.05, 0.005, lr_max=0.1), alpha=0.1),
      ...     optax.sgd(lr, momentum=0.9))
    """
    name = "gsam_transform"
    ascent = c.ascent(name, rho, adaptive=adaptive, eta=eta, eps=eps, mask=mask, adaptive_leaves=adaptive_leaves,
                      has_aux=has_aux, axis_name=axis_name, example="rho=0.05, alpha=0.1, eta=0.01")  # fmt: skip
    c.check_finite(alpha, "alpha", name, "rho=0.05, alpha=0.1")

    def update_core(updates, state: SAMState, params, grad_fn: Optional[GradFn], aux, **extra_args):
        del extra_args
        c.check_update_args(name, params, grad_fn, has_aux)
        rho_t = c.rho_at(rho, state.count)

        def gsam_branch():
            perturbed, new_aux = ascent(grad_fn, updates, params, rho_t, aux)
            clean = c.pmean(updates, axis_name)
            perturbed = c.pmean(perturbed, axis_name)
            along = optax.tree.vdot(clean, perturbed) / (optax.tree.norm(perturbed, squared=True) + eps)
            orthogonal = optax.tree.add_scale(clean, -along, perturbed)
            return optax.tree.add_scale(perturbed, -alpha, orthogonal), new_aux

        result, aux = c.unless_rho_zero(rho, rho_t, gsam_branch, lambda: (c.pmean(updates, axis_name), aux))
        return result, SAMState(count=optax.safe_increment(state.count)), aux

    return c.with_aux(_count_state, update_core, has_aux=has_aux, aux_init=aux_init)


def looksam_transform(
    rho: Rho = 0.05,
    k: int = 5,
    alpha: float = 0.7,
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
    """LookSAM (Liu et al. 2022): the SAM gradient every k steps, reused in between.

    On steps t ≡ 0 (mod k) it computes g_s = ∇L(w + ε) like SAM, returns it, and
    stores the part of g_s orthogonal to the clean gradient g,

        g_v = g_s − (⟨g, g_s⟩ / ‖g‖²) g.

    On the other steps it computes no second gradient and returns

        g + α (‖g‖ / ‖g_v‖) g_v.

    The skipping is a real `lax.cond`, so a step costs about 1 + 1/k
    gradients. k = 1 is SAM. With `axis_name`, g and g_s are averaged over
    devices before the decomposition, so g_v is the same on every device. With
    `has_aux`, the aux stays the last SAM step's on the reuse steps.

    `update(..., sam_step=True/False)` (a Python bool) takes the branch
    without the `lax.cond`, for a caller that compiles the two steps
    separately and picks one per step (t % k == 0 for the SAM step): XLA:CPU
    runs gradients inside a conditional branch about 10x slower, so jaxsam's
    train loop does this on the CPU backend.

    With `optax.inject_hyperparams`, name k static:
    `optax.inject_hyperparams(looksam_transform, static_args=("k",))(rho=0.05, k=5)`.

    Args:
      rho: ball radius ρ >= 0 or a schedule.
      k: interval of the full SAM step, >= 1 (the paper uses 5).
      alpha: weight α >= 0 of the reused direction (the paper uses 0.7).
      adaptive, eta, eps, axis_name, mask, adaptive_leaves, has_aux, aux_init: as in `sam_transform`.

    Returns:
      An `optax.GradientTransformationExtraArgs`; call `update(grads, state, params, grad_fn=...)`.

    Example:
      >>> import optax, jaxsam
      >>> tx = optax.chain(jaxsam.looksam_transform(rho=0.05, k=5, alpha=0.7), optax.adam(1e-3))
    """
    name = "looksam_transform"
    ascent = c.ascent(name, rho, adaptive=adaptive, eta=eta, eps=eps, mask=mask, adaptive_leaves=adaptive_leaves,
                      has_aux=has_aux, axis_name=axis_name, example="rho=0.05, k=5, eta=0.01")  # fmt: skip
    c.check_nonnegative(alpha, "alpha", name, "rho=0.05, k=5, alpha=0.7")
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"{name}: k must be an integer >= 1 (got {k!r}); e.g. {name}(rho=0.05, k=5)")
    k = int(k)

    def init_fn(params) -> LookSAMState:
        return LookSAMState(count=jnp.zeros([], jnp.int32), orthogonal=optax.tree.zeros_like(params))

    def update_core(updates, state: LookSAMState, params, grad_fn: Optional[GradFn], aux, *,
                    sam_step: Optional[bool] = None, **extra_args):  # fmt: skip
        del extra_args
        c.check_update_args(name, params, grad_fn, has_aux)
        rho_t = c.rho_at(rho, state.count)
        clean = c.pmean(updates, axis_name)

        def full_step():
            perturbed, new_aux = ascent(grad_fn, updates, params, rho_t, aux)
            perturbed = c.pmean(perturbed, axis_name)
            along = optax.tree.vdot(clean, perturbed) / (optax.tree.norm(clean, squared=True) + eps)
            return perturbed, optax.tree.add_scale(perturbed, -along, clean), new_aux

        def reuse_step():
            scale = alpha * optax.tree.norm(clean) / (optax.tree.norm(state.orthogonal) + eps)
            return optax.tree.add_scale(clean, scale, state.orthogonal), state.orthogonal, aux

        def looksam_branch():
            if k == 1:
                return full_step()
            if sam_step is not None:  # the caller decided, outside the compiled step
                return full_step() if sam_step else reuse_step()
            return jax.lax.cond(state.count % k == 0, full_step, reuse_step)

        result, orthogonal, aux = c.unless_rho_zero(rho, rho_t, looksam_branch, lambda: (clean, state.orthogonal, aux))
        return result, LookSAMState(count=optax.safe_increment(state.count), orthogonal=orthogonal), aux

    return c.with_aux(init_fn, update_core, has_aux=has_aux, aux_init=aux_init)
