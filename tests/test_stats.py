"""Paired differences over seeds and Kendall τ with a bootstrap interval; the report's findings worded from them."""

from __future__ import annotations

import importlib.util
import math
import os

import numpy as np
import pytest
from scipy import stats as scipy_stats

from jaxsam import report
from jaxsam import study as study_lib
from jaxsam.stats import _tau_b, kendall_tau_ci, paired_difference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The 0.975 quantile of Student's t with 2 degrees of freedom, in closed form (the t2 CDF is
# 1/2 + t / (2 sqrt(2 + t^2))): (2p - 1) sqrt(2 / (4p(1 - p))) = 4.3027.
T_975_DF2 = 0.95 * math.sqrt(2 / (4 * 0.975 * 0.025))


def test_t_interval_matches_the_hand_computation():
    d = paired_difference([10.0, 10.0, 10.0], [11.0, 12.0, 13.0])  # differences 1, 2, 3: mean 2, sd 1
    half = T_975_DF2 * 1.0 / math.sqrt(3)
    assert d.mean == pytest.approx(2.0)
    assert (d.ci_low, d.ci_high) == pytest.approx((2.0 - half, 2.0 + half), rel=1e-12)
    assert (d.n, d.positive, d.negative) == (3, 3, 0)
    assert d.verdict == "no difference detected"  # [-0.48, 4.48] straddles 0
    assert d.to_dict()["ci_high"] == d.ci_high and d.level == 0.95


def test_one_pair_has_no_interval_and_no_verdict():
    d = paired_difference([1.0], [5.0])
    assert d.mean == 4.0 and d.n == 1 and d.positive == 1
    assert math.isnan(d.ci_low) and math.isnan(d.ci_high)
    assert d.verdict == "no difference detected"
    empty = paired_difference([], [])
    assert empty.n == 0 and math.isnan(empty.mean) and empty.verdict == "no difference detected"


@pytest.mark.parametrize(
    "b, verdict, signs",
    [
        ([1.5, 2.6, 3.4, 4.5], "higher", (4, 0)),  # differences 0.5, 0.6, 0.4, 0.5
        ([0.5, 1.4, 2.6, 3.5], "lower", (0, 4)),
        ([1.5, 1.6, 3.4, 3.5], "no difference detected", (2, 2)),  # ±0.5, ±0.4: interval around 0
    ],
)
def test_verdicts_follow_the_interval(b, verdict, signs):
    d = paired_difference([1.0, 2.0, 3.0, 4.0], b)
    assert d.verdict == verdict and (d.positive, d.negative) == signs
    if verdict == "higher":
        assert d.ci_low > 0
    elif verdict == "lower":
        assert d.ci_high < 0
    else:
        assert d.ci_low < 0 < d.ci_high


def test_nan_and_none_pairs_are_dropped():
    d = paired_difference([1.0, float("nan"), 3.0, None, 5.0], [2.0, 7.0, 4.5, 1.0, float("inf")])
    ref = paired_difference([1.0, 3.0], [2.0, 4.5])
    assert d == ref and d.n == 2
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference([1.0, 2.0], [1.0])


def test_bootstrap_tau_matches_scipy_on_samples_with_ties():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 4, size=(200, 7)).astype(float)
    y = rng.integers(0, 4, size=(200, 7)).astype(float)
    x[0] = 2.0  # a constant sample: τ undefined in both
    ours = _tau_b(x, y)
    theirs = np.array([scipy_stats.kendalltau(a, b).statistic for a, b in zip(x, y)])
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
    np.testing.assert_allclose(ours[~np.isnan(ours)], theirs[~np.isnan(theirs)], rtol=0, atol=1e-12)


def test_kendall_interval_is_reproducible_and_contains_tau():
    rng = np.random.default_rng(0)
    x = np.arange(20.0)
    y = x + rng.normal(0.0, 4.0, size=20)  # monotone with noise
    first, again = kendall_tau_ci(x, y, seed=7), kendall_tau_ci(x, y, seed=7)
    assert first == again  # same numbers on every call with the same seed
    assert kendall_tau_ci(x, y, seed=8).ci_low != first.ci_low
    assert first.tau == pytest.approx(scipy_stats.kendalltau(x, y).statistic)
    assert 0 < first.ci_low < first.tau < first.ci_high <= 1
    assert (first.n, first.n_boot, first.skipped) == (20, 2000, 0)
    wider = kendall_tau_ci(x, y, seed=7, level=0.99)
    assert wider.ci_low <= first.ci_low and wider.ci_high >= first.ci_high


def test_resamples_without_a_tau_are_skipped_and_counted():
    x, y = [1.0, 2.0, 3.0, float("nan")], [1.0, 3.0, 2.0, 4.0]  # the NaN pair is dropped: n = 3
    result = kendall_tau_ci(x, y, n_boot=500, seed=1)
    index = np.random.default_rng(1).integers(0, 3, size=(500, 3))
    constant = int(np.sum(np.all(index == index[:, :1], axis=1)))  # distinct x and y: constant iff one index
    assert result.n == 3 and result.skipped == constant > 0
    assert -1 <= result.ci_low <= result.ci_high <= 1
    few = kendall_tau_ci([1.0], [2.0])
    assert few.n == 1 and math.isnan(few.tau) and math.isnan(few.ci_low) and few.skipped == few.n_boot


# ---------------------------------------------------------------------------
# The report, from fabricated rows.


def _study():
    spec = importlib.util.spec_from_file_location("study_config", os.path.join(ROOT, "configs", "study.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("smoke")
    c.models, c.arms, c.seeds = "resnet18", "sgd,sgd_sam", 3
    return c


def _rows():
    test = {"sgd": [0.60, 0.62, 0.64], "sgd_sam": [0.61, 0.60, 0.66]}  # SAM − SGD: +1, −2, +2 pp
    train = {"sgd": [0.70, 0.74, 0.72], "sgd_sam": [0.66, 0.69, 0.69]}
    worst = {"sgd": [0.20, 0.22, 0.24], "sgd_sam": [0.16, 0.17, 0.21]}  # −0.04, −0.05, −0.03
    lam = {"sgd": [50.0, float("nan"), 70.0], "sgd_sam": [40.0, 45.0, 50.0]}  # seed 1 has no pair
    rows = []
    for seed in range(3):
        for arm in ("sgd", "sgd_sam"):
            rows.append({"model": "resnet18", "arm": arm, "seed": seed, "seed_index": seed,
                         "test_accuracy": test[arm][seed], "train_accuracy": train[arm][seed],
                         "gap": train[arm][seed] - test[arm][seed], "worst_case": worst[arm][seed],
                         "lambda_max": lam[arm][seed],
                         "epochs": {"epoch": [1], "test_accuracy": [test[arm][seed]]}})  # fmt: skip
    return rows


def _minus(text: str) -> str:
    return text.replace("-", "−")


def test_report_states_each_difference_with_its_interval():
    study, rows = _study(), _rows()
    pairs = report.paired(study, rows)
    cells = pairs["resnet18"]["sgd->sgd_sam"]
    assert set(cells) == {"test_accuracy", "gap", "worst_case", "lambda_max"}
    # Accuracy in percentage points, by hand: differences 1, -2, 2.
    d = np.array([1.0, -2.0, 2.0])
    half = T_975_DF2 * np.std(d, ddof=1) / math.sqrt(3)
    acc = cells["test_accuracy"]
    assert acc["mean"] == pytest.approx(1 / 3)
    assert (acc["ci_low"], acc["ci_high"]) == pytest.approx((1 / 3 - half, 1 / 3 + half))
    assert (acc["positive"], acc["negative"], acc["verdict"]) == (2, 1, "no difference detected")
    worst = cells["worst_case"]
    assert worst["verdict"] == "lower" and worst["negative"] == 3 and worst["mean"] == pytest.approx(-0.04)
    assert cells["lambda_max"]["n"] == 2  # the NaN seed is dropped

    agg = study_lib.aggregate(rows)
    summary = {"aggregate": agg, "kendall_tau": report.kendall_taus(rows), "paired": pairs}
    text = report.markdown(study, "python scripts/study.py (test)", rows, summary, {}, study_lib.plan(study))
    assert text == report.markdown(study, "python scripts/study.py (test)", rows, {**summary, "paired": None}, {},
                                   study_lib.plan(study))  # the same report when markdown pairs the rows itself
    worst_half = T_975_DF2 * 0.01 / math.sqrt(3)  # differences -0.04, -0.05, -0.03: sd 0.01
    assert (f"Worst-case sharpness lower with SAM: −0.040, 95 % CI [{_minus(f'{-0.04 - worst_half:.3f}')}, "
            f"{_minus(f'{-0.04 + worst_half:.3f}')}], 3/3 seeds") in text  # fmt: skip
    assert (f"Test accuracy (62.00 ± 2.00% → 62.33 ± 3.21%): no difference detected at this scale (+0.33 pp, "
            f"95 % CI [{_minus(f'{1 / 3 - half:.2f}')}, {1 / 3 + half:.2f}] pp; seeds 2/3 higher, 1/3 lower)") in text
    # The paired table: one row per quantity, with the sign count.
    row = next(line for line in text.splitlines() if line.startswith("| SGD + SAM − SGD | worst-case sharpness |"))
    assert row.endswith("| 3/3 lower | lower |") and "[−0.065, −0.015]" in row
    assert "| SGD + SAM − SGD | λmax | " in text
    assert "seed spread" not in text  # the old std-overlap wording is gone


def test_kendall_taus_carry_their_bootstrap_interval():
    rows = _rows()
    taus = report.kendall_taus(rows)
    assert set(taus) == {"worst_case", "lambda_max"}
    pairs = [(r["worst_case"], r["gap"]) for r in rows]
    expected = kendall_tau_ci(*zip(*pairs))
    assert taus["worst_case"] == {"tau": expected.tau, "ci_low": expected.ci_low, "ci_high": expected.ci_high, "n": 6}
    assert taus["lambda_max"]["n"] == 5
    assert taus["worst_case"]["ci_low"] <= taus["worst_case"]["tau"] <= taus["worst_case"]["ci_high"]
