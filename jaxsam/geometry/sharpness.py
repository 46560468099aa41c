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

The ascent is one `lax.fori_loop` inside `jax.jit` on GPU/TPU and a Python
loop of compiled steps on the CPU backend (`driver`), with the same update
functions. `worst_case_ascent` and `average_case_samples` are the traceable
(compiled-loop) cores, for use inside a caller's own `jax.jit`.

`first_order_sharpness` is ρ‖c ⊙ ∇L‖: what the original PyTorch study logged
as "sharpness". It is the first-order Taylor term of S_max, here only for
comparison, and labelled so in its record.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from jaxsam.geometry import driver
from jaxsam.geometry import loss as loss_lib
from jaxsam.geometry.records import Record

NORMS = ("l2", "linf")
_MOMENTUM = 0.75  # APGD's momentum (Croce & Hein 2020)
_PROGRESS = 0.75  # APGD: halve the step when fewer than 75% of steps since the last checkpoint raised the loss


@dataclasses.dataclass(frozen=True)
class WorstCaseResult(Record):
    """max over the ball of L(w + c⊙δ) − L(w), with the ascent's diagnostics.

    Attributes:
      value: the sharpness (mean over chunks for m-sharpness).
      standard_error: over chunks for m-sharpness, else 0.
      loss: L(w) (mean over chunks for m-sharpness).
      perturbed_loss: L(w + c⊙δ*) at the best δ found.
      delta_norm: ‖δ*‖ in the ball's own norm (≤ rho).
      at_boundary: whether δ* lies on the sphere (‖δ*‖ ≥ 0.999 ρ); an interior
        maximum means the loss peaks inside the ball.
      curve: the best loss difference after each ascent step (steps,); for
        m-sharpness, averaged over chunks.
      values: per-chunk values for m-sharpness, else [value].
      rho, norm, adaptive, steps, m: the settings.
      loss_info: what loss was measured (`make_loss_fn`'s info).
      last_gain: how much the last quarter of the ascent steps (at least one)
        raised the value, relative to it: (curve[-1] − curve[-1-q]) / |curve[-1]|.
        The ascent is a lower bound that has levelled off when this is small.
      converged: last_gain ≤ 1e-3 (a value that more steps would raise by
        less than 0.1%, judged from the curve itself).
      perturbation: the maximizing perturbation c⊙δ* found, a pytree like
        params (None for m-sharpness, where each chunk has its own); left
        out of `to_dict()`.
    """

    value: float
    standard_error: float
    loss: float
    perturbed_loss: float
    delta_norm: float
    at_boundary: bool
    curve: np.ndarray
    values: np.ndarray
    rho: float
    norm: str
    adaptive: bool
    steps: int
    m: int | None
    loss_info: dict
    last_gain: float = float("nan")
    converged: bool = False
    perturbation: Any = None

    def to_dict(self) -> dict:
        from jaxsam.geometry.records import to_json

        return to_json({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "perturbation"})


def _last_gain(curve: np.ndarray) -> float:
    """(curve[-1] − curve[-1-q]) / |curve[-1]| with q = max(1, len/4); NaN for a curve of one step."""
    curve = np.asarray(curve, dtype=np.float64)
    if curve.size < 2:
        return float("nan")
    q = max(1, curve.size // 4)
    return float((curve[-1] - curve[-1 - q]) / max(abs(curve[-1]), np.finfo(np.float64).tiny))


@dataclasses.dataclass(frozen=True)
class AverageCaseResult(Record):
    """E[L(w + c⊙δ)] − L(w), δ ~ N(0, σ²I), by Monte Carlo.

    Attributes:
      value: the mean loss increase.
      standard_error: sample standard deviation of `samples` / sqrt(len(samples)).
      loss: L(w).
      samples: the independent samples the mean and its error come from: with
        `antithetic`, n/2 pair means (L(w + c⊙δ) + L(w − c⊙δ))/2 − L(w);
        otherwise the n increases L(w + c⊙δ) − L(w).
      sigma, n, adaptive: the settings (n: loss evaluations at perturbed points).
      antithetic: whether draws came in ±δ pairs.
      loss_info: what loss was measured.
    """

    value: float
    standard_error: float
    loss: float
    samples: np.ndarray
    sigma: float
    n: int
    adaptive: bool
    loss_info: dict
    antithetic: bool = True


@dataclasses.dataclass(frozen=True)
class FirstOrderResult(Record):
    """ρ‖c⊙∇L(w)‖: the first-order proxy of worst-case sharpness (what the original study logged).

    Not a sharpness measure by itself: it is zero at any critical point, however sharp.
    """

    value: float
    gradient_norm: float
    rho: float
    adaptive: bool
    loss_info: dict
    label: str = "first-order proxy rho*||grad L||, not the loss increase"


# ---------------------------------------------------------------- ball geometry


def _ball_scale(params: Any, adaptive: bool, mask: Any | None) -> Any:
    """c: the elementwise map from ball coordinates δ to weight perturbations ε = c ⊙ δ."""
    scale = jax.tree.map(jnp.abs, params) if adaptive else jax.tree.map(jnp.ones_like, params)
    if mask is not None:
        scale = jax.tree.map(lambda s, keep: s * jnp.asarray(keep, s.dtype), scale, mask)
    return scale


def _norm(tree: Any, norm: str) -> jax.Array:
    if norm == "l2":
        return optax.tree.norm(tree)
    return jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in jax.tree.leaves(tree)]))


def _project(delta: Any, rho: float, norm: str) -> Any:
    """The nearest point of the ball {‖δ‖ ≤ ρ} (Euclidean projection for both norms)."""
    if norm == "l2":
        size = optax.tree.norm(delta)
        return optax.tree.scale(jnp.minimum(1.0, rho / jnp.maximum(size, 1e-30)), delta)
    return jax.tree.map(lambda d: jnp.clip(d, -rho, rho), delta)


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


def _ascent_query(i, state, consts, static):
    """The next iterate: a steepest-ascent step of size η from x, with APGD's momentum, projected on the ball."""
    (x, x_prev, _, g_x, _, _, _, eta, *_), (rho, _), (norm,) = state, consts, static
    z = _project(optax.tree.add_scale(x, eta, _steepest(g_x, norm)), rho, norm)
    # Momentum after the first step, as APGD: x + α(z − x) + (1 − α)(x − x_prev).
    alpha = jnp.where(i == 0, 1.0, _MOMENTUM)
    moved = jax.tree.map(lambda a, b, c: a + alpha * (b - a) + (1 - alpha) * (a - c), x, z, x_prev)
    # Keep δ in the parameters' dtypes (the step size may be wider, e.g. float64 loss of float32 params).
    return optax.tree.cast_like(_project(moved, rho, norm), x)


def _ascent_update(i, state, x_new, value_and_grad, consts, static):
    """Records f(x_new), keeps the best point, and at APGD checkpoints halves η and restarts from the best."""
    (x, _, _, _, best, f_best, g_best, eta, successes, since, f_best_mark, eta_changed, curve) = state
    f_new, g_new = value_and_grad
    _, marks = consts
    improved = f_new > state[2]
    better = f_new > f_best
    best = jax.tree.map(lambda n, b: jnp.where(better, n, b), x_new, best)
    # The best point's gradient is kept so that a restart needs no extra gradient pass.
    g_best = jax.tree.map(lambda n, b: jnp.where(better, n, b), g_new, g_best)
    f_best = jnp.where(better, f_new, f_best)
    successes = successes + improved
    since = since + 1
    curve = curve.at[i].set(f_best)

    # Checkpoint: decide whether to halve the step and restart from the best point.
    at_mark = marks[i + 1]
    stalled = (successes < _PROGRESS * since) | ((~eta_changed) & (f_best <= f_best_mark))
    halve = at_mark & stalled
    eta = jnp.where(halve, eta / 2, eta)
    x_prev = jax.tree.map(lambda b, n, o: jnp.where(halve, b, o), best, x_new, x)
    x_new = jax.tree.map(lambda b, n: jnp.where(halve, b, n), best, x_new)
    f_x = jnp.where(halve, f_best, f_new)
    g_x = jax.tree.map(lambda b, n: jnp.where(halve, b, n), g_best, g_new)
    successes = jnp.where(at_mark, 0, successes)
    since = jnp.where(at_mark, 0, since)
    f_best_mark = jnp.where(at_mark, f_best, f_best_mark)
    eta_changed = jnp.where(at_mark, halve, eta_changed)
    return (x_new, x_prev, f_x, g_x, best, f_best, g_best, eta, successes, since, f_best_mark, eta_changed, curve)


def _ascent(value_and_grad, delta0: Any, rho: float, norm: str, steps: int, *, host: bool):
    """APGD-style projected ascent of f over the ball; returns (best δ, best value, curve).

    `value_and_grad(δ) -> (f(δ), ∇f(δ))`: traced inside one `lax.fori_loop`
    (host=False) or called from a Python loop with concrete arrays (host=True,
    see `driver`). The step size starts at 2ρ; at each checkpoint it is
    halved (and the iterate reset to the best point) when fewer than 75% of
    the steps since the previous checkpoint raised the objective, or when
    neither the step size nor the best value changed since then (Croce &
    Hein 2020, Alg. 1).
    """
    f0, g0 = value_and_grad(delta0)
    dtype = jnp.result_type(f0)
    init = (
        delta0, delta0, f0, g0, delta0, f0, g0,
        jnp.asarray(2.0 * rho, dtype), jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32),
        f0, jnp.asarray(True), jnp.zeros([steps], dtype),
    )  # fmt: skip
    consts = (jnp.asarray(rho, dtype), jnp.asarray(_checkpoints(steps)))
    final = driver.fori_loop(steps, _ascent_query, value_and_grad, _ascent_update, init, consts, (norm,), host=host)
    return final[4], final[5], final[12]


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


def _start(key: jax.Array, params: Any, rho: float, norm: str) -> Any:
    # A tiny random start (1% of ρ) so that the ascent also leaves exact
    # critical points, where the gradient is zero and gives no direction.
    noise = _normal_like(key, params)
    return optax.tree.scale(0.01 * rho / jnp.maximum(_norm(noise, norm), 1e-30), noise)


def worst_case_ascent(
    loss_fn: Callable[[Any], jax.Array],
    params: Any,
    *,
    rho: float,
    norm: str = "l2",
    adaptive: bool = False,
    steps: int = 20,
    mask: Any | None = None,
    key: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """The traceable core of `worst_case_sharpness` (no checks, no host transfer; use inside jit).

    Returns:
      (sharpness, L(w), L(w + c⊙δ*), ‖δ*‖, curve of the best loss increase per step,
      the perturbation c⊙δ* as a pytree like params).
    """
    scale = _ball_scale(params, adaptive, mask)

    def objective(delta):
        return loss_fn(_perturb(params, scale, delta))

    delta0 = _start(key, params, rho, norm)
    best, f_best, curve = _ascent(jax.value_and_grad(objective), delta0, rho, norm, steps, host=False)
    base = loss_fn(params)
    return f_best - base, base, f_best, _norm(best, norm), curve - base, _scaled(scale, best)


def _scaled(scale: Any, delta: Any) -> Any:
    """c ⊙ δ: the perturbation in parameter space."""
    return jax.tree.map(jnp.multiply, scale, delta)


def _perturb(params: Any, scale: Any, delta: Any) -> Any:
    """w + c ⊙ δ."""
    return jax.tree.map(lambda w, c, d: w + c * d, params, scale, delta)


@jax.jit
def _chain_rule(scale: Any, grads: Any) -> Any:
    """∇_δ L(w + c⊙δ) = c ⊙ ∇L, in δ's (the parameters') dtypes."""
    return jax.tree.map(lambda c, g: (c * g).astype(c.dtype), scale, grads)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _host_start(params, mask, adaptive, rho, norm, key):
    return _ball_scale(params, adaptive, mask), _start(key, params, rho, norm)


def _worst_case_host(loss_fn, params, *, rho, norm, adaptive, steps, mask, key):
    """`worst_case_ascent` with the ascent driven from Python (see `driver`); same returns, concrete."""
    scale, delta0 = _host_start(params, mask, adaptive, rho, norm, key)
    loss_value_and_grad = driver.value_and_grad(loss_fn)
    perturb = driver.compiled(_perturb)

    def value_and_grad(delta):
        value, grads = loss_value_and_grad(perturb(params, scale, delta))
        return value, _chain_rule(scale, grads)

    best, f_best, curve = _ascent(value_and_grad, delta0, rho, norm, steps, host=True)
    base = driver.value(loss_fn)(params)
    return f_best - base, base, f_best, driver.compiled(_norm, 1)(best, norm), curve - base, \
        driver.compiled(_scaled)(scale, best)


def worst_case_sharpness(
    loss_fn: Callable[[Any], jax.Array],
    params: Any,
    rho: float,
    *,
    norm: str = "l2",
    adaptive: bool = False,
    steps: int = 20,
    m: int | None = None,
    mask: Any | None = None,
    key: jax.Array | None = None,
) -> WorstCaseResult:
    """max_{‖δ‖ ≤ ρ} L(w + c⊙δ) − L(w) by projected gradient ascent (see module docstring).

    Args:
      loss_fn: `params -> scalar`, e.g. from `make_loss_fn`. m-sharpness needs
        one built by `make_loss_fn`.
      params: the point w.
      rho: the ball's radius (in δ coordinates: relative to |w| when adaptive).
      norm: "l2" or "linf".
      adaptive: c = |w| (scale-invariant, Andriushchenko et al. 2023) instead of c = 1.
      steps: gradient-ascent steps (each one gradient of the loss).
      m: if set, the ascent runs per chunk of m examples and values are averaged.
      mask: optional pytree of bools like params; False leaves that entry unperturbed.
      key: PRNG key of the tiny random start (default key 0: deterministic).

    Returns:
      A `WorstCaseResult`.

    Example:
      >>> import jax.numpy as jnp
      >>> loss = lambda w: 0.5 * jnp.sum(jnp.array([4.0, 1.0]) * w**2)
      >>> r = worst_case_sharpness(loss, jnp.zeros(2), 0.1, steps=50)
      >>> round(float(r.value), 6)  # ½ ρ² λmax
      0.02
    """
    _check(rho, norm, steps)
    if m is not None and getattr(loss_fn, "batch_sums", None) is None:
        raise ValueError("m-sharpness needs a loss built by make_loss_fn (it must know its examples); or leave m=None")
    key = jax.random.key(0) if key is None else key
    settings = dict(rho=rho, norm=norm, adaptive=adaptive, steps=steps, mask=mask, key=key)
    host = driver.host_loops()
    if m is None:
        if host:
            value, base, top, size, curve, perturbation = _worst_case_host(loss_fn, params, **settings)
        else:
            value, base, top, size, curve, perturbation = jax.jit(
                lambda p: worst_case_ascent(loss_fn, p, **settings))(params)
        values = jnp.reshape(value, (1,))
        std_err = jnp.zeros([], value.dtype)
    elif host:
        # One ascent per chunk, each driven from Python on its own examples.
        per_chunk = [_worst_case_host(chunk, params, **settings)[:5] for chunk in loss_fn.chunk_losses(m)]
        values, bases, tops, sizes, curves = (jnp.stack(column) for column in zip(*per_chunk))
        perturbation = None
        value, base, top, size, curve = values.mean(), bases.mean(), tops.mean(), sizes.max(), curves.mean(0)
        std_err = values.std(ddof=1) / np.sqrt(values.shape[0]) if values.shape[0] > 1 else jnp.zeros([])
    else:
        images, labels, masks = loss_fn.chunks(m)
        batch_sums = loss_fn.batch_sums

        def per_chunk(params, chunk):
            x, y, w = chunk
            return worst_case_ascent(lambda p: batch_sums(p, x, y, w)[0] / jnp.sum(w), params, **settings)[:5]

        run = jax.jit(lambda p: jax.lax.map(lambda chunk: per_chunk(p, chunk), (images, labels, masks)))
        values, bases, tops, sizes, curves = run(params)
        perturbation = None
        value, base, top, size, curve = values.mean(), bases.mean(), tops.mean(), sizes.max(), curves.mean(0)
        std_err = values.std(ddof=1) / np.sqrt(values.shape[0]) if values.shape[0] > 1 else jnp.zeros([])
    return WorstCaseResult(
        value=float(value),
        standard_error=float(std_err),
        loss=float(base),
        perturbed_loss=float(top),
        delta_norm=float(size),
        at_boundary=bool(size >= 0.999 * rho),
        curve=np.asarray(curve),
        values=np.asarray(values),
        rho=float(rho),
        norm=norm,
        adaptive=adaptive,
        steps=steps,
        m=m,
        loss_info=loss_lib.info_of(loss_fn),
        last_gain=_last_gain(curve),
        converged=bool(_last_gain(curve) <= 1e-3),
        perturbation=perturbation,
    )


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
    """The traceable core of `average_case_sharpness`: (one sample per key, L(w)), via `lax.map`.

    A sample is L(w + σc⊙δ) − L(w), or with `antithetic` the pair mean
    (L(w + σc⊙δ) + L(w − σc⊙δ))/2 − L(w), δ drawn from the key.
    """

    def sample(k):
        plus = loss_fn(_gaussian_point(params, mask, sigma, k, adaptive, 1.0))
        if not antithetic:
            return plus
        return (plus + loss_fn(_gaussian_point(params, mask, sigma, k, adaptive, -1.0))) / 2

    base = loss_fn(params)
    return jax.lax.map(sample, keys) - base, base


def _gaussian_point(params: Any, mask: Any, sigma: Any, key: jax.Array, adaptive: bool, sign: Any = 1.0) -> Any:
    """w + sign·σ c ⊙ δ with δ ~ N(0, I) drawn from `key`."""
    noise = _normal_like(key, params)
    scale = sign * sigma
    return jax.tree.map(lambda w, c, d: w + scale * c * d, params, _ball_scale(params, adaptive, mask), noise)


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
    if driver.host_loops():
        value = driver.value(loss_fn)
        base = value(params)
        draw = driver.compiled(_gaussian_point, 4)
        signs = (1.0, -1.0) if antithetic else (1.0,)
        increases = [
            sum(value(draw(params, mask, sigma, k, adaptive, sign)) for sign in signs) / len(signs) - base
            for k in keys
        ]
    else:
        run = jax.jit(
            lambda p, keys: average_case_samples(loss_fn, p, sigma, keys, adaptive=adaptive, mask=mask,
                                                 antithetic=antithetic)  # fmt: skip
        )
        increases, base = run(params, keys)
    samples = np.asarray(increases)
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


def first_order_sharpness(
    loss_fn: Callable[[Any], jax.Array], params: Any, rho: float, *, adaptive: bool = False
) -> FirstOrderResult:
    """ρ‖c⊙∇L(w)‖₂ — the first-order proxy the original study logged; for comparison only.

    Args:
      loss_fn: `params -> scalar`.
      params: the point w.
      rho: the radius.
      adaptive: c = |w| instead of 1.

    Returns:
      A `FirstOrderResult` (value and the gradient norm).
    """
    if driver.host_loops():
        _, grads = driver.value_and_grad(loss_fn)(params)
    else:
        grads = jax.jit(jax.grad(loss_fn))(params)
    scale = _ball_scale(params, adaptive, None)
    size = float(optax.tree.norm(jax.tree.map(jnp.multiply, scale, grads)))
    return FirstOrderResult(
        value=rho * size, gradient_norm=size, rho=float(rho), adaptive=adaptive, loss_info=loss_lib.info_of(loss_fn)
    )
