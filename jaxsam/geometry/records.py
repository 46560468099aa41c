"""Result records of the geometry measures: frozen dataclasses that turn into JSON.

Every measure returns a record holding its value and the diagnostics needed
to trust it (iterations, convergence, standard errors, what loss was
measured). `record.to_dict()` gives plain floats, ints, strings and lists,
ready for `json.dump`; parameter-sized fields (eigenvectors) are left out.
Every measure's record is here: sharpness (`WorstCaseResult`,
`AverageCaseResult`, `FirstOrderResult`), Hessian (`EigenResult`,
`TraceResult`, `DensityResult`, `PreconditionedEigenResult`) and landscape
(`CurveResult`, `SurfaceResult`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np


def to_json(value: Any) -> Any:
    """Arrays -> (nested) lists of Python numbers, scalars -> float/int/bool; NaN/inf -> None."""
    if isinstance(value, Record) and type(value).to_dict is not Record.to_dict:
        return value.to_dict()  # a record that leaves fields out (e.g. parameter-sized eigenvectors)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, (str, bool)) or value is None:
        return value
    if hasattr(value, "shape") and hasattr(value, "dtype"):  # jax or numpy array
        array = np.asarray(value)
        if array.ndim:
            return [to_json(v) for v in array.tolist()]
        value = array.item()
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def _short(value: Any) -> str:
    """A field as a record prints it: scalars and short vectors in full, other arrays and pytrees by shape."""
    if isinstance(value, dict) and not any(hasattr(v, "shape") for v in value.values()):
        return repr(value)
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        array = np.asarray(value)
        if array.ndim == 0:
            return repr(array.item())
        if array.size <= 8:
            return np.array2string(array, precision=6, separator=", ")
        return f"<{array.dtype} array {tuple(array.shape)}>"
    if isinstance(value, (str, bool, int, float)) or value is None:
        return repr(value)
    leaves = [x for x in _leaves(value) if hasattr(x, "shape")]
    if leaves:
        return f"<pytree of {len(leaves)} arrays, {sum(int(np.size(x)) for x in leaves):,} numbers>"
    return repr(value)


def _leaves(tree: Any) -> list:
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in _leaves(v)]
    if isinstance(tree, (list, tuple)):
        return [x for v in tree for x in _leaves(v)]
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return [x for f in dataclasses.fields(tree) for x in _leaves(getattr(tree, f.name))]
    if hasattr(tree, "items") and callable(tree.items):  # flax State and other mappings
        return [x for _, v in tree.items() for x in _leaves(v)]
    return [tree]


class Record:
    """Mixin for the result dataclasses: `to_dict()` for JSON; printed with arrays summarized by shape."""

    def to_dict(self) -> dict[str, Any]:
        return to_json(self)

    def __repr__(self) -> str:
        fields = ", ".join(f"{f.name}={_short(getattr(self, f.name))}" for f in dataclasses.fields(self))
        return f"{type(self).__name__}({fields})"


def _without(record: Any, skip: Sequence[str]) -> dict[str, Any]:
    return to_json(
        {f.name: getattr(record, f.name) for f in dataclasses.fields(record) if f.name not in skip}
    )


@dataclasses.dataclass(frozen=True, repr=False)
class EigenResult(Record):
    """Top-k Hessian eigenpairs (largest algebraic first) with their diagnostics.

    Attributes:
      eigenvalues: (k,) largest algebraic eigenvalues, in decreasing order.
      eigenvectors: a pytree like params whose leaves have a leading axis of
        size k; `jax.tree.map(lambda x: x[i], eigenvectors)` is the unit-norm
        eigenvector of `eigenvalues[i]`. Left out of `to_dict()`.
      residuals: (k,) ‖Hv − λv‖ of each returned pair, from an explicit
        Hessian-vector product of the returned vector (Lanczos: k products
        after the iteration; power: the last block product). In float32 they
        cannot go below the rounding of the product itself, about
        1e-7·max|λ|. For a pair with residual r, some eigenvalue lies within
        r of λ, and within ≲ r²/gap once the pair is separated from the rest
        of the spectrum by gap.
      iterations: Lanczos steps (plus k products for the residuals), the
        restarted solver's Hessian-vector products (its checks included), or
        block power iterations (including a shifted rerun, see `top_eigenvalues`).
      converged: "lanczos" and "power": every residual ≤ tol·max|λ| (power
        iteration also stops there); "restarted": every residual ≤ tol·|λ|
        of its own pair (it stops there).
      history: (checks, k) eigenvalue estimates as the iteration went on
        (NaN where fewer than k estimates existed yet).
      history_iterations: (checks,) the iteration each history row belongs to.
      method: "lanczos", "restarted" or "power".
      tol: the tolerance used for `converged`.
      shift: power iteration ran on H + shift·I (0 unless a negative eigenvalue
        dominated; the reported eigenvalues are of H).
      loss_info: description of the measured loss (`loss.info_of`).
    """

    eigenvalues: np.ndarray
    eigenvectors: Any
    residuals: np.ndarray
    iterations: int
    converged: bool
    history: np.ndarray
    history_iterations: np.ndarray
    method: str
    tol: float
    shift: float
    loss_info: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return _without(self, ("eigenvectors",))


@dataclasses.dataclass(frozen=True, repr=False)
class TraceResult(Record):
    """Hutchinson estimate of tr(H).

    Attributes:
      trace: mean of the n samples zᵀHz.
      standard_error: sample standard deviation / sqrt(n).
      n: number of Rademacher probes.
      dim: number of parameters (trace / dim is the mean eigenvalue).
      samples: (n,) the individual zᵀHz.
      loss_info: description of the measured loss.
    """

    trace: float
    standard_error: float
    n: int
    dim: int
    samples: np.ndarray
    loss_info: dict[str, Any]


@dataclasses.dataclass(frozen=True, repr=False)
class DensityResult(Record):
    """Hessian eigenvalue density by stochastic Lanczos quadrature.

    Attributes:
      nodes: (n_probes, order) Gauss quadrature nodes (Ritz values) per probe.
      weights: (n_probes, order) their weights; each row sums to 1.
      grid: (points,) where the density is evaluated.
      density: (points,) average over probes of Σ_j w_j N(t; λ_j, sigma²);
        integrates to ≈ 1 over the grid.
      sigma: the Gaussian smoothing width used.
      order: Lanczos steps per probe (clipped to the number of parameters).
      n_probes: number of probes.
      dim: number of parameters.
      loss_info: description of the measured loss.
    """

    nodes: np.ndarray
    weights: np.ndarray
    grid: np.ndarray
    density: np.ndarray
    sigma: float
    order: int
    n_probes: int
    dim: int
    loss_info: dict[str, Any]

    def moment(self, p: int) -> float:
        """Estimate of tr(H^p)/dim: Σ_j w_j λ_j^p averaged over probes.

        Exact for each probe v (it equals vᵀH^p v) when p ≤ 2·order − 1.
        """
        return float(np.mean(np.sum(self.weights * self.nodes**p, axis=1)))


@dataclasses.dataclass(frozen=True, repr=False)
class PreconditionedEigenResult(Record):
    """λmax of Adam's preconditioned Hessian P^{-1/2} H P^{-1/2} and Adam's stability thresholds.

    Attributes:
      eigenvalue: the largest algebraic eigenvalue.
      residual: ‖Mu − λu‖ for the Ritz vector u, M = P^{-1/2} H P^{-1/2}
        (from an explicit product, as in `EigenResult`).
      iterations: Lanczos steps, or the restarted solver's products (checks included).
      converged: residual ≤ tol·|λ|.
      history: (checks,) the top Ritz value as the iteration went on.
      history_iterations: (checks,) the Lanczos step (restarted: product count) of each history entry.
      learning_rate: η used for the thresholds (None if not known).
      b1, b2, eps: Adam's hyperparameters used.
      step: the update count used for bias correction.
      floor: the relative gradient-RMS floor used (see `preconditioned_top_eigenvalue`).
      excluded: coordinates left out as unmoved by Adam (sqrt(v̂) ≤ floor·max).
      gd_threshold: 2/η, the stability threshold of gradient descent.
      adam_threshold: (2 + 2β₁)/((1 − β₁)η), the stability threshold of Adam
        with momentum β₁ on a quadratic (Cohen et al. 2022; 38/η for β₁ = 0.9).
      loss_info: description of the measured loss.
      method: "lanczos" or "restarted" (see `preconditioned_top_eigenvalue`).
      eigenvector: the unit Ritz vector u of P^{-1/2} H P^{-1/2}, a pytree
        like params (a warm start for a later call). Left out of `to_dict()`.
    """

    eigenvalue: float
    residual: float
    iterations: int
    converged: bool
    history: np.ndarray
    history_iterations: np.ndarray
    learning_rate: float | None
    b1: float
    b2: float
    eps: float
    step: int
    floor: float
    excluded: int
    gd_threshold: float | None
    adam_threshold: float | None
    loss_info: dict[str, Any]
    method: str = "lanczos"
    eigenvector: Any = None

    def to_dict(self) -> dict[str, Any]:
        return _without(self, ("eigenvector",))


# --------------------------------------------------------------------------- sharpness


@dataclasses.dataclass(frozen=True, repr=False)
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
        return to_json({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "perturbation"})


@dataclasses.dataclass(frozen=True, repr=False)
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


@dataclasses.dataclass(frozen=True, repr=False)
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


# --------------------------------------------------------------------------- landscape


@dataclasses.dataclass(frozen=True, repr=False)
class CurveResult(Record):
    """The loss along a line through parameter space.

    Attributes:
      t: (num,) the line's coordinate: the interpolation coefficient
        (0 = params_a, 1 = params_b) or the step along the direction (0 = params).
      loss: (num,) the loss at each t.
      accuracy: (num,) the accuracy at each t, or None (not asked for, or the
        loss function has none).
      kind: "interpolation" or "slice".
      span: (t_min, t_max).
      params_norm: ‖a‖ (interpolation) or ‖w‖ (slice), global L2 norm.
      direction_norm: ‖b − a‖ (interpolation) or ‖d‖ (slice).
      recalibrated: whether BatchNorm statistics were recomputed at every point
        (`make_recalibrated_loss_fn`); from `loss_info`.
      direction_info: what the direction is (caller's description, e.g.
        {"normalization": "filter", "seed": 0}; ‖b‖ for interpolations).
      loss_info: what loss was measured (`make_loss_fn`'s info).
    """

    t: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray | None
    kind: str
    span: tuple[float, float]
    params_norm: float
    direction_norm: float
    recalibrated: bool
    direction_info: dict
    loss_info: dict


@dataclasses.dataclass(frozen=True, repr=False)
class SurfaceResult(Record):
    """The loss on a plane L(w + x d1 + y d2).

    Attributes:
      x: (nx,) coordinates along d1.
      y: (ny,) coordinates along d2.
      loss: (ny, nx) loss[i, j] = L(w + x[j] d1 + y[i] d2) (rows follow y, as
        `matplotlib.contourf(x, y, loss)` expects).
      accuracy: (ny, nx) or None.
      kind: "surface_2d".
      params_norm: ‖w‖.
      direction_norms: (‖d1‖, ‖d2‖).
      direction_cosine: cos∠(d1, d2); random high-dimensional directions are
        nearly orthogonal (|cos| ~ 1/sqrt(#params)).
      recalibrated: whether BatchNorm statistics were recomputed at every point.
      direction_info: the caller's description of d1, d2.
      loss_info: what loss was measured.
    """

    x: np.ndarray
    y: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray | None
    kind: str
    params_norm: float
    direction_norms: tuple[float, float]
    direction_cosine: float
    recalibrated: bool
    direction_info: dict
    loss_info: dict
