"""Loops driven from Python (the CPU path) give the same numbers as loops compiled into one program."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsam.geometry import driver, hessian, landscape, sharpness
from jaxsam.geometry.hessian import hvp
from jaxsam.geometry.loss import make_loss_fn

from test_sharpness import _tiny_model_data


@pytest.fixture
def tiny(x64):
    """A BatchNorm network's loss on 23 examples in microbatches of 8 (the last one padded), float64."""
    model, variables, images, labels = _tiny_model_data(n=23)
    return make_loss_fn(model, variables, images, labels, batch_size=8, subset="tiny"), variables["params"]


def _both(measure):
    """(compiled result, host-driven result) of measure()."""
    with driver.loops_on_host(False):
        compiled = measure()
    with driver.loops_on_host(True):
        host = measure()
    return compiled, host


def _close(a, b, rtol=1e-9):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=1e-12)


def test_host_sums_over_microbatches_equal_the_scanned_loss_its_gradient_and_hvp(tiny):
    """The executor's oracle calls (one compiled call per microbatch on the host, one scan compiled) against
    autodiff of the scanned loss: value, gradient, Hessian-vector product, accuracy."""
    loss_fn, params = tiny
    v = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size, dtype=p.dtype)).reshape(p.shape), params)
    plain = lambda p: loss_fn.sums(p)[0] / 23  # noqa: E731  # autodiff straight through the scan
    for host in (True, False):
        with driver.loops_on_host(host):
            value, grads = driver.value_and_grad(loss_fn, params)
            assert float(value) == pytest.approx(float(loss_fn(params)), rel=1e-13)
            assert float(driver.value(loss_fn, params)) == pytest.approx(float(plain(params)), rel=1e-13)
            _close(grads, jax.grad(plain)(params), rtol=1e-11)
            _close(driver.hvp(loss_fn, params, v), jax.jvp(jax.grad(plain), (params,), (v,))[1], rtol=1e-11)
            _, accuracy = driver.value_and_accuracy(loss_fn, params)
            assert float(accuracy) == pytest.approx(float(loss_fn.sums(params)[1]) / 23, rel=1e-13)
    _close(loss_fn.hvp(params, v), hvp(loss_fn, params, v), rtol=1e-11)


@pytest.mark.parametrize(
    "settings",
    [dict(rho=0.1), dict(rho=0.05, norm="linf"), dict(rho=0.2, adaptive=True), dict(rho=0.1, m=10)],
    ids=["l2", "linf", "adaptive", "m=10"],
)
def test_worst_case_ascent_is_the_same_on_the_host(tiny, settings):
    loss_fn, params = tiny
    compiled, host = _both(lambda: sharpness.worst_case_sharpness(loss_fn, params, key=jax.random.key(0), steps=12, **settings))
    assert host.value > 0
    for field in ("value", "loss", "perturbed_loss", "delta_norm", "standard_error"):
        assert getattr(host, field) == pytest.approx(getattr(compiled, field), rel=1e-9, abs=1e-13), field
    _close(host.curve, compiled.curve)
    _close(host.values, compiled.values)


def test_average_case_and_first_order_are_the_same_on_the_host(tiny):
    loss_fn, params = tiny
    compiled, host = _both(lambda: sharpness.average_case_sharpness(loss_fn, params, 0.05, jax.random.key(1), n=6))
    _close(host.samples, compiled.samples)
    compiled, host = _both(lambda: sharpness.first_order_sharpness(loss_fn, params, 0.1, adaptive=True))
    assert host.value == pytest.approx(compiled.value, rel=1e-11)


@pytest.mark.parametrize("method", ["lanczos", "restarted", "power"])
def test_top_eigenvalues_are_the_same_on_the_host(tiny, method):
    loss_fn, params = tiny
    compiled, host = _both(lambda: hessian.top_eigenvalues(loss_fn, params, jax.random.key(2), k=2, method=method))
    _close(host.eigenvalues, compiled.eigenvalues)
    assert host.iterations == compiled.iterations and host.converged == compiled.converged
    # Eigenvectors agree up to sign.
    for a, b in zip(jax.tree.leaves(host.eigenvectors), jax.tree.leaves(compiled.eigenvectors)):
        for i in range(2):
            sign = np.sign(np.vdot(np.asarray(a[i]), np.asarray(b[i])))
            np.testing.assert_allclose(np.asarray(a[i]), sign * np.asarray(b[i]), atol=1e-6)


def test_trace_density_and_preconditioned_are_the_same_on_the_host(tiny):
    loss_fn, params = tiny
    key = jax.random.key(3)
    compiled, host = _both(lambda: hessian.hessian_trace(loss_fn, params, key, n=4))
    _close(host.samples, compiled.samples)
    compiled, host = _both(lambda: hessian.spectral_density(loss_fn, params, key, order=6, n_probes=2))
    _close(host.nodes, compiled.nodes)
    _close(host.weights, compiled.weights)
    tx = optax.adam(1e-2)
    state = tx.init(params)
    _, state = tx.update(jax.grad(loss_fn)(params), state, params)
    for method in ("lanczos", "restarted"):
        compiled, host = _both(lambda: hessian.preconditioned_top_eigenvalue(loss_fn, params, state, key, iters=8,
                                                                              method=method))  # fmt: skip
        assert host.eigenvalue == pytest.approx(compiled.eigenvalue, rel=1e-9)
        assert host.iterations == compiled.iterations


def test_landscape_grids_are_the_same_on_the_host(tiny):
    loss_fn, params = tiny
    d1 = landscape.random_direction(jax.random.key(4), params)
    d2 = landscape.random_direction(jax.random.key(5), params)
    compiled, host = _both(lambda: landscape.surface_2d(loss_fn, params, d1, d2, num=(3, 2), batch_size=4))
    _close(host.loss, compiled.loss)
    _close(host.accuracy, compiled.accuracy)
    moved = jax.tree.map(jnp.add, params, d1)
    compiled, host = _both(lambda: landscape.interpolate(loss_fn, params, moved, num=4))
    _close(host.loss, compiled.loss)


def test_the_default_follows_the_backend_and_the_environment(monkeypatch):
    monkeypatch.delenv("JAXSAM_HOST_LOOPS", raising=False)
    assert driver.host_loops() == (jax.default_backend() == "cpu")
    monkeypatch.setenv("JAXSAM_HOST_LOOPS", "0")
    assert driver.host_loops() is False
    with driver.loops_on_host(True):
        assert driver.host_loops() is True
    monkeypatch.setenv("JAXSAM_HOST_LOOPS", "yes")
    with pytest.raises(ValueError, match="set it to 1 .* or unset it"):
        driver.host_loops()
