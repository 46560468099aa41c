"""Adam's preconditioned sharpness: λmax(P^{-1/2} H P^{-1/2}) with P = diag(sqrt(v̂) + ε) from the optax state.

The quantity that equilibrates at Adam's stability threshold
(2 + 2β₁)/((1 − β₁)η) at the "adaptive edge of stability" (Cohen et al.
2022, "Adaptive Gradient Methods at the Edge of Stability"). The operator
v ↦ P^{-1/2} H (P^{-1/2} v) is symmetric with the eigenvalues of P^{-1} H;
it is solved by the Lanczos loop of `lanczos` with the diagonal d = P^{-1/2}
as an input, so calls that differ in the state or the hyperparameters share
one compiled program.

    res = preconditioned_top_eigenvalue(loss_fn, params, opt_state, key, learning_rate=1e-3)
    res.eigenvalue, res.adam_threshold, res.excluded
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from jaxsam.geometry import loss as loss_lib
from jaxsam.geometry import restarted
from jaxsam.geometry.lanczos import (check_key, flat_spec, history_steps, lanczos_top, ritz_history, start_vectors,
                                     unravel)
from jaxsam.geometry.records import PreconditionedEigenResult


def find_adam_state(opt_state: Any) -> tuple[optax.ScaleByAdamState, dict[str, Any]]:
    """The one `optax.ScaleByAdamState` inside an optax state, and hyperparameters injected around it.

    Walks the whole pytree, so chains, named chains, `inject_hyperparams`
    and jaxsam's SAM state all work.

    Args:
      opt_state: any optax optimizer state.

    Returns:
      (adam_state, hyperparams): hyperparams are those of the innermost
      `optax.inject_hyperparams` state containing the Adam state ({} if none).

    Raises:
      ValueError: no Adam state, or more than one.
    """
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(x)]
    if len(found) != 1:
        what = "none" if not found else f"{len(found)} of them"
        raise ValueError(
            "expected exactly one optax.ScaleByAdamState (from optax.adam, adamw or scale_by_adam) "
            f"in the optimizer state, found {what}"
        )
    adam = found[0]
    hyperparams: dict[str, Any] = {}
    # inject_hyperparams wraps its inner state in an Inject(Stateful)HyperparamsState;
    # nested ones are visited outside-in, so the innermost wins.
    names = ("InjectHyperparamsState", "InjectStatefulHyperparamsState")
    injected_types = tuple(getattr(optax, name) for name in names if hasattr(optax, name))
    is_injected = lambda x: isinstance(x, injected_types)  # noqa: E731

    def visit(tree):
        for node in jax.tree.leaves(tree, is_leaf=is_injected):
            inside = is_injected(node) and any(a is adam for a in jax.tree.leaves(node.inner_state, is_leaf=is_adam))
            if inside:
                hyperparams.update(node.hyperparams)
                visit(node.inner_state)

    visit(opt_state)
    return adam, hyperparams


def _hyper(value: float | None, injected: dict[str, Any], name: str, default: float | None):
    if value is not None:
        return float(value)
    if name in injected:
        return float(np.asarray(injected[name]))
    return default


@jax.jit
def _inverse_sqrt_preconditioner(nu: Any, bias_correction: jax.Array, eps: jax.Array, floor: jax.Array):
    """(P^{-1/2} as a flat vector, number left out): 1 / sqrt(sqrt(v̂) + ε), v̂ = nu / (1 − β₂^t).

    Coordinates with sqrt(v̂) ≤ floor·max sqrt(v̂) get 0: Adam has not moved them.
    """
    root = jnp.sqrt(ravel_pytree(nu)[0].astype(bias_correction.dtype) / bias_correction)
    moved = (root > floor * jnp.max(root)) | (floor == 0)
    return jnp.where(moved, 1 / jnp.sqrt(root + eps), 0), jnp.sum(~moved)


def preconditioned_top_eigenvalue(
    loss_fn: Any,
    params: Any,
    adam_state: Any,
    key: jax.Array,
    *,
    learning_rate: float | None = None,
    iters: int | None = None,
    tol: float = 1e-4,
    method: str = "lanczos",
    eps: float | None = None,
    b1: float | None = None,
    b2: float | None = None,
    step: int | None = None,
    floor: float = 1e-4,
    start: Any = None,
) -> PreconditionedEigenResult:
    """λmax of Adam's preconditioned Hessian P^{-1/2} H P^{-1/2} (Cohen et al. 2022).

    P = diag(sqrt(v̂) + ε) with v̂ = nu / (1 − b2^step), the bias-corrected
    second moment of the last update applied (the state after t updates has
    count t). The operator v ↦ P^{-1/2} H (P^{-1/2} v) is symmetric and has
    the eigenvalues of P^{-1} H, the matrix that governs Adam's stability on a
    quadratic; it is solved by Lanczos as in `top_eigenvalues` (`method`).

    It is taken in the subspace Adam actually moves: coordinates whose
    gradient RMS sqrt(v̂) is at most `floor` times the largest one are left
    out (their rows and columns of P^{-1/2} H P^{-1/2} are zero) and counted
    in `excluded`. Without this a parameter with no training gradient has
    P ≈ ε and P^{-1} ≈ 1e8, and any curvature it has in the *measured* loss
    dominates λmax although Adam never steps along it: a bias feeding
    BatchNorm has an exactly zero train-mode gradient (its sqrt(v̂) is float32
    rounding, ~1e-7 of the gradients' scale) but changes the eval-mode loss
    (VGG16 after Adam: 1.25e8 with those 13 coordinates, 2.2e3 without).

    Args:
      loss_fn: a `LossFunction` or any `params -> scalar`.
      params: where the Hessian is taken.
      adam_state: an optax state containing exactly one `optax.ScaleByAdamState`
        (anywhere inside: chains, named chains, inject_hyperparams, SAM).
      key: PRNG key for the Lanczos start vector.
      learning_rate: η for the thresholds; default: an injected
        "learning_rate" hyperparameter around the Adam state, else None (the
        thresholds are then None).
      iters: Lanczos steps (default min(dim, 50)), or the restarted
        solver's limit on products (default 500).
      tol: `converged` if the residual ≤ tol·|λ|; "restarted" stops there.
      method: "lanczos" (a fixed number of steps) or "restarted" (thick-restart
        Lanczos to `tol`, the fewest products; see `top_eigenvalues`).
      eps, b1, b2: Adam's ε, β₁, β₂; default: injected hyperparameters of
        those names, else optax.adam's defaults (1e-8, 0.9, 0.999).
      step: update count for bias correction (default the state's count).
      floor: relative gradient-RMS floor below which a coordinate counts as
        unmoved and is left out; 0 keeps every coordinate (the plain
        definition of Cohen et al.).
      start: the start vector (a pytree like params, or flat) instead of a
        random one, e.g. the `eigenvector` of an earlier call (a warm start).

    optax's `eps_root` (0 in optax.adam) is not part of P here.

    Returns:
      A `PreconditionedEigenResult` with λmax and the thresholds 2/η and
      (2 + 2β₁)/((1 − β₁)η).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> loss = lambda w: 0.5 * jnp.sum(jnp.array([4.0, 1.0]) * w**2)
      >>> tx = optax.adam(1e-2)
      >>> _, state = tx.update(jnp.array([2.0, 1.0]), tx.init(jnp.zeros(2)))
      >>> r = preconditioned_top_eigenvalue(loss, jnp.zeros(2), state, jax.random.key(0), learning_rate=1e-2)
      >>> round(r.eigenvalue, 3), round(r.adam_threshold)  # max(4/2, 1/1) = 2: P = |g| after one step; 38/η
      (2.0, 3800)
    """
    if iters is not None and iters < 1:
        raise ValueError(f"iters must be >= 1 (got {iters})")
    if method not in ("lanczos", "restarted"):
        raise ValueError(f"unknown method {method!r}: use 'lanczos' or 'restarted'")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0 (got {tol})")
    check_key(key)
    adam, injected = find_adam_state(adam_state)
    learning_rate = _hyper(learning_rate, injected, "learning_rate", None)
    eps = _hyper(eps, injected, "eps", 1e-8)
    b1 = _hyper(b1, injected, "b1", 0.9)
    b2 = _hyper(b2, injected, "b2", 0.999)
    step = int(np.asarray(adam.count)) if step is None else int(step)
    if step < 1:
        raise ValueError(f"the Adam state has count {step}: no update applied yet, so there is no preconditioner")
    if not 0 <= b2 < 1 or not 0 <= b1 < 1:
        raise ValueError(f"b1 and b2 must be in [0, 1) (got b1={b1}, b2={b2})")
    dim, dtype = flat_spec(params)
    nu_dim, _ = flat_spec(adam.nu)
    if nu_dim != dim:
        raise ValueError(
            f"the Adam state's second moment has {nu_dim} entries, the parameters {dim}: "
            "not the state of an optimizer of these parameters"
        )
    if not 0 <= floor < 1:
        raise ValueError(f"floor must be in [0, 1) (got {floor}); e.g. floor=1e-4, or 0 for every coordinate")
    m = min(dim, iters if iters is not None else 50)
    # Hyperparameters are arguments, not constants: calls that differ only in
    # them run the same compiled programs.
    d, excluded = _inverse_sqrt_preconditioner(adam.nu, np.asarray(1 - b2**step, dtype), np.asarray(eps, dtype),
                                               np.asarray(floor, dtype))  # fmt: skip
    if method == "restarted" and restarted.fits(dim, 1):
        top = restarted.restarted_top(loss_fn, params, start_vectors(key, 1, dim, dtype, start)[0], k=1, tol=tol,
                                      max_matvecs=iters if iters is not None else 500, d=d,
                                      key=jax.random.fold_in(key, 1))  # fmt: skip
        value, residual, m = float(top.eigenvalues[0]), float(top.residual_norms[0]), top.matvecs
        vector = top.eigenvectors[0]
        history, history_iterations = top.history[:, 0], top.history_matvecs
    else:
        m = dim if method == "restarted" else m
        values, vectors, residuals, (alphas, betas) = lanczos_top(loss_fn, params,
                                                                  start_vectors(key, 2, dim, dtype, start), 1, m, d)  # fmt: skip
        value, residual, vector = float(values[0]), float(residuals[0]), vectors[0]
        history, history_iterations = ritz_history(alphas, betas, 1, history_steps(m))[:, 0], history_steps(m)
    if learning_rate is None:
        gd_threshold = adam_threshold = None
    else:
        gd_threshold = 2 / learning_rate
        adam_threshold = (2 + 2 * b1) / ((1 - b1) * learning_rate)
    return PreconditionedEigenResult(
        eigenvalue=value,
        residual=residual,
        iterations=m,
        converged=bool(residual <= tol * max(abs(value), float(np.finfo(dtype).tiny))),
        history=history,
        history_iterations=history_iterations,
        learning_rate=learning_rate,
        b1=b1,
        b2=b2,
        eps=eps,
        step=step,
        floor=float(floor),
        excluded=int(excluded),
        gd_threshold=gd_threshold,
        adam_threshold=adam_threshold,
        loss_info=loss_lib.info_of(loss_fn),
        method=method,
        eigenvector=unravel(vector, params),
    )
