"""The SAM family as optax gradient transformations.

Sharpness-Aware Minimization (Foret et al. 2021, "Sharpness-Aware Minimization
for Efficiently Improving Generalization") replaces the gradient g = ∇L(w) by
the gradient at the worst point of a first-order model of the loss on a ball
of radius ρ:

    ε = ρ g / ‖g‖,        g_SAM = ∇L(w + ε).

Each transform here is an `optax.GradientTransformationExtraArgs` whose

    update(updates, state, params, *, grad_fn)

receives the clean gradient in `updates` and `grad_fn(p)`, the gradient of the
same minibatch loss at any parameters `p`, and returns the gradient at the
perturbed point. Whatever is chained after it (sgd, adam, weight decay,
clipping) sees one ordinary gradient, so one `update` call is one SAM step:

    tx = optax.chain(sam_transform(rho=0.05), optax.sgd(0.1, momentum=0.9))
    grads = jax.grad(loss)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   grad_fn=lambda p: jax.grad(loss)(p, batch))

Put the SAM transform first in the chain: the clean gradient it receives and
the gradients `grad_fn` returns must be the same kind of quantity.

Variants:

* ASAM (Kwon et al. 2021, "ASAM: Adaptive Sharpness-Aware Minimization"):
  `sam_transform(adaptive=True)`, ε = ρ T² g / ‖T g‖ with T = |w| + η
  elementwise, so the ball is scale-invariant.
* GSAM (Zhuang et al. 2022, "Surrogate Gap Guided Sharpness-Aware
  Minimization"): `gsam_transform`, returns g_SAM − α g_⊥, where g_⊥ is the
  part of the clean gradient orthogonal to g_SAM.
* LookSAM (Liu et al. 2022, "Towards Efficient and Scalable Sharpness-Aware
  Minimization"): `looksam_transform`, the second gradient only every k steps;
  in between, the stored component of g_SAM orthogonal to g is reused.

Common to all: ρ may be a Python number, an array (also a traced one, so
`optax.inject_hyperparams(sam_transform)(rho=0.05)` works under `jax.jit` and
`jax.vmap` over ρ sweeps it) or an optax schedule of the transform's own step
count (see `rho_following_lr` for GSAM's learning-rate-proportional ρ); η and
α may be arrays too. Python values are checked when the transform is built.
ρ = 0 returns the clean gradient exactly (no second gradient is computed); a
zero gradient gives a finite result (ε has `eps` in its denominator); the state
is a pytree of arrays; `axis_name` makes the perturbation use each device's own
gradient inside a per-device mapped step (`jax.shard_map`, `pmap`, or `vmap`
with an axis name) and averages the result over the axis (m-sharpness with
m = the per-device batch, as in the SAM paper); `mask` perturbs only the
selected parameters.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import chex
import jax
import jax.numpy as jnp
import optax

Params = Any
GradFn = Callable[[Params], Params]
Rho = Union[float, chex.Array, optax.Schedule]
Mask = Union[None, Params, Callable[[Params], Params]]

__all__ = [
    "SAMState",
    "LookSAMState",
    "sam_transform",
    "gsam_transform",
    "looksam_transform",
    "sam_perturbation",
    "kernels_only_mask",
    "rho_following_lr",
]


class SAMState(NamedTuple):
    """State of `sam_transform` and `gsam_transform`."""

    count: chex.Array  # int32 number of updates so far; the ρ schedule reads it.


class LookSAMState(NamedTuple):
    """State of `looksam_transform`."""

    count: chex.Array  # int32 number of updates so far.
    orthogonal: optax.Updates  # g_v: part of the last SAM gradient orthogonal to its clean gradient.


# ---------------------------------------------------------------------------
# Argument checks: each message says how to call it.


def _traced(value: Any) -> bool:
    """A value known only inside a trace (jit, vmap, inject_hyperparams under jit): no Python checks."""
    return isinstance(value, jax.core.Tracer)


def _check_rho(rho: Rho, name: str) -> None:
    if callable(rho) or _traced(rho):
        return
    try:
        value = float(rho)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"{name}: rho must be a number, an array or an optax schedule step -> rho (got {rho!r}), "
            f"e.g. {name}(rho=0.05)"
        ) from err
    if not value >= 0.0 or value == float("inf"):
        raise ValueError(f"{name}: rho must be a finite number >= 0 (got {rho!r}); e.g. {name}(rho=0.05)")


def _check_nonnegative(value: float, what: str, name: str, example: str) -> None:
    if _traced(value) or callable(value):
        return
    if not float(value) >= 0.0:
        raise ValueError(f"{name}: {what} must be >= 0 (got {value!r}); e.g. {name}({example})")


def _check_update_args(name: str, params: Optional[Params], grad_fn: Optional[GradFn]) -> None:
    how = (
        "call tx.update(grads, opt_state, params, grad_fn=lambda p: jax.grad(loss_fn)(p, batch)) "
        "with the same batch as grads"
    )
    if grad_fn is None:
        raise TypeError(f"{name}.update needs grad_fn, the gradient at other parameters for this batch: {how}")
    if not callable(grad_fn):
        raise TypeError(f"{name}.update: grad_fn must be a function params -> gradient (got {type(grad_fn).__name__}): {how}")
    if params is None:
        raise TypeError(f"{name}.update needs the current params to perturb: {how}")


def _check_gradient(name: str, grads: Params, params: Params) -> Params:
    """`grads` if it is shaped like `params`; else a TypeError that says what grad_fn returned."""
    want = jax.tree.structure(params)
    if jax.tree.structure(grads) == want:
        return grads
    if isinstance(grads, tuple) and len(grads) == 2 and any(jax.tree.structure(g) == want for g in grads):
        raise TypeError(
            f"{name}: grad_fn returned a pair (like jax.value_and_grad or has_aux=True give), not the gradient: "
            "return the gradient alone, e.g. grad_fn=lambda p: jax.grad(loss_fn)(p, batch)"
        )
    raise TypeError(
        f"{name}: grad_fn must return a gradient shaped like params ({want.num_leaves} leaves), "
        f"got {jax.tree.structure(grads)}"
    )


# ---------------------------------------------------------------------------
# Pure helpers.


def kernels_only_mask(params: Params) -> Params:
    """Mask selecting weight matrices and convolution kernels (ndim >= 2).

    Pass as `mask=kernels_only_mask` to leave biases and BatchNorm scales and
    offsets unperturbed.
    """
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def _resolve_mask(mask: Mask, params: Params) -> Optional[Params]:
    if mask is None:
        return None
    return mask(params) if callable(mask) else mask


def _select(mask_tree: Optional[Params], tree: Params) -> Params:
    """Zeroes the leaves (or entries) the mask leaves out."""
    if mask_tree is None:
        return tree
    return jax.tree.map(lambda m, x: jnp.where(m, x, jnp.zeros_like(x)), mask_tree, tree)


def sam_perturbation(
    grads: Params,
    params: Params,
    rho: Union[float, chex.Array],
    *,
    adaptive: bool = False,
    eta: float = 0.01,
    eps: float = 1e-12,
    mask: Mask = None,
) -> Params:
    """The SAM (or ASAM) ascent step ε, a pytree like `params`.

    SAM:  ε = ρ g / (‖g‖ + eps).
    ASAM: ε = ρ T² g / (‖T g‖ + eps), T = |w| + η elementwise.

    With `mask`, only the selected entries are perturbed and the norm is taken
    over them alone.

    Args:
      grads: the clean gradient g.
      params: the parameters w (ASAM scales by them).
      rho: ball radius.
      adaptive: ASAM instead of SAM.
      eta: ASAM's offset η, keeps zero weights perturbable.
      eps: added to the norm so a zero gradient gives ε = 0.
      mask: pytree of bools like params, or a function params -> such a pytree.

    Returns:
      ε with the dtype of each parameter leaf.
    """
    grads = _select(_resolve_mask(mask, params), grads)
    if adaptive:
        scale = jax.tree.map(lambda w: jnp.abs(w) + eta, params)
        scaled = jax.tree.map(jnp.multiply, scale, grads)  # T g
        norm = optax.tree.norm(scaled)
        direction = jax.tree.map(jnp.multiply, scale, scaled)  # T² g
    else:
        norm = optax.tree.norm(grads)
        direction = grads
    factor = rho / (norm + eps)
    return jax.tree.map(lambda d, w: (factor * d).astype(jnp.result_type(w)), direction, params)


def _ascent(name: str, rho: Rho, *, adaptive: bool, eta: float, eps: float, mask: Mask, example: str):
    """Checks the ball's arguments and returns `(grad_fn, grads, params, rho_t) -> ∇L(w + ε)`."""
    _check_rho(rho, name)
    _check_nonnegative(eta, "eta", name, example)

    def perturbed_gradient(grad_fn: GradFn, grads: Params, params: Params, rho_t) -> Params:
        epsilon = sam_perturbation(grads, params, rho_t, adaptive=adaptive, eta=eta, eps=eps, mask=mask)
        return _check_gradient(name, grad_fn(jax.tree.map(jnp.add, params, epsilon)), params)

    return perturbed_gradient


def _count_state(params: Params) -> SAMState:
    del params
    return SAMState(count=jnp.zeros([], jnp.int32))


def _pmean(tree: Params, axis_name: Optional[str]) -> Params:
    return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def _rho_at(rho: Rho, count: chex.Array):
    return rho(count) if callable(rho) else rho


def _unless_rho_zero(rho: Rho, rho_t, sam_branch: Callable[[], Any], clean_branch: Callable[[], Any]):
    """Runs `sam_branch` unless ρ is zero; then `clean_branch`, so ρ = 0 is the base optimizer exactly.

    A ρ given as a Python number (or a concrete array) is decided in Python; a
    scheduled or traced ρ (`inject_hyperparams` under jit, `vmap` over ρ) with
    `lax.cond`, so steps where ρ is zero (e.g. a warm-up) skip the second
    gradient and return the clean one exactly (under `vmap`, where `cond`
    becomes a select, both are computed and the clean one is still exact).
    """
    if not callable(rho) and not _traced(rho):
        return clean_branch() if float(rho) == 0.0 else sam_branch()
    return jax.lax.cond(rho_t > 0, sam_branch, clean_branch)


def rho_following_lr(
    lr_schedule: optax.Schedule, rho_max: float, rho_min: float = 0.0, *, lr_max: float, lr_min: float = 0.0
) -> optax.Schedule:
    """ρ proportional to the learning rate, as GSAM (Zhuang et al. 2022, eq. 9) uses:

        ρ_t = ρ_min + (ρ_max − ρ_min) (lr_t − lr_min) / (lr_max − lr_min).

    The SAM transforms count their own updates, which is the same count the
    optimizer chained after them passes to `lr_schedule`.
    """
    _check_nonnegative(rho_min, "rho_min", "rho_following_lr", "lr_schedule, rho_max=0.05, lr_max=0.1")
    _check_nonnegative(rho_max, "rho_max", "rho_following_lr", "lr_schedule, rho_max=0.05, lr_max=0.1")
    if not lr_max > lr_min:
        raise ValueError(f"rho_following_lr: lr_max must exceed lr_min (got lr_max={lr_max!r}, lr_min={lr_min!r})")

    def schedule(count):
        fraction = (lr_schedule(count) - lr_min) / (lr_max - lr_min)
        return jnp.maximum(rho_min + (rho_max - rho_min) * fraction, 0.0)

    return schedule


# ---------------------------------------------------------------------------
# Transforms.


def sam_transform(
    rho: Rho = 0.05,
    *,
    adaptive: bool = False,
    eta: float = 0.01,
    eps: float = 1e-12,
    axis_name: Optional[str] = None,
    mask: Mask = None,
) -> optax.GradientTransformationExtraArgs:
    """SAM (Foret et al. 2021), or ASAM (Kwon et al. 2021) with `adaptive=True`.

    Returns ∇L(w + ε) with ε = ρ g/‖g‖ (SAM) or ε = ρ T² g/‖T g‖, T = |w| + η
    (ASAM), where g is the clean gradient passed as `updates`.

    Args:
      rho: ball radius ρ >= 0: a number, an array (traced ones too:
        `inject_hyperparams`, `vmap`), or an optax schedule of the step count.
      adaptive: use ASAM's scale-invariant ball.
      eta: ASAM's η >= 0.
      eps: added to the norm in ε's denominator.
      axis_name: inside a per-device mapped step, perturb with the device's own
        gradient and `pmean` the perturbed gradients over this axis.
      mask: perturb only the selected parameters (pytree of bools or a
        function params -> pytree of bools, e.g. `kernels_only_mask`).

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
    ascent = _ascent(name, rho, adaptive=adaptive, eta=eta, eps=eps, mask=mask, example="rho=0.5, adaptive=True, eta=0.01")

    def update_fn(updates, state: SAMState, params=None, *, grad_fn: Optional[GradFn] = None, **extra_args):
        del extra_args
        _check_update_args(name, params, grad_fn)
        rho_t = _rho_at(rho, state.count)
        perturbed = _unless_rho_zero(rho, rho_t, lambda: ascent(grad_fn, updates, params, rho_t), lambda: updates)
        return _pmean(perturbed, axis_name), SAMState(count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(_count_state, update_fn)


def gsam_transform(
    rho: Rho = 0.05,
    alpha: float = 0.1,
    *,
    adaptive: bool = False,
    eta: float = 0.01,
    eps: float = 1e-12,
    axis_name: Optional[str] = None,
    mask: Mask = None,
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
      adaptive, eta, eps, axis_name, mask: as in `sam_transform`.

    Example:
      >>> import optax, jaxsam
      >>> lr = optax.cosine_decay_schedule(0.1, 1000)
      >>> tx = optax.chain(
      ...     jaxsam.gsam_transform(jaxsam.rho_following_lr(lr, 0.05, 0.005, lr_max=0.1), alpha=0.1),
      ...     optax.sgd(lr, momentum=0.9))
    """
    name = "gsam_transform"
    ascent = _ascent(name, rho, adaptive=adaptive, eta=eta, eps=eps, mask=mask, example="rho=0.05, alpha=0.1, eta=0.01")
    if not _traced(alpha) and not jnp.isfinite(alpha):
        raise ValueError(f"{name}: alpha must be a finite number (got {alpha!r}); e.g. {name}(rho=0.05, alpha=0.1)")

    def update_fn(updates, state: SAMState, params=None, *, grad_fn: Optional[GradFn] = None, **extra_args):
        del extra_args
        _check_update_args(name, params, grad_fn)
        rho_t = _rho_at(rho, state.count)

        def gsam_branch():
            perturbed = ascent(grad_fn, updates, params, rho_t)
            clean = _pmean(updates, axis_name)
            perturbed = _pmean(perturbed, axis_name)
            along = optax.tree.vdot(clean, perturbed) / (optax.tree.norm(perturbed, squared=True) + eps)
            orthogonal = optax.tree.add_scale(clean, -along, perturbed)
            return optax.tree.add_scale(perturbed, -alpha, orthogonal)

        result = _unless_rho_zero(rho, rho_t, gsam_branch, lambda: _pmean(updates, axis_name))
        return result, SAMState(count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(_count_state, update_fn)


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
) -> optax.GradientTransformationExtraArgs:
    """LookSAM (Liu et al. 2022): the SAM gradient every k steps, reused in between.

    On steps t ≡ 0 (mod k) it computes g_s = ∇L(w + ε) like SAM, returns it, and
    stores the part of g_s orthogonal to the clean gradient g,

        g_v = g_s − (⟨g, g_s⟩ / ‖g‖²) g.

    On the other steps it computes no second gradient and returns

        g + α (‖g‖ / ‖g_v‖) g_v.

    The skipping is a real `lax.cond`, so a step costs about 1 + 1/k
    gradients. k = 1 is SAM. With `axis_name`, g and g_s are averaged over
    devices before the decomposition, so g_v is the same on every device.

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
      adaptive, eta, eps, axis_name, mask: as in `sam_transform`.

    Example:
      >>> import optax, jaxsam
      >>> tx = optax.chain(jaxsam.looksam_transform(rho=0.05, k=5, alpha=0.7), optax.adam(1e-3))
    """
    name = "looksam_transform"
    ascent = _ascent(name, rho, adaptive=adaptive, eta=eta, eps=eps, mask=mask, example="rho=0.05, k=5, eta=0.01")
    _check_nonnegative(alpha, "alpha", name, "rho=0.05, k=5, alpha=0.7")
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"{name}: k must be an integer >= 1 (got {k!r}); e.g. {name}(rho=0.05, k=5)")
    k = int(k)

    def init_fn(params: Params) -> LookSAMState:
        return LookSAMState(count=jnp.zeros([], jnp.int32), orthogonal=optax.tree.zeros_like(params))

    def update_fn(
        updates,
        state: LookSAMState,
        params=None,
        *,
        grad_fn: Optional[GradFn] = None,
        sam_step: Optional[bool] = None,
        **extra_args,
    ):
        del extra_args
        _check_update_args(name, params, grad_fn)
        rho_t = _rho_at(rho, state.count)
        clean = _pmean(updates, axis_name)

        def full_step():
            perturbed = _pmean(ascent(grad_fn, updates, params, rho_t), axis_name)
            along = optax.tree.vdot(clean, perturbed) / (optax.tree.norm(clean, squared=True) + eps)
            return perturbed, optax.tree.add_scale(perturbed, -along, clean)

        def reuse_step():
            scale = alpha * optax.tree.norm(clean) / (optax.tree.norm(state.orthogonal) + eps)
            return optax.tree.add_scale(clean, scale, state.orthogonal), state.orthogonal

        def looksam_branch():
            if k == 1:
                return full_step()
            if sam_step is not None:  # the caller decided, outside the compiled step
                return full_step() if sam_step else reuse_step()
            return jax.lax.cond(state.count % k == 0, full_step, reuse_step)

        result, orthogonal = _unless_rho_zero(rho, rho_t, looksam_branch, lambda: (clean, state.orthogonal))
        return result, LookSAMState(count=optax.safe_increment(state.count), orthogonal=orthogonal)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
