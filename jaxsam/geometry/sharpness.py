"""Sharpness of a minimum: worst-case and average-case loss increase in a ball.

Worst-case sharpness (Keskar et al. 2017; Foret et al. 2021, the quantity SAM
minimizes) is

    S_max(w, ρ) = max_{‖δ‖ ≤ ρ} L(w + c ⊙ δ) − L(w),

found here by projected gradient ascent on δ with `jax.grad` — the loss
difference itself, never its first-order proxy ρ‖∇L‖. c = 1 gives the plain
ball; c = |w| gives adaptive sharpness (Kwon et al. 2021; Andriushchenko,
Croce, Müller, Hein & Flammarion 2023, "A Modern Look at the Relationship
between Sharpness and Generalization"), which is invariant to the rescalings
of ReLU networks that leave the function unchanged. ‖·‖ is L2 (normalized
gradient steps) or L∞ (sign steps). The step size follows APGD (Croce & Hein
2020): start at 2ρ, momentum 0.75, halve and restart from the best point at
checkpoints where the ascent stopped making progress; the best iterate is
kept, so more steps never lower the value.

m-sharpness (Foret et al. 2021; Andriushchenko & Flammarion 2022): with `m`
set, the ascent runs separately on each chunk of m examples and the chunks'
values are averaged.

Average-case sharpness is E_δ[L(w + c ⊙ δ)] − L(w) with δ ~ N(0, σ²I),
estimated by Monte Carlo with its standard error.

Each measure is one `driver.Loop` over the loss oracle (`loss.LossFunction`):
one compiled loop on GPU/TPU, driven from Python on the CPU backend, cached
by shapes. `worst_case_ascent` and `average_case_samples` are the same loops
traced, for use inside a caller's own `jax.jit`.

`first_order_sharpness` is ρ‖c ⊙ ∇L‖: what the original PyTorch study logged
as "sharpness". It is the first-order Taylor term of S_max, here only for
comparison, and labelled so in its record.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from jaxsam.geometry import driver
from jaxsam.geometry import loss as loss_lib
from jaxsam.geometry.lanczos import check_key
from jaxsam.geometry.records import AverageCaseResult, FirstOrderResult, WorstCaseResult

NORMS = ("l2", "linf")
_MOMENTUM = 0.75  # APGD's momentum (Croce & Hein 2020)
_PROGRESS = 0.75  # APGD: halve the step when fewer than 75% of steps since the last checkpoint raised the loss


def _last_gain(curve: np.ndarray) -> float:
    """(curve[-1] − curve[-1-q]) / |curve[-1]| with q = max(1, len/4); NaN for a curve of one step."""
    curve = np.asarray(curve, dtype=np.float64)
    if curve.size < 2:
        return float("nan")
    q = max(1, curve.size // 4)
    return float((curve[-1] - curve[-1 - q]) / max(abs(curve[-1]), np.finfo(np.float64).tiny))


# ---------------------------------------------------------------- ball geometry


def _ball_scale(params: Any, adaptive: bool, mask: Any | None) -> Any:
    """c: the elementwise map from ball coordinates δ to weight perturbations ε = c ⊙ δ."""
    scale = jax.tree.map(jnp.abs, params) if adaptive else optax.tree.ones_like(params)
    if mask is not None:
        scale = jax.tree.map(lambda s, keep: s * jnp.asarray(keep, s.dtype), scale, mask)
    return scale


def _norm(tree: Any, norm: str) -> jax.Array:
    return optax.tree.norm(tree, ord=2 if norm == "l2" else jnp.inf)


def _project(delta: Any, rho: float, norm: str) -> Any:
    """The nearest point of the ball {‖δ‖ ≤ ρ} (Euclidean projection for both norms)."""
    if norm == "l2":
        size = optax.tree.norm(delta)
        return optax.tree.scale(jnp.minimum(1.0, rho / jnp.maximum(size, 1e-30)), delta)
    return optax.tree.clip(delta, -rho, rho)


def _steepest(grad: Any, norm: str) -> Any:
    """Unit-norm steepest-ascent direction: g/‖g‖₂ for L2, sign(g) for L∞."""
    if norm == "l2":
        return optax.tree.scale(1.0 / jnp.maximum(optax.tree.norm(grad), 1e-30), grad)
    return jax.tree.map(jnp.sign, grad)


def _checkpoints(steps: int) -> np.ndarray:
    """APGD's checkpoints: p₀ = 0, p₁ = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06), as step indices."""
    fractions = [0.0, 0.22]
    while fractions[-1] < 1.0:
        fractions.append(fractions[-1] + max(fractions[-1] - fractions[-2] - 0.03, 0.06))
    marks = np.zeros(steps + 1, bool)
    for p in fractions[1:]:
        index = int(np.ceil(p * steps))
        if 0 < index <= steps:
            marks[index] = True
    return marks


# ------------------------------------------------------------------- the ascent as a loop
# inputs: {"scale": c, "delta0": δ₀, "rho": ρ, "marks": APGD's checkpoints (steps + 1,)}; static: (norm,).
# The oracle is value-and-gradient at the point w + c⊙δ; the chain rule gives ∇_δ = c ⊙ ∇L.


def _scaled(scale: Any, delta: Any) -> Any:
    """c ⊙ δ: the perturbation in parameter space."""
    return optax.tree.mul(scale, delta)


def _perturb(params: Any, scale: Any, delta: Any) -> Any:
    """w + c ⊙ δ."""
    return optax.tree.add(params, _scaled(scale, delta))


def _chain_rule(scale: Any, grads: Any) -> Any:
    """∇_δ L(w + c⊙δ) = c ⊙ ∇L, in δ's (the parameters') dtypes."""
    return optax.tree.cast_like(optax.tree.mul(scale, grads), scale)


def _ascent_start(params, inputs, static):
    return _perturb(params, inputs["scale"], inputs["delta0"]), None


def _ascent_init(params, inputs, static, _, value_and_grad):
    """The ascent's state at δ₀: (x, x_prev, f(x), ∇f(x), best, f_best, ∇f(best), η, successes, since,
    f_best at the last checkpoint, η changed at the last checkpoint, curve)."""
    f0, grads = value_and_grad
    g0, delta0, dtype = _chain_rule(inputs["scale"], grads), inputs["delta0"], jnp.result_type(f0)
    steps = inputs["marks"].shape[0] - 1
    return (
        delta0, delta0, f0, g0, delta0, f0, g0,
        (2.0 * inputs["rho"]).astype(dtype), jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32),
        f0, jnp.asarray(True), jnp.zeros([steps], dtype),
    )  # fmt: skip


def _ascent_query(i, state, params, inputs, static):
    """The next iterate: a steepest-ascent step of size η from x, with APGD's momentum, projected on the ball."""
    (x, x_prev, _, g_x, _, _, _, eta, *_), (norm,) = state, static
    rho = inputs["rho"].astype(eta.dtype)
    z = _project(optax.tree.add_scale(x, eta, _steepest(g_x, norm)), rho, norm)
    # Momentum after the first step, as APGD: x + α(z − x) + (1 − α)(x − x_prev).
    alpha = jnp.where(i == 0, 1.0, _MOMENTUM)
    moved = jax.tree.map(lambda a, b, c: a + alpha * (b - a) + (1 - alpha) * (a - c), x, z, x_prev)
    # Keep δ in the parameters' dtypes (the step size may be wider, e.g. float64 loss of float32 params).
    x_new = optax.tree.cast_like(_project(moved, rho, norm), x)
    return _perturb(params, inputs["scale"], x_new), x_new


def _ascent_update(i, state, x_new, value_and_grad, params, inputs, static):
    """Records f(x_new), keeps the best point, and at APGD checkpoints halves η and restarts from the best.

    The step size starts at 2ρ; at each checkpoint it is halved (and the
    iterate reset to the best point) when fewer than 75% of the steps since
    the previous checkpoint raised the objective, or when neither the step
    size nor the best value changed since then (Croce & Hein 2020, Alg. 1).
    """
    (x, _, _, _, best, f_best, g_best, eta, successes, since, f_best_mark, eta_changed, curve) = state
    f_new, grads = value_and_grad
    g_new = _chain_rule(inputs["scale"], grads)
    improved = f_new > state[2]
    better = f_new > f_best
    best = optax.tree.where(better, x_new, best)
    # The best point's gradient is kept so that a restart needs no extra gradient pass.
    g_best = optax.tree.where(better, g_new, g_best)
    f_best = jnp.where(better, f_new, f_best)
    successes = successes + improved
    since = since + 1
    curve = curve.at[i].set(f_best)

    # Checkpoint: decide whether to halve the step and restart from the best point.
    at_mark = inputs["marks"][i + 1]
    stalled = (successes < _PROGRESS * since) | ((~eta_changed) & (f_best <= f_best_mark))
    halve = at_mark & stalled
    eta = jnp.where(halve, eta / 2, eta)
    x_prev = optax.tree.where(halve, best, x)
    x_new = optax.tree.where(halve, best, x_new)
    f_x = jnp.where(halve, f_best, f_new)
    g_x = optax.tree.where(halve, g_best, g_new)
    successes = jnp.where(at_mark, 0, successes)
    since = jnp.where(at_mark, 0, since)
    f_best_mark = jnp.where(at_mark, f_best, f_best_mark)
    eta_changed = jnp.where(at_mark, halve, eta_changed)
    return (x_new, x_prev, f_x, g_x, best, f_best, g_best, eta, successes, since, f_best_mark, eta_changed, curve)


def _ascent_finish(state, params, inputs, static):
    """(L(w + c⊙δ*), curve of the best value per step, ‖δ*‖, c⊙δ*)."""
    best, f_best, curve = state[4], state[5], state[12]
    return f_best, curve, _norm(best, static[0]), _scaled(inputs["scale"], best)


ASCENT = driver.Loop("value_and_grad", _ascent_init, _ascent_query, _ascent_update, _ascent_finish,
                     start=_ascent_start)  # fmt: skip


# ------------------------------------------------------------------- measures


def _check(rho: float, norm: str, steps: int) -> None:
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}: use 'l2' or 'linf'")
    if not rho > 0:
        raise ValueError(f"rho must be > 0 (got {rho}); e.g. rho=0.05 for L2, 0.002 for adaptive L∞")
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (got {steps})")


def _normal_like(key: jax.Array, params: Any) -> Any:
    """A pytree like params with independent N(0, 1) entries, from one draw of the flattened vector.

    One draw, not one per leaf: XLA:CPU takes about as long to compile a
    random-number kernel as to run a gradient, and a ResNet has ~60 leaves.
    """
    flat, unravel = ravel_pytree(params)
    return unravel(jax.random.normal(key, flat.shape, jnp.promote_types(flat.dtype, jnp.float32)))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _ascent_inputs(params, mask, adaptive, norm, start_radius, key):
    """(c, δ₀): the ball's scale and a tiny random start of norm `start_radius`.

    The start (1% of ρ) lets the ascent leave exact critical points, where
    the gradient is zero and gives no direction.
    """
    noise = _normal_like(key, params)
    return _ball_scale(params, adaptive, mask), optax.tree.scale(start_radius / jnp.maximum(_norm(noise, norm), 1e-30),
                                                                  noise)  # fmt: skip


def _ascent_setup(params, rho, norm, adaptive, steps, mask, key):
    scale, delta0 = _ascent_inputs(params, mask, adaptive, norm, 0.01 * rho, key)
    return {"scale": scale, "delta0": delta0, "rho": jnp.asarray(rho), "marks": jnp.asarray(_checkpoints(steps))}


def worst_case_ascent(
    loss_fn: Callable[[Any], jax.Array],
    params: Any,
    rho: float,
    key: jax.Array,
    *,
    norm: str = "l2",
    adaptive: bool = False,
    steps: int = 20,
    mask: Any | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, Any]:
    """The traceable core of `worst_case_sharpness` (no checks, no host transfer; use inside jit).

    The same loop as the measure, traced as one `lax.fori_loop`.

    Returns:
      (sharpness, L(w), L(w + c⊙δ*), ‖δ*‖, curve of the best loss increase per step,
      the perturbation c⊙δ* as a pytree like params).
    """
    loss = loss_lib.as_loss(loss_fn)
    inputs = _ascent_setup(params, rho, norm, adaptive, steps, mask, key)
    top, curve, size, perturbation = driver.run_traced(ASCENT, loss, params, inputs, steps=steps, static=(norm,))
    base = loss.value(params)
    return top - base, base, top, size, curve - base, perturbation


def worst_case_sharpness(
    loss_fn: Callable[[Any], jax.Array],
    params: Any,
    rho: float,
    key: jax.Array,
    *,
    norm: str = "l2",
    adaptive: bool = False,
    steps: int = 20,
    m: int | None = None,
    mask: Any | None = None,
) -> WorstCaseResult:
    """max_{‖δ‖ ≤ ρ} L(w + c⊙δ) − L(w) by projected gradient ascent (see module docstring).

    Args:
      loss_fn: a `LossFunction` (e.g. from `make_loss_fn`) or any `params ->
        scalar`. m-sharpness needs one built on data (`make_loss_fn`).
      params: the point w.
      rho: the ball's radius (in δ coordinates: relative to |w| when adaptive).
      key: PRNG key of the tiny random start (norm ρ/100) that lets the
        ascent leave an exact critical point.
      norm: "l2" or "linf".
      adaptive: c = |w| (scale-invariant, Andriushchenko et al. 2023) instead of c = 1.
      steps: gradient-ascent steps (each one gradient of the loss).
      m: if set, the ascent runs per chunk of m examples and values are averaged.
      mask: optional pytree of bools like params; False leaves that entry unperturbed.

    Returns:
      A `WorstCaseResult`, with the maximizing perturbation c⊙δ* (not for m-sharpness).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> loss = lambda w: 0.5 * jnp.sum(jnp.array([4.0, 1.0]) * w**2)
      >>> r = worst_case_sharpness(loss, jnp.zeros(2), 0.1, jax.random.key(0), steps=50)
      >>> round(float(r.value), 6)  # ½ ρ² λmax
      0.02
    """
    _check(rho, norm, steps)
    check_key(key)
    loss = loss_lib.as_loss(loss_fn)
    if m is not None and loss.batches is None:
        raise ValueError("m-sharpness needs a loss built by make_loss_fn (it must know its examples); or leave m=None")
    inputs = _ascent_setup(params, rho, norm, adaptive, steps, mask, key)
    if m is None:
        top, curve, size, perturbation = driver.run(ASCENT, loss, params, inputs, steps=steps, static=(norm,))
        base = np.asarray(driver.value(loss, params))
        top, size, curve = np.asarray(top), np.asarray(size), np.asarray(curve)
        values, std_err, increase = np.reshape(top - base, (1,)), 0.0, curve - base
    else:
        # One ascent per chunk of m examples, on that chunk's own loss.
        chunks = loss.chunked(m)
        tops, curves, sizes, _ = driver.run(ASCENT, chunks, params, inputs, steps=steps, static=(norm,), each_loss=True)
        bases = np.asarray(driver.evaluate("value", chunks, params, each_loss=True))
        tops, curves, sizes = np.asarray(tops), np.asarray(curves), np.asarray(sizes)
        values = tops - bases
        base, top, size, increase = bases.mean(), tops.mean(), sizes.max(), (curves - bases[:, None]).mean(0)
        std_err = values.std(ddof=1) / np.sqrt(values.shape[0]) if values.shape[0] > 1 else 0.0
        perturbation = None
    return WorstCaseResult(
        value=float(np.mean(values)),
        standard_error=float(std_err),
        loss=float(base),
        perturbed_loss=float(top),
        delta_norm=float(size),
        at_boundary=bool(size >= 0.999 * rho),
        curve=increase,
        values=values,
        rho=float(rho),
        norm=norm,
        adaptive=adaptive,
        steps=steps,
        m=m,
        loss_info=loss_lib.info_of(loss_fn),
        last_gain=_last_gain(increase),
        converged=bool(_last_gain(increase) <= 1e-3),
        perturbation=perturbation,
    )


# ------------------------------------------------------------------- average case as a loop
# inputs: {"keys": (draws,), "scale": c, "sigma": σ}; static: (antithetic,). Step i evaluates
# w + s·σ c⊙δ_k with k = i // 2 and s = +1, −1 alternating (antithetic), else k = i and s = +1.
# `start` evaluates L(w), which sets the samples' dtype.


def _average_start(params, inputs, static):
    return params, None


def _average_init(params, inputs, static, _, base):
    (antithetic,) = static
    n = inputs["keys"].shape[0] * (2 if antithetic else 1)
    return jnp.zeros((n,), jnp.result_type(base)), base


def _gaussian_point(params: Any, scale: Any, sigma: Any, key: jax.Array, sign: Any) -> Any:
    """w + sign·σ c ⊙ δ with δ ~ N(0, I) drawn from `key`."""
    noise = _normal_like(key, params)
    factor = sign * sigma
    return optax.tree.cast_like(jax.tree.map(lambda w, c, d: w + factor * c * d, params, scale, noise), params)


def _average_query(i, carry, params, inputs, static):
    (antithetic,) = static
    key = inputs["keys"][i // 2] if antithetic else inputs["keys"][i]
    sign = jnp.where(i % 2 == 1, -1.0, 1.0) if antithetic else 1.0
    return _gaussian_point(params, inputs["scale"], inputs["sigma"], key, sign), None


def _average_update(i, carry, _, value, params, inputs, static):
    values, base = carry
    return values.at[i].set(value), base


def _average_finish(carry, params, inputs, static):
    """(samples, L(w)): pair means (L(w+δ) + L(w−δ))/2 − L(w) with antithetic draws, else L(w+δ) − L(w)."""
    (values, base), (antithetic,) = carry, static
    if antithetic:
        return (values[0::2] + values[1::2]) / 2 - base, base
    return values - base, base


AVERAGE = driver.Loop("value", _average_init, _average_query, _average_update, _average_finish,
                      start=_average_start)  # fmt: skip


@functools.partial(jax.jit, static_argnums=1)
def _scale_of(params, adaptive, mask):
    return _ball_scale(params, adaptive, mask)


def average_case_samples(
    loss_fn: Callable[[Any], jax.Array],
    params: Any,
    sigma: float,
    keys: jax.Array,
    *,
    adaptive: bool = False,
    mask: Any | None = None,
    antithetic: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """The traceable core of `average_case_sharpness`: (one sample per key, L(w)); use inside jit.

    A sample is L(w + σc⊙δ) − L(w), or with `antithetic` the pair mean
    (L(w + σc⊙δ) + L(w − σc⊙δ))/2 − L(w), δ drawn from the key.
    """
    inputs = {"keys": keys, "scale": _ball_scale(params, adaptive, mask), "sigma": sigma}
    steps = keys.shape[0] * (2 if antithetic else 1)
    return driver.run_traced(AVERAGE, loss_lib.as_loss(loss_fn), params, inputs, steps=steps, static=(antithetic,))


def average_case_sharpness(
    loss_fn: Callable[[Any], jax.Array],
    params: Any,
    sigma: float,
    key: jax.Array,
    *,
    n: int = 32,
    adaptive: bool = False,
    mask: Any | None = None,
    antithetic: bool = True,
) -> AverageCaseResult:
    """E[L(w + c⊙δ)] − L(w), δ ~ N(0, σ²I), by Monte Carlo over n loss evaluations.

    With `antithetic` (the default) the draws come in pairs ±δ and each pair
    contributes (L(w + c⊙δ) + L(w − c⊙δ))/2 − L(w). The pair mean has no
    odd-order terms of the Taylor expansion — the linear term ⟨∇L, c⊙δ⟩,
    whose variance σ²‖c⊙∇L‖² dominates plain Monte Carlo away from an exact
    critical point, cancels exactly — so its standard error is that of the
    curvature part alone: on a width-1/8 ResNet18, 128 evaluations gave
    0.00223 ± 0.00143 plainly and 0.000503 ± 0.000075 antithetically. On a
    smooth loss E[L(w + δ)] − L(w) = ½σ² tr(H) + O(σ⁴) (c = 1); on a ReLU
    network the kinks add to it what the autodiff Hessian does not see.

    Args:
      loss_fn: `params -> scalar`.
      params: the point w.
      sigma: standard deviation of each entry of δ (relative to |w| when adaptive).
      key: PRNG key of the draws.
      n: loss evaluations at perturbed points: n/2 antithetic pairs (n even,
        ≥ 4) or n plain draws (n ≥ 2), for a standard error.
      adaptive: c = |w| instead of 1.
      mask: optional pytree of bools; False entries are not perturbed.
      antithetic: draw ±δ pairs (default) or plain independent draws.

    Returns:
      An `AverageCaseResult`; value ± standard_error.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> loss = lambda w: 0.5 * jnp.sum(w ** 2) + jnp.sum(w)  # tr(H) = 3, ½σ²·3 = 1.5e-4
      >>> r = average_case_sharpness(loss, jnp.zeros(3), 0.01, jax.random.key(0), n=8)
      >>> abs(r.value - 1.5e-4) < 4 * r.standard_error + 1e-9
      True
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0 (got {sigma})")
    if antithetic and (n < 4 or n % 2):
        raise ValueError(f"n must be even and >= 4 for antithetic pairs with a standard error (got {n})")
    if n < 2:
        raise ValueError(f"n must be >= 2 for a standard error (got {n})")
    keys = jax.random.split(key, n // 2 if antithetic else n)
    inputs = {"keys": keys, "scale": _scale_of(params, adaptive, mask), "sigma": sigma}
    samples, base = driver.run(AVERAGE, loss_fn, params, inputs, steps=n, static=(bool(antithetic),))
    samples = np.asarray(samples)
    return AverageCaseResult(
        value=float(samples.mean()),
        standard_error=float(samples.std(ddof=1) / np.sqrt(len(samples))),
        loss=float(base),
        samples=samples,
        sigma=float(sigma),
        n=n,
        adaptive=adaptive,
        loss_info=loss_lib.info_of(loss_fn),
        antithetic=antithetic,
    )


@functools.partial(jax.jit, static_argnums=2)
def _scaled_norm(params, grads, adaptive):
    return optax.tree.norm(_scaled(_ball_scale(params, adaptive, None), grads))


def first_order_sharpness(
    loss_fn: Callable[[Any], jax.Array], params: Any, rho: float, *, adaptive: bool = False
) -> FirstOrderResult:
    """ρ‖c⊙∇L(w)‖₂ — the first-order proxy the original study logged; for comparison only.

    Args:
      loss_fn: a `LossFunction` or any `params -> scalar`.
      params: the point w.
      rho: the radius.
      adaptive: c = |w| instead of 1.

    Returns:
      A `FirstOrderResult` (value and the gradient norm).
    """
    _, grads = driver.value_and_grad(loss_fn, params)
    size = float(_scaled_norm(params, grads, adaptive))
    return FirstOrderResult(
        value=rho * size, gradient_norm=size, rho=float(rho), adaptive=adaptive, loss_info=loss_lib.info_of(loss_fn)
    )
