"""scripts/bench.py's measuring machinery (scripts/bench_workers.py): turn-taking worker processes and its error rows."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _script("bench")


@pytest.fixture(scope="module")
def bench_workers():
    return _script("bench_workers")


def test_interleaved_workers_time_each_step_and_keep_their_ratio(bench):
    fast, slow = bench._interleaved([dict(kind="sleep", seconds=0.05), dict(kind="sleep", seconds=0.15)], rounds=5,
                                    timeout=120, pause=0.0)  # fmt: skip
    # A sleep lasts at least its time and overshoots by the scheduler's wake-up delay, which a
    # loaded machine stretches (3 ms measured at load average 6.6): so lower bounds are exact,
    # and the upper ones only rule out a step timed twice or a wrong protocol line.
    for result, seconds in ((fast, 0.05), (slow, 0.15)):
        assert "error" not in result, result
        assert len(result["round_s"]) == 5 and result["steps"] == 1 and result["batch"] == 1
        assert seconds <= result["seconds_per_step"] < 2 * seconds + 0.5
        assert result["images_per_s"] == pytest.approx(1 / result["seconds_per_step"])
        assert result["peak_rss_mb"] > 0
    # The medians keep the 0.1 s between the two unless their wake-up delays differ by 50 ms.
    assert slow["seconds_per_step"] - fast["seconds_per_step"] > 0.05


def test_cores_busy_is_cpu_seconds_over_wall_seconds(bench):
    asleep, busy = bench._interleaved([dict(kind="sleep", seconds=0.1), dict(kind="spin", seconds=0.2)], rounds=3,
                                      timeout=120, pause=0.0)  # fmt: skip
    for result in (asleep, busy):
        assert result["cores_busy"] == pytest.approx(sum(result["round_cpu_s"]) / sum(result["round_s"]))
    # A sleeping step uses (almost) no CPU; a spinning one at most one core, all of it on an idle
    # machine and less when other processes share the cores (so no lower bound beyond the sleeper's).
    assert 0.0 <= asleep["cores_busy"] < 0.05
    assert 10 * asleep["cores_busy"] < busy["cores_busy"] <= 1.05


def test_a_failing_worker_gives_an_error_row_and_the_others_still_run(bench):
    ok, broken = bench._interleaved([dict(kind="sleep", seconds=0.01), dict(kind="no_such_step")], rounds=2,
                                    timeout=120, pause=0.0)  # fmt: skip
    assert "seconds_per_step" in ok and len(ok["round_s"]) == 2
    assert "error" in broken and "no_such_step" in broken["error"]


def test_the_eigen_row_counts_both_solvers_products_on_one_operator(bench, bench_workers, capsys):
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((200, 200)))
    spectrum = rng.uniform(-0.5, 0.5, 200)
    spectrum[:3] = [10.0, 6.0, 3.0]
    a = jnp.asarray((q * spectrum) @ q.T, jnp.float32)
    row = bench_workers._eigen_compare(jax.jit(lambda x: a @ x), 200, np.float32, 3, 1e-6)
    assert row["eigen_converged"] and row["eigen_hvps"] <= row["eigsh_hvps"]
    for name in ("eigen", "eigsh"):
        np.testing.assert_allclose(row[f"{name}_values"], [10.0, 6.0, 3.0], rtol=1e-5)
    # float32 products: the explicit residual may exceed the reported one by about 2ε‖A‖/|θ| (test_eigen).
    assert row["eigen_residual"] <= 1e-6 and row["eigen_residual_explicit"] <= 1e-6 + 2.4e-7 * 10 / 3
    bench._print_table([dict(row, section="lanczos", name="top-3", n=200, at="a matrix", current_hvps=53,
                             current_s=1.0, current_residual=1e-5)])  # fmt: skip
    assert f"eigen {row['eigen_hvps']} HVPs" in capsys.readouterr().out
