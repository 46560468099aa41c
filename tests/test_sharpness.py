"""Sharpness measures against exact answers (float64): trust-region maxima, Gaussian expectations, invariances."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import chex
import pytest

from jaxsam.geometry import driver
from jaxsam.geometry.hessian import top_eigenvalues
from jaxsam.geometry.loss import make_loss_fn
from jaxsam.geometry.sharpness import average_case_sharpness, first_order_sharpness, worst_case_sharpness

EIGENVALUES = np.array([5.0, 3.0, 1.0, 0.5, -0.5, -2.0])
KEY = jax.random.key(0)  # the ascent's tiny random start


def _quadratic(seed=0, eigenvalues=EIGENVALUES):
    """(A, b, loss) with L(w) = ½wᵀAw + bᵀw and A's spectrum given."""
    rng = np.random.RandomState(seed)
    q, _ = np.linalg.qr(rng.randn(len(eigenvalues), len(eigenvalues)))
    a = q @ np.diag(eigenvalues) @ q.T
    b = rng.randn(len(eigenvalues))
    return a, b, lambda w: 0.5 * w @ jnp.asarray(a) @ w + jnp.asarray(b) @ w


def _trust_region_max(a, g, rho):
    """max_{‖ε‖ ≤ ρ} gᵀε + ½εᵀAε exactly: ε = (μI − A)⁻¹g on the sphere, μ > λmax by bisection."""
    lam, q = np.linalg.eigh(a)
    gamma = q.T @ g
    size = lambda mu: np.sqrt(np.sum(gamma**2 / (mu - lam) ** 2))  # noqa: E731
    lo, hi = lam[-1] + 1e-12, lam[-1] + np.linalg.norm(g) / rho + 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if size(mid) > rho else (lo, mid)
    eps = q @ (gamma / (0.5 * (lo + hi) - lam))
    return g @ eps + 0.5 * eps @ a @ eps


@pytest.mark.parametrize("rho", [0.05, 0.3, 1.0])
def test_l2_worst_case_matches_the_exact_trust_region_maximum(x64, rho):
    a, b, loss = _quadratic()
    w = jnp.asarray(np.random.RandomState(1).randn(6))
    exact = _trust_region_max(a, np.asarray(a @ w + b), rho)
    result = worst_case_sharpness(loss, w, rho, KEY, steps=100)
    assert result.value == pytest.approx(exact, rel=1e-4)
    assert result.at_boundary and result.delta_norm == pytest.approx(rho, rel=1e-9)
    assert result.perturbed_loss - result.loss == pytest.approx(result.value)
    # The curve is the best value so far: non-decreasing, ending at the value.
    assert np.all(np.diff(result.curve) >= 0) and result.curve[-1] == pytest.approx(result.value)


def test_at_a_minimum_worst_case_is_half_rho_squared_lambda_max(x64):
    a, b, loss = _quadratic()
    w_star = jnp.asarray(np.linalg.solve(a, -b))  # ∇L = 0: only the curvature counts
    for rho in (1e-3, 0.1):
        result = worst_case_sharpness(loss, w_star, rho, KEY, steps=100)
        assert result.value == pytest.approx(0.5 * rho**2 * EIGENVALUES.max(), rel=1e-4)


def test_linf_worst_case_matches_the_separable_box_maximum(x64):
    # Diagonal positive A: each coordinate independently, max = Σ |g_i| ρ + ½ a_i ρ² at a corner.
    diag = np.array([4.0, 2.0, 1.0, 0.25])
    b = np.array([0.3, -1.0, 0.0, 2.0])
    loss = lambda w: 0.5 * jnp.sum(jnp.asarray(diag) * w**2) + jnp.asarray(b) @ w  # noqa: E731
    w = jnp.array([0.5, 0.2, -0.1, 0.0])
    g = diag * np.asarray(w) + b
    rho = 0.2
    result = worst_case_sharpness(loss, w, rho, KEY, norm="linf", steps=30)
    assert result.value == pytest.approx(np.sum(np.abs(g) * rho + 0.5 * diag * rho**2), rel=1e-10)
    assert result.delta_norm == pytest.approx(rho)


def _quartic(x64_a):
    """L(w) = ½wᵀAw + Σw⁴ with A ⪰ 0: minimum at 0, Hessian A there, not a quadratic."""
    return lambda w: 0.5 * w @ jnp.asarray(x64_a) @ w + jnp.sum(w**4)


def test_small_ball_sharpness_is_the_second_order_term_at_a_minimum(x64):
    a, _, _ = _quadratic(eigenvalues=np.array([4.0, 2.0, 1.0, 0.5, 0.1, 0.0]))
    loss = _quartic(a)
    w0 = jnp.zeros(6)
    rho = sigma = 1e-2
    worst = worst_case_sharpness(loss, w0, rho, KEY, steps=100)
    assert worst.value == pytest.approx(0.5 * rho**2 * 4.0, rel=1e-3)  # O(ρ²) correction from w⁴
    average = average_case_sharpness(loss, w0, sigma, jax.random.key(0), n=4000)
    exact = 0.5 * sigma**2 * np.trace(a)
    assert abs(average.value - exact) < 3 * average.standard_error
    assert 0 < average.standard_error < 0.1 * exact


def test_average_case_of_a_quadratic_is_half_sigma_squared_trace(x64):
    a, b, loss = _quadratic()
    w_star = jnp.asarray(np.linalg.solve(a, -b))
    result = average_case_sharpness(loss, w_star, 0.3, jax.random.key(1), n=2000)
    assert abs(result.value - 0.5 * 0.09 * np.trace(a)) < 3 * result.standard_error
    assert result.antithetic and result.samples.shape == (1000,)  # 1,000 pairs ±δ


def test_antithetic_pairs_remove_the_linear_terms_variance(x64):
    """Away from a critical point, L = ½wᵀAw + bᵀw: a pair mean (L(w+δ) + L(w−δ))/2 − L(w) is ½δᵀAδ
    exactly, so the antithetic samples equal those of the quadratic part alone, while plain draws
    carry the linear term's variance σ²‖Aw + b‖²."""
    a, b, _ = _quadratic()
    w = jnp.asarray(np.random.RandomState(3).randn(a.shape[0]))
    with_linear = lambda v: 0.5 * v @ a @ v + b @ v  # noqa: E731
    quadratic_part = lambda v: 0.5 * (v - w) @ a @ (v - w)  # noqa: E731  # the same curvature, zero gradient at w
    sigma, key = 0.1, jax.random.key(2)
    pairs = average_case_sharpness(with_linear, w, sigma, key, n=200)
    curvature = average_case_sharpness(quadratic_part, w, sigma, key, n=200)
    np.testing.assert_allclose(pairs.samples, curvature.samples, rtol=1e-9, atol=1e-12)
    plain = average_case_sharpness(with_linear, w, sigma, key, n=200, antithetic=False)
    assert not plain.antithetic and plain.samples.shape == (200,)
    gradient_norm = float(jnp.linalg.norm(a @ w + b))
    # Plain samples' spread is at least the linear term's, σ‖∇L‖ (up to sampling error).
    assert plain.samples.std() > 0.8 * sigma * gradient_norm > 10 * pairs.samples.std()
    exact = 0.5 * sigma**2 * np.trace(a)
    assert abs(pairs.value - exact) < 4 * pairs.standard_error


def _relu_mlp(params, x):
    return jax.nn.relu(x @ params["w1"]) @ params["w2"]


def _mlp_problem(seed=0):
    rng = np.random.RandomState(seed)
    params = {"w1": jnp.asarray(rng.randn(4, 8) / 2), "w2": jnp.asarray(rng.randn(8, 3) / 3)}
    x, y = jnp.asarray(rng.randn(32, 4)), jnp.asarray(rng.randint(0, 3, 32))

    def loss(p):
        logp = jax.nn.log_softmax(_relu_mlp(p, x))
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], 1))

    return params, loss


def test_worst_case_dominates_average_case_which_is_positive_at_a_minimum(x64):
    a, _, _ = _quadratic(eigenvalues=np.array([4.0, 2.0, 1.0, 0.5, 0.1, 0.0]))
    loss = _quartic(a)
    rho = 0.5
    worst = worst_case_sharpness(loss, jnp.zeros(6), rho, KEY, steps=50)
    # σ = ρ/√d: the Gaussian's mean squared norm is ρ², the ball's radius.
    average = average_case_sharpness(loss, jnp.zeros(6), rho / np.sqrt(6), jax.random.key(0), n=256)
    assert worst.value > average.value + 3 * average.standard_error
    assert average.value - 3 * average.standard_error > 0


def test_worst_case_is_non_decreasing_in_rho(x64):
    params, loss = _mlp_problem()
    values = [worst_case_sharpness(loss, params, rho, KEY, steps=30).value for rho in (0.01, 0.03, 0.1, 0.3, 1.0)]
    assert np.all(np.diff(values) > 0), values


def test_worst_case_says_whether_its_ascent_levelled_off(x64):
    """`converged` is read from the curve: the last quarter of the steps raised the value by <= 0.1%."""
    params, loss = _mlp_problem()
    short, long = (worst_case_sharpness(loss, params, 0.3, KEY, steps=n) for n in (2, 60))
    for r in (short, long):
        q = max(1, len(r.curve) // 4)
        assert r.last_gain == pytest.approx((r.curve[-1] - r.curve[-1 - q]) / r.curve[-1], rel=1e-12)
        assert r.converged == (r.last_gain <= 1e-3)
    assert long.converged and not short.converged and long.value >= short.value
    # The maximizing perturbation comes back (kept out of the JSON record): L(w + ε*) is the perturbed loss.
    moved = jax.tree.map(jnp.add, params, long.perturbation)
    assert float(loss(moved)) == pytest.approx(long.perturbed_loss, rel=1e-12)
    assert float(optax.tree.norm(long.perturbation)) == pytest.approx(long.delta_norm, rel=1e-12)
    assert "perturbation" not in long.to_dict() and long.to_dict()["converged"] is True


def test_adaptive_sharpness_is_invariant_to_relu_rescaling_and_plain_is_not(x64):
    params, loss = _mlp_problem()
    alpha = 5.0
    rescaled = {"w1": alpha * params["w1"], "w2": params["w2"] / alpha}
    assert loss(rescaled) == pytest.approx(float(loss(params)), rel=1e-12)  # same function
    for norm, rho in (("l2", 0.1), ("linf", 0.01)):
        original = worst_case_sharpness(loss, params, rho, KEY, norm=norm, adaptive=True, steps=20)
        scaled = worst_case_sharpness(loss, rescaled, rho, KEY, norm=norm, adaptive=True, steps=20)
        assert scaled.value == pytest.approx(original.value, rel=1e-8)
    plain = worst_case_sharpness(loss, params, 0.1, KEY, steps=20).value
    plain_rescaled = worst_case_sharpness(loss, rescaled, 0.1, KEY, steps=20).value
    assert abs(plain_rescaled - plain) > 0.1 * plain
    # The raw top Hessian eigenvalue is not invariant either (exact: 56 Lanczos steps on 56 parameters).
    lam = top_eigenvalues(loss, params, jax.random.key(0), iters=56).eigenvalues[0]
    lam_rescaled = top_eigenvalues(loss, rescaled, jax.random.key(0), iters=56).eigenvalues[0]
    assert abs(lam_rescaled - lam) > 0.5 * lam
    average = average_case_sharpness(loss, params, 0.05, jax.random.key(0), n=16, adaptive=True)
    average_rescaled = average_case_sharpness(loss, rescaled, 0.05, jax.random.key(0), n=16, adaptive=True)
    np.testing.assert_allclose(average_rescaled.samples, average.samples, rtol=1e-8, atol=1e-14)


def test_mask_leaves_entries_unperturbed(x64):
    loss = lambda p: 0.5 * (10.0 * p["a"] ** 2 + p["b"] ** 2)  # noqa: E731
    params = {"a": jnp.zeros([]), "b": jnp.zeros([])}
    full = worst_case_sharpness(loss, params, 0.1, KEY, steps=50)
    masked = worst_case_sharpness(loss, params, 0.1, KEY, steps=50, mask={"a": False, "b": True})
    assert full.value == pytest.approx(0.5 * 0.01 * 10.0, rel=1e-6)
    assert masked.value == pytest.approx(0.5 * 0.01 * 1.0, rel=1e-6)


def test_first_order_proxy_is_rho_times_the_gradient_norm(x64):
    params, loss = _mlp_problem()
    grads = jax.grad(loss)(params)
    norm = np.sqrt(sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(grads)))
    result = first_order_sharpness(loss, params, 0.05)
    assert result.value == pytest.approx(0.05 * norm, rel=1e-12)
    assert "proxy" in result.label
    adaptive = first_order_sharpness(loss, params, 0.05, adaptive=True)
    scaled = np.sqrt(sum(float(jnp.sum((jnp.abs(p) * g) ** 2)) for p, g in zip(jax.tree.leaves(params), jax.tree.leaves(grads))))
    assert adaptive.value == pytest.approx(0.05 * scaled, rel=1e-12)


class _Tiny(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Dense(6)(x.reshape((x.shape[0], -1)))
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(3)(jnp.tanh(x))


def _tiny_model_data(n=20, seed=0):
    rng = np.random.RandomState(seed)
    images = rng.randn(n, 2, 2, 3)
    labels = rng.randint(0, 3, n)
    model = _Tiny()
    variables = model.init(jax.random.key(seed), jnp.asarray(images[:2]))
    variables = {
        "params": variables["params"],
        "batch_stats": jax.tree.map(lambda v: v + 0.3 * jnp.asarray(rng.rand(*v.shape)), variables["batch_stats"]),
    }
    variables = jax.tree.map(lambda v: jnp.asarray(v, jnp.result_type(float)), variables)  # float64 under x64
    return model, variables, images, labels


def test_loss_fn_is_the_exact_mean_over_the_subset_whatever_the_microbatch(x64):
    model, variables, images, labels = _tiny_model_data(n=23)
    logits = model.apply(variables, jnp.asarray(images), train=False)
    expected = -np.mean(np.asarray(jax.nn.log_softmax(logits))[np.arange(23), labels])
    accuracy = np.mean(np.argmax(np.asarray(logits), -1) == labels)
    for batch_size in (1, 5, 23, 64):
        loss_fn = make_loss_fn(model, variables, images, labels, batch_size=batch_size, subset="test")
        assert float(loss_fn(variables["params"])) == pytest.approx(expected, rel=1e-12)
        assert float(loss_fn.accuracy(variables["params"])) == pytest.approx(accuracy, rel=1e-12)
        assert loss_fn.info == {"subset": "test", "n": 23, "batch_size": min(batch_size, 23), "bn": "eval"}


def test_loss_fn_train_mode_uses_each_microbatch_statistics(x64):
    model, variables, images, labels = _tiny_model_data(n=20)
    loss_fn = make_loss_fn(model, variables, images, labels, batch_size=10, bn="train")
    halves = []
    for part in (slice(0, 10), slice(10, 20)):
        logits, _ = model.apply(variables, jnp.asarray(images[part]), train=True, mutable=["batch_stats"])
        halves.append(-np.sum(np.asarray(jax.nn.log_softmax(logits))[np.arange(10), labels[part]]))
    assert float(loss_fn(variables["params"])) == pytest.approx(sum(halves) / 20, rel=1e-12)


def test_train_mode_loss_is_the_per_microbatch_loss_and_refuses_padded_microbatches(x64):
    """bn="train": each microbatch's own statistics from its real rows; a microbatch size that does not divide N
    (whose padding rows would enter the last microbatch's statistics) is refused with the sizes that do."""
    model, variables, images, labels = _tiny_model_data(n=30)
    params = variables["params"]

    def by_hand(p, size):  # the mean over N of each microbatch's train-mode losses, written out
        total = 0.0
        for start in range(0, 30, size):
            logits, _ = model.apply({"params": p, "batch_stats": variables["batch_stats"]},
                                    jnp.asarray(images[start : start + size]), train=True, mutable=["batch_stats"])  # fmt: skip
            total = total - jnp.sum(jax.nn.log_softmax(logits)[jnp.arange(size), labels[start : start + size]])
        return total / 30

    for size in (6, 10, 15):
        loss_fn = make_loss_fn(model, variables, images, labels, batch_size=size, bn="train")
        value, grad = driver.value_and_grad(loss_fn, params)
        assert float(value) == pytest.approx(float(by_hand(params, size)), rel=1e-12)
        chex.assert_trees_all_close(grad, jax.grad(by_hand)(params, size), rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match=r"batch_size=8 must divide the 30 examples .*use batch_size=6 or 5, "
                                         r"or the first 24 examples"):  # fmt: skip
        make_loss_fn(model, variables, images, labels, batch_size=8, bn="train")
    with pytest.raises(ValueError, match="m=4 must divide the 30 examples"):
        make_loss_fn(model, variables, images, labels, batch_size=10, bn="train").chunked(4)
    # Eval mode pads and masks any N exactly (the statistics are the running ones).
    assert float(make_loss_fn(model, variables, images, labels, batch_size=8)(params)) == pytest.approx(
        float(make_loss_fn(model, variables, images, labels, batch_size=30)(params)), rel=1e-12)


def test_loss_fn_preprocesses_inputs_only_when_asked():
    """uint8 pixels reach the model as they are unless a preprocessing function is given (CIFAR: data.normalize)."""
    from jaxsam import data

    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, (6, 2, 2, 3)).astype(np.uint8)
    model, variables, _, labels = _tiny_model_data(n=6)
    normalized = make_loss_fn(model, variables, images, labels, batch_size=4, preprocess=data.normalize)
    float_fn = make_loss_fn(model, variables, np.asarray(data.normalize(images)), labels, batch_size=4)
    assert float(normalized(variables["params"])) == float(float_fn(variables["params"]))
    raw = make_loss_fn(model, variables, images, labels, batch_size=4)
    assert raw.batches[0].dtype == np.uint8  # kept as given
    as_floats = make_loss_fn(model, variables, images.astype(np.float32), labels, batch_size=4)
    assert float(raw(variables["params"])) == float(as_floats(variables["params"]))  # the model saw 0..255


def test_m_sharpness_averages_the_per_chunk_ascents(x64):
    model, variables, images, labels = _tiny_model_data(n=20)
    params = variables["params"]
    loss_fn = make_loss_fn(model, variables, images, labels, batch_size=8)
    chunked = worst_case_sharpness(loss_fn, params, 0.1, KEY, steps=10, m=10)
    separately = [
        worst_case_sharpness(make_loss_fn(model, variables, images[s], labels[s]), params, 0.1, KEY, steps=10).value
        for s in (slice(0, 10), slice(10, 20))
    ]
    np.testing.assert_allclose(chunked.values, separately, rtol=1e-10)
    assert chunked.value == pytest.approx(np.mean(separately), rel=1e-10)
    assert chunked.standard_error == pytest.approx(np.std(separately, ddof=1) / np.sqrt(2), rel=1e-8)
    whole = worst_case_sharpness(loss_fn, params, 0.1, KEY, steps=10, m=20)
    assert whole.value == pytest.approx(worst_case_sharpness(loss_fn, params, 0.1, KEY, steps=10).value, rel=1e-10)


def test_results_are_json_with_the_loss_description(x64):
    model, variables, images, labels = _tiny_model_data(n=8)
    loss_fn = make_loss_fn(model, variables, images, labels, batch_size=4, subset="train[:8]")
    params = variables["params"]
    for result in (
        worst_case_sharpness(loss_fn, params, 0.05, KEY, steps=3),
        average_case_sharpness(loss_fn, params, 0.01, jax.random.key(0), n=4),
        first_order_sharpness(loss_fn, params, 0.05),
    ):
        record = json.loads(json.dumps(result.to_dict()))
        assert record["loss_info"]["subset"] == "train[:8]"
        assert isinstance(record["value"], float)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda loss, p: worst_case_sharpness(loss, p, -0.1, KEY), "rho must be > 0"),
        (lambda loss, p: worst_case_sharpness(loss, p, 0.1, KEY, norm="l1"), "unknown norm"),
        (lambda loss, p: worst_case_sharpness(loss, p, 0.1, KEY, steps=0), "steps must be >= 1"),
        (lambda loss, p: worst_case_sharpness(loss, p, 0.1, KEY, m=4), "m-sharpness needs a loss built by make_loss_fn"),
        (lambda loss, p: average_case_sharpness(loss, p, 0.0, jax.random.key(0)), "sigma must be > 0"),
        (lambda loss, p: average_case_sharpness(loss, p, 0.1, jax.random.key(0), n=5), "n must be even and >= 4"),
        (lambda loss, p: average_case_sharpness(loss, p, 0.1, jax.random.key(0), n=1, antithetic=False),
         "n must be >= 2"),
    ],
)
def test_bad_arguments_say_what_to_use(call, message):
    with pytest.raises(ValueError, match=message):
        call(lambda p: jnp.sum(p**2), jnp.ones(3))


def test_make_loss_fn_rejects_bad_input():
    model, variables, images, labels = _tiny_model_data(n=4)
    with pytest.raises(ValueError, match="unknown BatchNorm mode"):
        make_loss_fn(model, variables, images, labels, bn="batch")
    with pytest.raises(ValueError, match="as many labels as images"):
        make_loss_fn(model, variables, images, labels[:3])
