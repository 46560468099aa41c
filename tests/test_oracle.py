"""The oracle and its executor: any model through every measure, compiled once, data as arguments.

Numbers are float64 against a least-squares loss whose Hessian is exact
(a linear model: H = JᵀJ / N with J the Jacobian of the outputs, computed
here from the formula, not through the oracle). Compile counts come from
`jax.monitoring`: JAX records '/jax/core/compile/jaxpr_to_mlir_module_duration'
each time it lowers a program (whether or not the persistent cache then
serves it) and '/jax/core/compile/backend_compile_duration' when XLA compiles.
"""

from __future__ import annotations

import contextlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from jaxsam.geometry import driver, hessian, landscape, sharpness
from jaxsam.geometry.loss import LossFunction, from_function, make_loss_fn

from test_sharpness import _Tiny, _tiny_model_data, _trust_region_max

N, D, K = 23, 3, 2  # examples (not a multiple of the microbatch), inputs, outputs
BATCH = 8


# --------------------------------------------------------------------------- three models of one least-squares loss


def squared_error(outputs, targets):
    return 0.5 * jnp.sum((outputs - targets) ** 2, axis=-1)


class LinenLinear(nn.Module):
    """No `train` argument, no BatchNorm."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(K, param_dtype=jnp.float64)(x)


def _data(seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((N, D)), rng.standard_normal((N, K)), rng


def _linear(kernel, bias, x):
    return x @ kernel + bias


def _problem(kind: str, seed=0):
    """(loss_fn, params, forward(params, x) -> outputs) for one adapter; the same loss for every kind."""
    x, y, rng = _data(seed)
    kernel, bias = rng.standard_normal((D, K)), 0.1 * rng.standard_normal(K)
    if kind == "function":
        params = {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}

        def per_example(p, batch):
            inputs, targets = batch
            return squared_error(_linear(p["kernel"], p["bias"], inputs), targets)

        return make_loss_fn(per_example, batch=(x, y), batch_size=BATCH), params, \
            lambda p, xs: _linear(p["kernel"], p["bias"], xs)
    if kind == "linen":
        model = LinenLinear()
        params = {"Dense_0": {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}}
        loss_fn = make_loss_fn(model, {"params": params}, x, y, loss=squared_error, batch_size=BATCH)
        return loss_fn, params, lambda p, xs: _linear(p["Dense_0"]["kernel"], p["Dense_0"]["bias"], xs)
    model = nnx.Linear(D, K, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    model.kernel[...], model.bias[...] = jnp.asarray(kernel), jnp.asarray(bias)
    params = nnx.state(model, nnx.Param)
    loss_fn = make_loss_fn(model, None, x, y, loss=squared_error, batch_size=BATCH)
    return loss_fn, params, lambda p, xs: _linear(p["kernel"][...], p["bias"][...], xs)


def _exact(params, forward, seed=0):
    """(L, ∇L, H) of the least-squares loss at params, flat, from its formula."""
    x, y, _ = _data(seed)
    flat, unravel = ravel_pytree(params)
    out = lambda v: forward(unravel(v), x)  # noqa: E731
    jac = np.asarray(jax.jacobian(out)(flat)).reshape(N * K, -1)  # constant: the model is linear
    residual = np.asarray(out(flat) - y).reshape(-1)
    return 0.5 * np.sum(residual**2) / N, jac.T @ residual / N, jac.T @ jac / N


KINDS = ["function", "linen", "nnx"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_least_squares_loss_through_every_measure(x64, kind):
    loss_fn, params, forward = _problem(kind)
    value, grad, h = _exact(params, forward)
    flat, unravel = ravel_pytree(params)
    dim = flat.shape[0]
    spectrum = np.linalg.eigvalsh(h)[::-1]
    key = jax.random.key(0)
    assert float(loss_fn(params)) == pytest.approx(value, rel=1e-13)
    assert np.isnan(float(loss_fn.accuracy(params)))  # float targets: no accuracy

    # Sharpness: the exact trust-region maximum of a quadratic, ½σ² tr(H), ρ‖∇L‖.
    rho = 0.3
    worst = sharpness.worst_case_sharpness(loss_fn, params, rho, key, steps=100)
    assert worst.value == pytest.approx(_trust_region_max(h, grad, rho), rel=1e-4)
    assert float(loss_fn(jax.tree.map(jnp.add, params, worst.perturbation))) == pytest.approx(worst.perturbed_loss,
                                                                                            rel=1e-12)  # fmt: skip
    average = sharpness.average_case_sharpness(loss_fn, params, 0.1, key, n=400)
    assert abs(average.value - 0.5 * 0.01 * np.trace(h)) < 4 * average.standard_error
    first = sharpness.first_order_sharpness(loss_fn, params, 0.05)
    assert first.value == pytest.approx(0.05 * np.linalg.norm(grad), rel=1e-12)

    # Hessian: eigenvalues (both methods), trace, quadrature, Adam's preconditioned λmax.
    top = hessian.top_eigenvalues(loss_fn, params, key, k=3, iters=dim)
    np.testing.assert_allclose(top.eigenvalues, spectrum[:3], rtol=0, atol=1e-10)
    # H = I_K ⊗ A (K outputs of one linear map): every eigenvalue K times. One start vector's Krylov space holds one
    # direction per eigenspace, so the restarted solver (like ARPACK) returns each distinct value once.
    restarted = hessian.top_eigenvalues(loss_fn, params, key, k=3, method="restarted", tol=1e-9)
    distinct = spectrum[np.r_[True, np.diff(spectrum) < -1e-8 * spectrum[0]]]
    np.testing.assert_allclose(restarted.eigenvalues, distinct[:3], rtol=1e-9)
    assert restarted.converged and np.all(restarted.residuals <= 1e-9 * np.abs(restarted.eigenvalues))
    power = hessian.top_eigenvalues(loss_fn, params, key, k=2, method="power", tol=1e-9, iters=2000)
    np.testing.assert_allclose(power.eigenvalues, spectrum[:2], rtol=1e-6)
    trace = hessian.hessian_trace(loss_fn, params, key, n=64, batch_size=3)
    assert abs(trace.trace - np.trace(h)) < 4 * trace.standard_error + 1e-9
    probes = np.random.default_rng(1).choice([-1.0, 1.0], (2, dim))
    density = hessian.spectral_density(loss_fn, params, key, order=dim, probes=probes)
    unit = probes / np.linalg.norm(probes, axis=1, keepdims=True)
    for p in (1, 2):  # Gauss quadrature with dim nodes is exact: Σ w λᵖ = vᵀHᵖv
        want = np.mean([u @ np.linalg.matrix_power(h, p) @ u for u in unit])
        assert density.moment(p) == pytest.approx(want, rel=1e-9)
    tx = optax.adam(1e-2)
    _, state = tx.update(unravel(jnp.asarray(grad)), tx.init(params), params)
    nu = np.asarray(ravel_pytree(state[0].nu)[0]) / (1 - 0.999)
    d = 1 / np.sqrt(np.sqrt(nu) + 1e-8)
    pre = hessian.preconditioned_top_eigenvalue(loss_fn, params, state, key, iters=dim, floor=0.0)
    assert pre.eigenvalue == pytest.approx(np.linalg.eigvalsh(d[:, None] * h * d[None])[-1], rel=1e-9)
    pre = hessian.preconditioned_top_eigenvalue(loss_fn, params, state, key, floor=0.0, method="restarted", tol=1e-10)
    assert pre.eigenvalue == pytest.approx(np.linalg.eigvalsh(d[:, None] * h * d[None])[-1], rel=1e-9)
    assert pre.converged and pre.method == "restarted"

    # Landscape: every point is the quadratic's value there.
    direction = unravel(jnp.asarray(np.random.default_rng(2).standard_normal(dim)))
    at = lambda t: value + t * grad @ ravel_pytree(direction)[0] + 0.5 * t**2 * (  # noqa: E731
        ravel_pytree(direction)[0] @ h @ ravel_pytree(direction)[0])
    curve = landscape.surface_1d(loss_fn, params, direction, num=5, span=(-1.0, 1.0))
    np.testing.assert_allclose(curve.loss, [at(t) for t in curve.t], rtol=1e-11)
    assert curve.accuracy is None
    plane = landscape.surface_2d(loss_fn, params, direction, direction, num=(3, 2), batch_size=4)
    np.testing.assert_allclose(plane.loss, [[at(xx + yy) for xx in plane.x] for yy in plane.y], rtol=1e-11)
    line = landscape.interpolate(loss_fn, params, jax.tree.map(jnp.add, params, direction), num=4)
    np.testing.assert_allclose(line.loss, [at(t) for t in line.t], rtol=1e-11)


def test_a_function_giving_the_batch_mean_is_evaluated_per_example(x64):
    """A scalar-mean `fn(params, batch)` (the usual way to write a loss) is vmapped over examples, so the
    padded examples of the last microbatch are masked out: the value is the mean over the 23 examples."""
    x, y, rng = _data()
    w = jnp.asarray(rng.standard_normal((D, K)))
    mean_loss = lambda p, batch: jnp.mean(squared_error(batch[0] @ p, batch[1]))  # noqa: E731
    loss_fn = make_loss_fn(mean_loss, None, x, y, batch_size=BATCH)
    assert loss_fn.num_batches == 3 and loss_fn.info == {"subset": f"{N} examples", "n": N, "batch_size": BATCH}
    assert float(loss_fn(w)) == pytest.approx(float(mean_loss(w, (x, y))), rel=1e-13)
    _, grads = driver.value_and_grad(loss_fn, w)
    np.testing.assert_allclose(grads, jax.grad(mean_loss)(w, (x, y)), rtol=1e-12)


def test_an_nnx_model_with_batchnorm_in_eval_and_train_mode(x64):
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(D, 4, param_dtype=jnp.float64, rngs=rngs)
            self.norm = nnx.BatchNorm(4, param_dtype=jnp.float64, rngs=rngs)
            self.out = nnx.Linear(4, 3, param_dtype=jnp.float64, rngs=rngs)

        def __call__(self, x):
            return self.out(jnp.tanh(self.norm(self.dense(x))))

    x, _, rng = _data()
    labels = rng.integers(0, 3, N)
    model = Net(nnx.Rngs(0))
    # float64 statistics (flax creates them in float32 whatever the dtypes, and a float64 train-mode update
    # of a float32 statistic is a dtype warning).
    model.norm.mean = nnx.BatchStat(jnp.asarray(rng.standard_normal(4)))
    model.norm.var = nnx.BatchStat(jnp.asarray(1 + rng.random(4)))
    stored = np.asarray(model.norm.mean[...])
    params = nnx.state(model, nnx.Param)

    def reference(train):
        copy = nnx.clone(model)
        copy.train() if train else copy.eval()
        logits = copy(jnp.asarray(x))
        return float(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels)))

    evaluated = make_loss_fn(model, None, x, labels, batch_size=N)
    assert float(evaluated(params)) == pytest.approx(reference(False), rel=1e-12)
    assert 0 <= float(evaluated.accuracy(params)) <= 1
    assert float(make_loss_fn(model, None, x, labels, batch_size=N, bn="train")(params)) == pytest.approx(
        reference(True), rel=1e-12)
    # The user's model is untouched: its statistics and its mode.
    np.testing.assert_array_equal(model.norm.mean[...], stored)
    assert not model.norm.use_running_average
    top = hessian.top_eigenvalues(evaluated, params, jax.random.key(0), k=1)
    assert top.converged and top.eigenvalues[0] > 0


def test_the_default_loss_refuses_one_hot_labels_and_names_the_loss_that_takes_them(x64):
    model, variables, images, labels = _tiny_model_data(n=12)
    one_hot = np.eye(3)[labels]
    with pytest.raises(ValueError, match=r"takes class indices of shape \(12,\); got float64 targets of shape "
                                         r"\(12, 3\): pass integer labels .*loss=optax.softmax_cross_entropy"):  # fmt: skip
        make_loss_fn(model, variables, images, one_hot)
    soft = make_loss_fn(model, variables, images, one_hot, loss=optax.softmax_cross_entropy)
    hard = make_loss_fn(model, variables, images, labels)
    assert float(soft(variables["params"])) == pytest.approx(float(hard(variables["params"])), rel=1e-12)


def test_a_printed_result_shows_its_numbers_and_summarizes_arrays_by_shape():
    w = {"a": jnp.ones((30, 20)), "b": jnp.ones(20)}
    top = hessian.top_eigenvalues(lambda p: 0.5 * jnp.sum(p["a"] ** 2) + jnp.sum(p["b"] ** 4), w, jax.random.key(0),
                                  k=2, iters=10)  # fmt: skip
    text = repr(top)
    assert text.startswith("EigenResult(eigenvalues=[12.") and "eigenvectors=<pytree of 2 arrays, 1,240 numbers>" in text
    assert "converged=True" in text and "history=<float" in text and len(text) < 400


def test_make_loss_fn_says_what_each_kind_of_model_needs():
    x, y, _ = _data()
    with pytest.raises(ValueError, match="bn='train' needs a module with a `train` argument"):
        make_loss_fn(LinenLinear(), {"params": {}}, x, y, bn="train")
    with pytest.raises(ValueError, match="an NNX module holds its own variables"):
        make_loss_fn(nnx.Linear(D, K, rngs=nnx.Rngs(0)), {"params": {}}, x, y)
    with pytest.raises(ValueError, match="preprocess applies to a model's inputs"):
        make_loss_fn(lambda p, b: 0.0, batch=(x, y), preprocess=jnp.tanh)
    with pytest.raises(ValueError, match="a linen module needs its variables"):
        make_loss_fn(LinenLinear(), None, x, y)
    with pytest.raises(ValueError, match="same number of examples"):
        make_loss_fn(lambda p, b: 0.0, batch=(x, y[:5]))


# --------------------------------------------------------------------------- compiled once


@contextlib.contextmanager
def _programs():
    """Counts the programs JAX lowers and XLA compiles inside the block: yields [lowered, compiled]."""
    counts = [0, 0]

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
            counts[0] += 1
        elif event == "/jax/core/compile/backend_compile_duration":
            counts[1] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def _every_measure(loss_fn, params, state):
    key = jax.random.key(0)
    d1 = landscape.random_direction(jax.random.key(1), params)
    return [
        sharpness.worst_case_sharpness(loss_fn, params, 0.1, key, steps=3).value,
        sharpness.worst_case_sharpness(loss_fn, params, 0.1, key, steps=3, m=8).value,
        sharpness.average_case_sharpness(loss_fn, params, 0.01, key, n=4).value,
        sharpness.first_order_sharpness(loss_fn, params, 0.1).value,
        hessian.top_eigenvalues(loss_fn, params, key, k=2, iters=4).eigenvalues[0],
        hessian.top_eigenvalues(loss_fn, params, key, k=1, method="power", iters=3).eigenvalues[0],
        hessian.top_eigenvalues(loss_fn, params, key, k=2, method="restarted", iters=12).eigenvalues[0],
        hessian.hessian_trace(loss_fn, params, key, n=4, batch_size=2).trace,
        hessian.spectral_density(loss_fn, params, key, order=3, n_probes=2).moment(1),
        hessian.preconditioned_top_eigenvalue(loss_fn, params, state, key, iters=3).eigenvalue,
        hessian.preconditioned_top_eigenvalue(loss_fn, params, state, key, iters=6, method="restarted").eigenvalue,
        landscape.interpolate(loss_fn, params, jax.tree.map(jnp.add, params, d1), num=3).loss[1],
        landscape.surface_2d(loss_fn, params, d1, d1, num=(2, 2), batch_size=3).loss[0, 0],
    ]


@pytest.mark.parametrize("host", [True, False], ids=["host", "compiled"])
def test_a_second_call_on_new_data_and_parameters_compiles_nothing(host):
    """Every measure, twice: on other examples, labels, parameters and BatchNorm statistics of the same
    shapes the second time. Nothing is lowered or compiled again, on either path."""
    model, variables, images, labels = _tiny_model_data(n=20, seed=0)
    _, other, other_images, other_labels = _tiny_model_data(n=20, seed=1)
    tx = optax.adam(1e-2)
    with driver.loops_on_host(host):
        first = make_loss_fn(model, variables, images, labels, batch_size=8, subset="first")
        state = tx.update(jax.grad(first)(variables["params"]), tx.init(variables["params"]))[1]
        with _programs() as first_counts:
            before = _every_measure(first, variables["params"], state)
        second = make_loss_fn(model, other, other_images, other_labels, batch_size=8, subset="second")
        with _programs() as counts:
            after = _every_measure(second, other["params"], state)
    assert first_counts[0] > 0  # the listener hears this JAX's compilations
    assert counts == [0, 0]
    assert all(np.isfinite(before)) and all(np.isfinite(after)) and not np.allclose(before, after)


def _lowered_text(n: int, loop, inputs_of, static, steps):
    model, variables, images, labels = _tiny_model_data(n=n)
    loss_fn = make_loss_fn(model, variables, images, labels, batch_size=8)
    params = variables["params"]
    lowered = driver._run_compiled.lower(loop, steps, static, False, loss_fn, params, inputs_of(params), None)
    return lowered.as_text()


def test_the_compiled_program_does_not_grow_with_the_number_of_examples():
    """The examples are arguments: 16 or 1,600 of them give the same program up to the loop's trip count
    and the arguments' shapes (the digits), where a loss closing over its data would embed them."""
    key = jax.random.key(0)

    def ascent(params):
        return sharpness._ascent_setup(params, 0.1, "l2", False, 3, None, key)

    texts = [_lowered_text(n, sharpness.ASCENT, ascent, ("l2",), 3) for n in (16, 1600)]
    assert re.sub(r"\d+", "", texts[0]) == re.sub(r"\d+", "", texts[1])
    assert abs(len(texts[1]) - len(texts[0])) < 0.01 * len(texts[0])  # only the shapes' digits differ
    # For contrast: the same gradient with the data closed over grows with them.
    model, variables, _, _ = _tiny_model_data(n=16)
    sizes = []
    for n in (16, 1600):
        _, _, images, labels = _tiny_model_data(n=n)

        def closed(p, images=images, labels=labels):
            logits = model.apply({**variables, "params": p}, images)
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

        sizes.append(len(jax.jit(jax.grad(closed)).lower(variables["params"]).as_text()))
    assert sizes[1] > 10 * sizes[0]


def test_a_loss_is_a_pytree_of_its_data():
    model, variables, images, labels = _tiny_model_data(n=20)
    loss_fn = make_loss_fn(model, variables, images, labels, batch_size=8, subset="train[:20]")
    leaves, treedef = jax.tree.flatten(loss_fn)
    # images, labels (3 microbatches of 8), mask, count, the BatchNorm statistics
    assert [x.shape for x in leaves[:4]] == [(3, 8, 2, 2, 3), (3, 8), (3, 8), ()]
    rebuilt = jax.tree.unflatten(treedef, leaves)
    assert isinstance(rebuilt, LossFunction) and rebuilt.info["subset"] == "train[:20]"
    # Another subset name or N with the same shapes is the same tree structure: same programs.
    other = make_loss_fn(model, variables, images[:17], labels[:17], batch_size=8, subset="other")
    assert jax.tree.structure(other) == treedef
    assert jax.jit(lambda f, p: f(p))(loss_fn, variables["params"]) == pytest.approx(float(loss_fn(variables["params"])))
    assert from_function(loss_fn) is loss_fn
    assert isinstance(model, _Tiny)


def test_the_library_layer_imports_only_jax_optax_numpy_and_flax_in_its_adapters():
    """jaxsam.geometry never imports the application (train, data, plots, ml_collections); flax only in
    the adapters (linen/NNX kernels, BatchNorm recalibration)."""
    import ast
    import pathlib
    import sys

    root = pathlib.Path(__file__).resolve().parents[1] / "jaxsam" / "geometry"
    allowed = {"jax", "optax", "numpy", "jaxsam"} | set(sys.stdlib_module_names)
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top == "flax":
                    assert path.name in ("adapters.py", "recalibration.py"), (path.name, name)
                    continue
                assert top in allowed, (path.name, name)
                assert top != "jaxsam" or name.startswith("jaxsam.geometry"), (path.name, name)
