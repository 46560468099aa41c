"""What every member of the SAM family shares: argument checks, the ball ε, the ρ = 0 switch and `has_aux`.

Nothing here is a transform; `jaxsam.sam.classic`, `.ema` and `.momentum` build them from these parts.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import chex
import jax
import jax.numpy as jnp
import optax

Params = Any
GradFn = Callable[[Params], Any]
Rho = Union[float, chex.Array, optax.Schedule]
Mask = Union[None, Params, Callable[[Params], Params]]
Leaves = Union[str, Params, Callable[[Params], Params]]

# Which leaves ASAM scales by T = |w| + η (the others get T = 1): see `sam_perturbation`.
ADAPTIVE_LEAVES = ("all", "weights", "kernels")


class AuxState(NamedTuple):
    """State of a SAM transform built with `has_aux=True`.

    `optax.tree.get(opt_state, "aux")` or `jaxsam.sam_aux(opt_state)` reads `aux`
    from a whole chain.
    """

    inner: Any  # the transform's own state (SAMState, LookSAMState, ...), as without has_aux
    aux: Any  # grad_fn's aux from the last perturbed pass; aux_init until the first one


# ---------------------------------------------------------------------------
# Argument checks: each message says how to call it.


def traced(value: Any) -> bool:
    """A value known only inside a trace (jit, vmap, inject_hyperparams under jit): no Python checks."""
    return isinstance(value, jax.core.Tracer)


def check_rho(rho: Rho, name: str, example: str = "rho=0.05") -> None:
    if callable(rho) or traced(rho):
        return
    try:
        value = float(rho)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"{name}: rho must be a number, an array or an optax schedule step -> rho (got {rho!r}), "
            f"e.g. {name}({example})"
        ) from err
    if not value >= 0.0 or value == float("inf"):
        raise ValueError(f"{name}: rho must be a finite number >= 0 (got {rho!r}); e.g. {name}({example})")


def check_nonnegative(value: Any, what: str, name: str, example: str) -> None:
    if traced(value) or callable(value):
        return
    if not float(value) >= 0.0:
        raise ValueError(f"{name}: {what} must be >= 0 (got {value!r}); e.g. {name}({example})")


def check_interval(value: Any, what: str, name: str, example: str, *, low_open: bool, high_open: bool) -> None:
    """`value` in [0, 1] with the named ends open; traced values pass (they are checked where they were made)."""
    if traced(value):
        return
    v = float(value)
    ok = (v > 0.0 if low_open else v >= 0.0) and (v < 1.0 if high_open else v <= 1.0)
    if not ok:
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise ValueError(f"{name}: {what} must be in {interval} (got {value!r}); e.g. {name}({example})")


def check_finite(value: Any, what: str, name: str, example: str) -> None:
    if not traced(value) and not jnp.isfinite(value):
        raise ValueError(f"{name}: {what} must be a finite number (got {value!r}); e.g. {name}({example})")


def check_adaptive_leaves(adaptive_leaves: Leaves, name: str) -> None:
    if isinstance(adaptive_leaves, str) and adaptive_leaves not in ADAPTIVE_LEAVES:
        raise ValueError(
            f"{name}: adaptive_leaves must be one of {', '.join(ADAPTIVE_LEAVES)}, a pytree of bools like params "
            f"or a function params -> such a pytree (got {adaptive_leaves!r}); e.g. {name}(adaptive=True, "
            "adaptive_leaves='weights') for Kwon et al.'s ball"
        )


def check_update_args(name: str, params: Optional[Params], grad_fn: Optional[GradFn], has_aux: bool) -> None:
    body = "jax.grad(loss_fn, has_aux=True)(p, batch)" if has_aux else "jax.grad(loss_fn)(p, batch)"
    how = f"call tx.update(grads, opt_state, params, grad_fn=lambda p: {body}) with the same batch as grads"
    if grad_fn is None:
        raise TypeError(f"{name}.update needs grad_fn, the gradient at other parameters for this batch: {how}")
    if not callable(grad_fn):
        raise TypeError(f"{name}.update: grad_fn must be a function params -> gradient (got {type(grad_fn).__name__}): {how}")
    if params is None:
        raise TypeError(f"{name}.update needs the current params to perturb: {how}")


def _is_pair(x: Any) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and not hasattr(x, "_fields")


def split_output(name: str, out: Any, params: Params, has_aux: bool) -> tuple[Params, Any]:
    """(gradient, aux) from what grad_fn returned; a TypeError that says what it returned instead."""
    want = jax.tree.structure(params)
    is_grad = lambda x: jax.tree.structure(x) == want  # noqa: E731
    leaves = f"{want.num_leaves} leaves"
    if has_aux:
        if _is_pair(out) and is_grad(out[0]):
            return out[0], out[1]
        if _is_pair(out) and is_grad(out[1]):
            raise TypeError(
                f"{name}: grad_fn returned (value, gradient), jax.value_and_grad's order; with has_aux=True return "
                "(gradient, aux) as jax.grad(loss_fn, has_aux=True) does"
            )
        raise TypeError(
            f"{name}: has_aux=True: grad_fn must return a pair (gradient shaped like params ({leaves}), aux), "
            f"got {jax.tree.structure(out)}; e.g. grad_fn=lambda p: jax.grad(loss_fn, has_aux=True)(p, batch)"
        )
    if is_grad(out):
        return out, None
    if _is_pair(out) and any(is_grad(x) for x in out):
        raise TypeError(
            f"{name}: grad_fn returned a pair (like jax.value_and_grad or has_aux=True give), not the gradient: "
            "return the gradient alone, e.g. grad_fn=lambda p: jax.grad(loss_fn)(p, batch), or build the "
            "transform with has_aux=True (and aux_init) to keep the second part"
        )
    raise TypeError(f"{name}: grad_fn must return a gradient shaped like params ({leaves}), got {jax.tree.structure(out)}")


def _shapes(tree: Any) -> Any:
    return jax.tree.map(lambda x: tuple(jnp.shape(x)), tree)


def conform_aux(name: str, aux: Any, template: Any) -> Any:
    """`aux` cast to the dtypes of `template` (the state's aux); a TypeError when the structure or shapes differ.

    The state must keep one structure and dtype through `jit`, `lax.cond` and checkpoints.
    """
    if jax.tree.structure(aux) != jax.tree.structure(template) or _shapes(aux) != _shapes(template):
        raise TypeError(
            f"{name}: grad_fn's aux {_shapes(aux)} is not shaped like aux_init {_shapes(template)} "
            f"(structure {jax.tree.structure(aux)} vs {jax.tree.structure(template)}): build the transform with "
            "aux_init= a pytree like the aux, e.g. aux_init=jaxsam.PerturbedAux.like(batch_stats)"
        )
    return jax.tree.map(lambda a, t: jnp.asarray(a).astype(jnp.result_type(t)), aux, template)


def initial_aux(aux_init: Any, params: Params) -> Any:
    """The state's first aux: `aux_init` (arrays or ShapeDtypeStructs), or a scalar loss of the params' dtype."""
    if aux_init is None:
        return jnp.zeros([], optax.tree.dtype(params, "highest"))
    return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else jnp.asarray(x),
                        aux_init)  # fmt: skip


# ---------------------------------------------------------------------------
# Masks and the ball.


def kernels_only_mask(params: Params) -> Params:
    """Mask selecting weight matrices and convolution kernels (ndim >= 2).

    Pass as `mask=kernels_only_mask` to leave biases and BatchNorm scales and
    offsets unperturbed, or as `adaptive_leaves="kernels"` to give only them
    ASAM's scale.
    """
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def _leaf_name(path) -> Optional[str]:
    if not path:
        return None
    last = path[-1]
    for attr in ("key", "name", "idx"):
        if hasattr(last, attr):
            return str(getattr(last, attr))
    return None


def weights_mask(params: Params) -> Params:
    """Mask selecting every leaf not named "bias": kernels and BatchNorm scales.

    These are the leaves PyTorch names `*.weight`, the ones Kwon et al.'s ASAM
    code scales by |w| + η (`adaptive_leaves="weights"`).

    Args:
      params: a pytree whose leaves are reached through dict keys or attribute
        names (linen params, a pure `nnx.State`).

    Returns:
      A pytree of Python bools like `params`.

    Example:
      >>> import jax.numpy as jnp, jaxsam
      >>> jaxsam.weights_mask({"bn": {"scale": jnp.ones(2), "bias": jnp.zeros(2)}})
      {'bn': {'bias': False, 'scale': True}}
    """
    return jax.tree_util.tree_map_with_path(lambda path, _: _leaf_name(path) != "bias", params)


def resolve_mask(mask: Mask, params: Params) -> Optional[Params]:
    if mask is None:
        return None
    return mask(params) if callable(mask) else mask


def _resolve_leaves(adaptive_leaves: Leaves, params: Params) -> Optional[Params]:
    if isinstance(adaptive_leaves, str):
        builders = {"all": None, "weights": weights_mask, "kernels": kernels_only_mask}
        build = builders[adaptive_leaves]
        return None if build is None else build(params)
    return resolve_mask(adaptive_leaves, params)


def select(mask_tree: Optional[Params], tree: Params) -> Params:
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
    adaptive_leaves: Leaves = "all",
) -> Params:
    """The SAM (or ASAM) ascent step ε along `grads`, a pytree like `params`.

    SAM:  ε = ρ g / (‖g‖ + eps).
    ASAM: ε = ρ T² g / (‖T g‖ + eps), T = |w| + η elementwise on the leaves
    `adaptive_leaves` selects and T = 1 on the others.

    With `mask`, only the selected entries are perturbed and the norm is taken
    over them alone. F-SAM and VaSSO pass their own direction as `grads`.

    Args:
      grads: the direction g (the clean gradient for SAM).
      params: the parameters w (ASAM scales by them).
      rho: ball radius.
      adaptive: ASAM instead of SAM.
      eta: ASAM's offset η, keeps zero weights perturbable (0 gives davda54/sam's T = |w|).
      eps: added to the norm so a zero gradient gives ε = 0.
      mask: pytree of bools like params, or a function params -> such a pytree.
      adaptive_leaves: which leaves ASAM scales: "all" (jaxsam's default),
        "weights" (every leaf not named "bias", i.e. kernels and BatchNorm
        scales: Kwon et al.'s code), "kernels" (ndim >= 2 only), or a pytree /
        function like `mask`.

    Returns:
      ε with the dtype of each parameter leaf.

    Example:
      >>> import jax.numpy as jnp, jaxsam
      >>> w = {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)}
      >>> eps = jaxsam.sam_perturbation(w, w, 0.1, adaptive=True, adaptive_leaves="weights")
    """
    grads = select(resolve_mask(mask, params), grads)
    if adaptive:
        scale = jax.tree.map(lambda w: jnp.abs(w) + eta, params)
        scaled_leaves = _resolve_leaves(adaptive_leaves, params)
        if scaled_leaves is not None:  # T = 1 on the leaves left out
            scale = jax.tree.map(lambda m, t: jnp.where(m, t, jnp.ones_like(t)), scaled_leaves, scale)
        scaled = jax.tree.map(jnp.multiply, scale, grads)  # T g
        norm = optax.tree.norm(scaled)
        direction = jax.tree.map(jnp.multiply, scale, scaled)  # T² g
    else:
        norm = optax.tree.norm(grads)
        direction = grads
    factor = rho / (norm + eps)
    return jax.tree.map(lambda d, w: (factor * d).astype(jnp.result_type(w)), direction, params)


def ascent(name: str, rho: Rho, *, adaptive: bool, eta, eps: float, mask: Mask, adaptive_leaves: Leaves,
           has_aux: bool, axis_name: Optional[str], example: str):  # fmt: skip
    """Checks the ball's arguments; returns `(grad_fn, direction, params, rho_t, aux) -> (∇L(w + ε), aux)`.

    `aux` is the state's previous aux (the template the new one must match), None without has_aux.
    """
    check_rho(rho, name)
    check_nonnegative(eta, "eta", name, example)
    check_adaptive_leaves(adaptive_leaves, name)

    def perturbed_gradient(grad_fn: GradFn, direction: Params, params: Params, rho_t, aux_prev):
        epsilon = sam_perturbation(direction, params, rho_t, adaptive=adaptive, eta=eta, eps=eps, mask=mask,
                                   adaptive_leaves=adaptive_leaves)  # fmt: skip
        grads, aux = split_output(name, grad_fn(jax.tree.map(jnp.add, params, epsilon)), params, has_aux)
        if has_aux:
            aux = conform_aux(name, aux, aux_prev)
            if axis_name is not None:  # the state is replicated: average what differs between devices
                aux = jax.tree.map(lambda a: jax.lax.pmean(a, axis_name) if jnp.issubdtype(a.dtype, jnp.inexact)
                                   else a, aux)  # fmt: skip
        return grads, aux

    return perturbed_gradient


# ---------------------------------------------------------------------------
# Small parts.


def pmean(tree: Params, axis_name: Optional[str]) -> Params:
    return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def rho_at(rho: Rho, count: chex.Array):
    return rho(count) if callable(rho) else rho


def unless_rho_zero(rho: Rho, rho_t, sam_branch: Callable[[], Any], clean_branch: Callable[[], Any]):
    """Runs `sam_branch` unless ρ is zero; then `clean_branch`, so ρ = 0 is the base optimizer exactly.

    A ρ given as a Python number (or a concrete array) is decided in Python; a
    scheduled or traced ρ (`inject_hyperparams` under jit, `vmap` over ρ) with
    `lax.cond`, so steps where ρ is zero (e.g. a warm-up) skip the second
    gradient and return the clean one exactly (under `vmap`, where `cond`
    becomes a select, both are computed and the clean one is still exact).
    On the CPU backend it is a select from the start: XLA:CPU runs a gradient
    inside a conditional branch several times slower (a ResNet18 GSAM step
    with GSAM's ρ schedule took 12x the base step with `cond`), so there the
    second gradient is computed on every step and ρ = 0 still selects the
    clean result exactly.
    """
    if not callable(rho) and not traced(rho):
        return clean_branch() if float(rho) == 0.0 else sam_branch()
    if jax.default_backend() == "cpu":
        positive = rho_t > 0
        return jax.tree.map(lambda s, c: jnp.where(positive, s, c), sam_branch(), clean_branch())
    return jax.lax.cond(rho_t > 0, sam_branch, clean_branch)


def with_aux(
    init_core: Callable, update_core: Callable, *, has_aux: bool, aux_init: Any
) -> optax.GradientTransformationExtraArgs:
    """The transform from its parts; with `has_aux` its state is `AuxState(inner, aux)`.

    `update_core(updates, state, params, grad_fn, aux_prev, **extra) -> (updates, state, aux)`. Without
    has_aux the state is the core's own, so checkpoints written before has_aux existed still restore.
    """
    if not has_aux:

        def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
            result, new_state, _ = update_core(updates, state, params, grad_fn, None, **extra_args)
            return result, new_state

        return optax.GradientTransformationExtraArgs(init_core, update_fn)

    def init_fn(params):
        return AuxState(inner=init_core(params), aux=initial_aux(aux_init, params))

    def update_aux_fn(updates, state: AuxState, params=None, *, grad_fn=None, **extra_args):
        result, inner, aux = update_core(updates, state.inner, params, grad_fn, state.aux, **extra_args)
        return result, AuxState(inner=inner, aux=aux)

    return optax.GradientTransformationExtraArgs(init_fn, update_aux_fn)


def find_states(opt_state: Any, kind: type) -> list:
    """Every node of type `kind` in an optimizer state (a chain, inject_hyperparams, MultiSteps, ...)."""
    nodes = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, kind))
    return [n for n in nodes if isinstance(n, kind)]


def sam_aux(opt_state: Any) -> Any:
    """The aux of the last perturbed pass, from the state of a chain holding a SAM transform with has_aux=True.

    Example:
      >>> import jax.numpy as jnp, optax, jaxsam
      >>> tx = optax.chain(jaxsam.sam_transform(0.05, has_aux=True), optax.sgd(0.1))
      >>> float(jaxsam.sam_aux(tx.init(jnp.ones(3))))   # aux_init until the first update
      0.0
    """
    found = find_states(opt_state, AuxState)
    if len(found) != 1:
        raise ValueError(
            f"sam_aux: the optimizer state holds {len(found)} SAM states with aux; build exactly one SAM transform "
            "with has_aux=True, e.g. optax.chain(jaxsam.sam_transform(0.05, has_aux=True), optax.sgd(0.1))"
        )
    return found[0].aux
