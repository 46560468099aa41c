"""Small-sample statistics for the study's report: paired differences over seeds, Kendall τ with a bootstrap interval.

A study has few seeds per arm (2-5), so the report states each SAM − base
difference with the Student-t interval (Student 1908) of the per-seed paired
differences and calls it "higher" or "lower" only when that interval
excludes 0. The rank agreement of a measure with the generalization gap is
Kendall's τ-b (Kendall 1938; the tie correction, Kendall 1945; ranked against
the gap as in Jiang et al. 2020, "Fantastic generalization measures") with a
percentile bootstrap interval over runs (Efron & Tibshirani 1993, ch. 13).
Pure numpy + scipy; nothing here imports jaxsam.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np
from scipy import stats as _scipy_stats

HIGHER, LOWER, NO_DIFFERENCE = "higher", "lower", "no difference detected"


@dataclasses.dataclass(frozen=True)
class PairedDifference:
    """b − a over the seeds that have both values.

    Attributes:
      mean: the mean paired difference (NaN when n = 0).
      ci_low, ci_high: the Student-t interval at `level` (NaN when n < 2).
      n: the number of pairs used.
      positive, negative: how many pairs have b > a, b < a (ties count in neither).
      verdict: "higher" (interval above 0), "lower" (below 0) or "no difference detected".
      level: the interval's confidence level.
    """

    mean: float
    ci_low: float
    ci_high: float
    n: int
    positive: int
    negative: int
    verdict: str
    level: float = 0.95

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (for JSON; NaN stays NaN)."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class KendallTau:
    """Kendall τ-b of two samples with its percentile bootstrap interval.

    Attributes:
      tau: τ-b of the n finite pairs (NaN when n < 2 or either sample is constant).
      ci_low, ci_high: the percentile bootstrap interval at `level` (NaN when no resample has a τ).
      n: the number of pairs used.
      n_boot: the number of bootstrap resamples drawn.
      skipped: resamples left out because their τ is undefined (a resample constant in x or y).
      level: the interval's confidence level.
    """

    tau: float
    ci_low: float
    ci_high: float
    n: int
    n_boot: int
    skipped: int
    level: float = 0.95

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (for JSON; NaN stays NaN)."""
        return dataclasses.asdict(self)


def _finite_pairs(a: Sequence[float | None], b: Sequence[float | None]) -> tuple[np.ndarray, np.ndarray]:
    if len(a) != len(b):
        raise ValueError(f"paired samples need equal lengths (got {len(a)} and {len(b)})")
    x = np.array([np.nan if v is None else float(v) for v in a], dtype=float)
    y = np.array([np.nan if v is None else float(v) for v in b], dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def paired_difference(
    a: Sequence[float | None], b: Sequence[float | None], *, level: float = 0.95
) -> PairedDifference:
    """The mean of b − a paired by position, with its Student-t interval and a verdict.

    The interval is mean ± t(1 − (1 − level)/2, n − 1) · sd / √n, with sd the
    sample standard deviation (n − 1 in the denominator). Pairs where either
    value is None, NaN or infinite are dropped first.

    Example:
      >>> d = paired_difference([0.20, 0.25, 0.22], [0.15, 0.19, 0.18])
      >>> d.verdict, d.negative, d.n
      ('lower', 3, 3)

    Args:
      a: the per-seed values of the reference arm (the base optimizer).
      b: the per-seed values of the compared arm (with SAM), same seeds in the same order.
      level: the confidence level of the interval.

    Returns:
      A `PairedDifference`; its interval is NaN and its verdict "no difference
      detected" when fewer than 2 pairs remain.
    """
    x, y = _finite_pairs(a, b)
    d = y - x
    n = int(d.size)
    mean = float(np.mean(d)) if n else math.nan
    low = high = math.nan
    if n >= 2:
        half = float(_scipy_stats.t.ppf(0.5 + level / 2, n - 1) * np.std(d, ddof=1) / math.sqrt(n))
        low, high = mean - half, mean + half
    verdict = HIGHER if low > 0 else LOWER if high < 0 else NO_DIFFERENCE  # NaN compares False
    return PairedDifference(mean, low, high, n, int(np.sum(d > 0)), int(np.sum(d < 0)), verdict, level)


def _tau_b(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """τ-b of each row pair of x, y (shape (B, n)): Σ sx·sy / √(Σ sx² · Σ sy²) over all ordered pairs i ≠ j.

    sx = sign(x_i − x_j); a tied pair has sx = 0, so the sums are the τ-b
    numerator and tie-corrected denominator, doubled. NaN where a row is constant.
    """
    sx = np.sign(x[:, :, None] - x[:, None, :])
    sy = np.sign(y[:, :, None] - y[:, None, :])
    num = np.einsum("bij,bij->b", sx, sy)
    den = np.sqrt(np.einsum("bij,bij->b", sx, sx) * np.einsum("bij,bij->b", sy, sy))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def kendall_tau_ci(
    x: Sequence[float | None],
    y: Sequence[float | None],
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> KendallTau:
    """Kendall τ-b of x and y with a percentile bootstrap interval over resampled pairs.

    τ is `scipy.stats.kendalltau` of the finite pairs. Each resample draws n
    pairs with replacement from a `numpy.random.default_rng(seed)` generator,
    so the interval is the same on every call; resamples whose τ is undefined
    (all x or all y tied) are skipped and counted.

    Example:
      >>> r = kendall_tau_ci([1, 2, 3, 4, 5, 6], [1.2, 1.9, 3.4, 3.1, 5.5, 6.2])
      >>> round(r.tau, 3), r.n, r.ci_low <= r.tau <= r.ci_high
      (0.867, 6, True)

    Args:
      x, y: the two samples, paired by position (None/NaN/inf pairs dropped).
      n_boot: the number of bootstrap resamples.
      seed: the seed of the resampling generator.
      level: the confidence level of the interval.

    Returns:
      A `KendallTau`; all NaN (and n_boot skipped) when fewer than 2 pairs remain.
    """
    xs, ys = _finite_pairs(x, y)
    n = int(xs.size)
    if n < 2:
        return KendallTau(math.nan, math.nan, math.nan, n, int(n_boot), int(n_boot), level)
    tau = float(_scipy_stats.kendalltau(xs, ys).statistic)
    index = np.random.default_rng(seed).integers(0, n, size=(int(n_boot), n))
    chunk = max(1, 2_000_000 // (n * n))  # bounds the (chunk, n, n) sign arrays
    taus = np.concatenate([_tau_b(xs[index[i : i + chunk]], ys[index[i : i + chunk]])
                           for i in range(0, int(n_boot), chunk)] or [np.empty(0)])  # fmt: skip
    valid = taus[np.isfinite(taus)]
    low = high = math.nan
    if valid.size:
        low, high = (float(v) for v in np.percentile(valid, [50 * (1 - level), 50 * (1 + level)]))
    return KendallTau(tau, low, high, n, int(n_boot), int(n_boot - valid.size), level)
