"""Loss-landscape views: interpolation, filter-normalized directions, slices, surfaces, BN recalibration."""

from __future__ import annotations

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsam.geometry import landscape
from jaxsam.geometry import loss as loss_lib
from jaxsam.geometry import recalibration

TIGHT = 1e-12  # float64: the same arithmetic inside and outside jit/lax.map


def _toy_loss(seed=0):
    """(params, loss_fn) of a two-layer ReLU network on random data (numpy draws: no XLA RNG compiles)."""
    params, loss = _relu_net(seed)
    return params, loss_lib.from_function(loss, subset="toy")


def _axpy(w, terms):
    """w + Σ c d, leaf by leaf (the reference)."""
    out = w
    for c, d in terms:
        out = jax.tree.map(lambda a, b: a + c * b, out, d)
    return out


def _reference(loss_fn, params, *directions):
    """coefficients -> L(w + Σ c_i d_i), one direct evaluation per call (jitted once: XLA:CPU
    compiles every eager op separately, which costs seconds)."""
    evaluate = jax.jit(lambda cs: loss_fn(_axpy(params, list(zip(cs, directions)))))
    return lambda *cs: float(evaluate(jnp.asarray(cs, jnp.float64)))


# --------------------------------------------------------------------------- interpolation


def test_interpolate_ends_are_the_two_networks_and_every_point_is_the_formula(x64):
    params_a, loss_fn = _toy_loss()
    params_b, _ = _relu_net(7)
    result = landscape.interpolate(loss_fn, params_a, params_b, num=25, t_range=(-0.5, 1.5))

    assert result.t.shape == result.loss.shape == (25,)
    assert result.kind == "interpolation" and result.accuracy is None  # from_function has no accuracy
    assert result.loss_info == {"subset": "toy"} and result.recalibrated is False
    (i0,) = np.flatnonzero(result.t == 0.0)
    (i1,) = np.flatnonzero(result.t == 1.0)
    loss_jit = jax.jit(lambda p: loss_fn(p))  # LossFunction holds a dict: not hashable
    assert abs(result.loss[i0] - float(loss_jit(params_a))) <= TIGHT
    assert abs(result.loss[i1] - float(loss_jit(params_b))) <= TIGHT
    along = jax.jit(lambda t: loss_fn(jax.tree.map(lambda a, b: (1 - t) * a + t * b, params_a, params_b)))
    expected = [float(along(t)) for t in result.t]
    np.testing.assert_allclose(result.loss, expected, rtol=0, atol=TIGHT)
    diff = jax.tree.map(lambda a, b: b - a, params_a, params_b)
    expected_norm = np.sqrt(sum(float(jnp.sum(x**2)) for x in jax.tree.leaves(diff)))
    assert result.direction_norm == pytest.approx(expected_norm, rel=1e-12)
    assert json.loads(json.dumps(result.to_dict()))["t"][i1] == 1.0


def test_interpolate_reports_accuracy_of_a_loss_function(x64, bn_problem):
    model, variables, images, labels, _ = bn_problem
    loss_fn = loss_lib.make_loss_fn(model, variables, images, labels, batch_size=8)
    params_b = jax.tree.map(lambda w: 1.5 * w, variables["params"])
    result = landscape.interpolate(loss_fn, variables["params"], params_b, num=4, t_range=(0, 1), batch_size=2)
    assert result.accuracy.shape == (4,)
    sums = jax.jit(loss_fn.per_example_sums)
    for i, params in ((0, variables["params"]), (3, params_b)):
        loss_sum, correct = sums(params)
        assert result.loss[i] == pytest.approx(float(loss_sum) / 12, abs=TIGHT)
        assert result.accuracy[i] == float(correct) / 12


# --------------------------------------------------------------------------- directions


def _layered_params(seed):
    rng = np.random.default_rng(seed)
    return {
        "conv": {"kernel": rng.normal(size=(3, 3, 2, 4)), "bias": rng.normal(size=(4,))},
        "bn": {"scale": 1 + 0.1 * rng.normal(size=(4,)), "bias": rng.normal(size=(4,))},
        "dense": {"kernel": rng.normal(size=(6, 5)), "bias": rng.normal(size=(5,))},
    }


def test_filter_normalized_direction_matches_every_filter_norm(x64):
    params = _layered_params(0)
    params["dense"]["kernel"][:, 2] = 0.0  # a dead neuron
    direction = landscape.random_direction(jax.random.key(1), params)

    for name, n_out in (("conv", 4), ("dense", 5)):
        w, d = np.asarray(params[name]["kernel"]), np.asarray(direction[name]["kernel"])
        for o in range(n_out):  # the last axis is the output feature (HWIO, (in, out))
            np.testing.assert_allclose(np.linalg.norm(d[..., o]), np.linalg.norm(w[..., o]), rtol=1e-12, atol=0)
    assert np.all(np.asarray(direction["dense"]["kernel"][:, 2]) == 0.0)  # zero filter -> zero, not NaN
    for layer, name in (("conv", "bias"), ("bn", "scale"), ("bn", "bias"), ("dense", "bias")):
        assert np.all(np.asarray(direction[layer][name]) == 0.0)

    again = landscape.random_direction(jax.random.key(1), params)
    other = landscape.random_direction(jax.random.key(2), params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(direction), jax.tree.leaves(again)))
    assert not np.allclose(direction["conv"]["kernel"], other["conv"]["kernel"])


def test_layer_normalization_and_kept_biases(x64):
    params = _layered_params(0)
    layer = landscape.random_direction(jax.random.key(1), params, normalization="layer", ignore="random")
    for w, d in zip(jax.tree.leaves(params), jax.tree.leaves(layer)):  # every tensor, 1-D included, as a whole
        assert float(jnp.linalg.norm(d)) == pytest.approx(float(jnp.linalg.norm(w)), rel=1e-12)
    kept = landscape.random_direction(jax.random.key(1), params, normalization="filter", ignore="random")
    want = np.linalg.norm(params["bn"]["scale"])
    assert float(jnp.linalg.norm(kept["bn"]["scale"])) == pytest.approx(want, rel=1e-12)
    raw = landscape.random_direction(jax.random.key(1), params, normalization="none", ignore="random")
    # The same Gaussian draw underneath: normalization only rescales it.
    ratio = np.asarray(layer["conv"]["kernel"]) / np.asarray(raw["conv"]["kernel"])
    np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-12)
    with pytest.raises(ValueError, match="normalization"):
        landscape.random_direction(jax.random.key(0), params, normalization="batch")
    # ignore="none" means what it means in Li et al.'s code: a 1-D parameter's direction is the parameter.
    li = landscape.random_direction(jax.random.key(1), params, ignore="none")
    np.testing.assert_array_equal(li["bn"]["scale"], params["bn"]["scale"])
    np.testing.assert_array_equal(li["conv"]["kernel"], kept["conv"]["kernel"])  # kernels as before


def test_an_all_zero_direction_is_an_error_that_names_the_fix(x64):
    biases_only = {"b": jnp.ones(3), "scale": jnp.ones(2)}
    with pytest.raises(ValueError, match=r"all zeros.*pass ignore='none' or 'random'"):
        landscape.random_direction(jax.random.key(0), biases_only)
    assert float(jnp.sum(landscape.random_direction(jax.random.key(0), biases_only, ignore="random")["b"] ** 2)) > 0


def test_flax_batchnorm_parameters_get_zero_direction(x64, bn_problem):
    _, variables, *_ = bn_problem
    direction = landscape.random_direction(jax.random.key(0), variables["params"])
    for name in ("BatchNorm_0", "BatchNorm_1"):
        assert all(np.all(np.asarray(leaf) == 0) for leaf in jax.tree.leaves(direction[name]))
    w, d = np.asarray(variables["params"]["Conv_0"]["kernel"]), np.asarray(direction["Conv_0"]["kernel"])
    filter_norms = lambda a: np.linalg.norm(a.reshape(-1, a.shape[-1]), axis=0)  # noqa: E731
    np.testing.assert_allclose(filter_norms(d), filter_norms(w), rtol=1e-12)


# --------------------------------------------------------------------------- scale invariance


def _relu_net(seed, n_in=5, hidden=8, n_out=3, n=32):
    rng = np.random.default_rng(seed)
    params = {
        "l1": {"kernel": rng.normal(size=(n_in, hidden)) / np.sqrt(n_in), "bias": 0.3 * rng.normal(size=(hidden,))},
        "l2": {"kernel": rng.normal(size=(hidden, n_out)) / np.sqrt(hidden), "bias": 0.3 * rng.normal(size=(n_out,))},
    }
    x, y = rng.normal(size=(n, n_in)), rng.integers(0, n_out, size=n)

    def loss(p):  # f(x) = W2 relu(W1 x + b1) + b2
        logits = jax.nn.relu(x @ p["l1"]["kernel"] + p["l1"]["bias"]) @ p["l2"]["kernel"] + p["l2"]["bias"]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    return params, loss


def _rescale(params, alpha):
    """(W1, b1, W2, b2) -> (αW1, αb1, W2/α, b2): the same function for α > 0."""
    return {
        "l1": {"kernel": alpha * params["l1"]["kernel"], "bias": alpha * params["l1"]["bias"]},
        "l2": {"kernel": params["l2"]["kernel"] / alpha, "bias": params["l2"]["bias"]},
    }


def _slice(loss, params, key, **normalization):
    direction = landscape.random_direction(key, params, **normalization)
    return landscape.surface_1d(loss, params, direction, num=21, span=(-1, 1)).loss


@pytest.mark.parametrize("alpha, options", [(3.0, {}), (10.0, {"ignore": "none"})])
def test_filter_normalized_slice_is_invariant_to_relu_rescaling(x64, alpha, options):
    params, loss = _relu_net(0)
    rescaled = _rescale(params, alpha)
    assert float(loss(rescaled)) == pytest.approx(float(loss(params)), abs=1e-12)  # same function
    key = jax.random.key(1)
    curve = _slice(loss, params, key, **options)
    np.testing.assert_allclose(_slice(loss, rescaled, key, **options), curve, rtol=0, atol=1e-10)
    assert np.ptp(curve) > 0.05  # the direction does move the loss


def test_unnormalized_slice_sees_the_rescaled_network_as_different(x64):
    """The control for the invariance test: without normalization the same draw gives another curve."""
    params, loss = _relu_net(0)
    key = jax.random.key(1)
    raw = _slice(loss, params, key, normalization="none")
    raw_rescaled = _slice(loss, _rescale(params, 10.0), key, normalization="none")
    assert np.max(np.abs(raw - raw_rescaled)) > 1e-2


def test_only_filter_normalization_is_invariant_to_per_filter_rescaling(x64):
    """Before a normalization layer each filter's scale is irrelevant (Li et al. 2018's motivation)."""
    params, _ = _relu_net(0)
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(32, 5)), rng.integers(0, 3, size=32)

    def loss(p):  # per-feature standardization over the batch (BatchNorm without eps or affine)
        h = x @ p["l1"]["kernel"]
        h = (h - h.mean(0)) / jnp.sqrt(jnp.mean(jnp.square(h - h.mean(0)), 0))
        logits = jax.nn.relu(h) @ p["l2"]["kernel"] + p["l2"]["bias"]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    alphas = np.geomspace(0.2, 8.0, 8)
    rescaled = {"l1": {**params["l1"], "kernel": params["l1"]["kernel"] * alphas}, "l2": params["l2"]}
    assert float(loss(rescaled)) == pytest.approx(float(loss(params)), abs=1e-12)
    key = jax.random.key(1)
    np.testing.assert_allclose(_slice(loss, rescaled, key), _slice(loss, params, key), rtol=0, atol=1e-10)
    layer = _slice(loss, params, key, normalization="layer")
    layer_rescaled = _slice(loss, rescaled, key, normalization="layer")
    assert np.max(np.abs(layer - layer_rescaled)) > 1e-2


# --------------------------------------------------------------------------- slices and surfaces


def test_surface_1d_centre_and_points(x64):
    params, loss_fn = _toy_loss()
    d = landscape.random_direction(jax.random.key(3), params, ignore="random")
    result = landscape.surface_1d(loss_fn, params, d, num=11, span=(-2, 2), direction_info={"seed": 3})
    assert result.kind == "slice" and result.t[5] == 0.0 and result.direction_info == {"seed": 3}
    reference = _reference(loss_fn, params, d)
    assert abs(result.loss[5] - float(jax.jit(lambda p: loss_fn(p))(params))) <= TIGHT
    for i in (0, 3, 10):
        assert abs(result.loss[i] - reference(result.t[i])) <= TIGHT


def test_surface_2d_grid_centre_and_points(x64):
    params, loss_fn = _toy_loss()
    d1 = landscape.random_direction(jax.random.key(1), params)
    d2 = landscape.random_direction(jax.random.key(2), params)
    result = landscape.surface_2d(loss_fn, params, d1, d2, num=(7, 5), span=((-1, 1), (-0.5, 0.5)))

    assert result.loss.shape == (5, 7) and result.x.shape == (7,) and result.y.shape == (5,)
    assert result.x[3] == 0.0 and result.y[2] == 0.0
    assert abs(result.loss[2, 3] - float(jax.jit(lambda p: loss_fn(p))(params))) <= TIGHT
    reference = _reference(loss_fn, params, d1, d2)
    for i, j in ((0, 0), (4, 6), (1, 5), (3, 0)):
        assert abs(result.loss[i, j] - reference(result.x[j], result.y[i])) <= TIGHT
    chunked = landscape.surface_2d(loss_fn, params, d1, d2, num=(7, 5), span=((-1, 1), (-0.5, 0.5)), batch_size=4)
    np.testing.assert_allclose(chunked.loss, result.loss, rtol=0, atol=TIGHT)  # vmapped chunks of 4 (35 = 8*4 + 3)
    cos = sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree.leaves(d1), jax.tree.leaves(d2)))
    assert result.direction_cosine == pytest.approx(cos / np.prod(result.direction_norms), rel=1e-10)
    loaded = json.loads(json.dumps(result.to_dict()))
    assert np.array(loaded["loss"]).shape == (5, 7) and loaded["kind"] == "surface_2d"


def test_directions_must_match_the_parameters():
    params, loss_fn = _toy_loss()
    with pytest.raises(ValueError, match="structure"):
        landscape.surface_1d(loss_fn, params, {"l1": params["l1"]})
    with pytest.raises(ValueError, match="span"):
        landscape.surface_1d(loss_fn, params, params, span=(1, -1))


# --------------------------------------------------------------------------- BatchNorm recalibration

EPS = 1e-5
MOMENTA = (0.9, 0.6)


class TinyBN(nn.Module):
    """1x1 conv -> BN -> relu -> 1x1 conv -> BN -> relu -> spatial mean -> dense, all float64."""

    @nn.compact
    def __call__(self, x, train=False):
        f64 = {"dtype": jnp.float64, "param_dtype": jnp.float64}
        bn = {"use_running_average": not train, "epsilon": EPS, "force_float32_reductions": False, **f64}
        x = nn.Conv(4, (1, 1), **f64)(x)
        x = nn.relu(nn.BatchNorm(momentum=MOMENTA[0], **bn)(x))
        x = nn.Conv(3, (1, 1), **f64)(x)
        x = nn.relu(nn.BatchNorm(momentum=MOMENTA[1], **bn)(x))
        return nn.Dense(2, **f64)(x.mean(axis=(1, 2)))


@pytest.fixture
def bn_problem(x64):
    """(model, variables, images, labels, calibration images), float64, running stats as at init (0, 1).

    Parameters are drawn with numpy into the shapes of `model.init` (abstract
    evaluation only: compiling flax's initializers costs XLA:CPU seconds).
    """
    model = TinyBN()
    rng = np.random.default_rng(0)
    images = rng.normal(size=(12, 3, 3, 3)) * 2 + 0.5
    labels = rng.integers(0, 2, size=12)
    calib = rng.normal(size=(26, 3, 3, 3)) * 1.5 - 0.3
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            return rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
        if name == "scale":
            return 1 + 0.2 * rng.normal(size=leaf.shape)
        if name == "bias":
            return 0.2 * rng.normal(size=leaf.shape)
        return np.ones(leaf.shape) if name == "var" else np.zeros(leaf.shape)  # running stats as at init

    variables = jax.tree_util.tree_map_with_path(fill, shapes)
    variables = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), variables)
    return model, variables, images, labels, calib


def _hand_batch_stats(params, calib, batch_size, batches):
    """BN statistics by hand (numpy): per batch, train-mode forward; average means and biased variances."""
    p = jax.tree.map(np.asarray, params)
    sums = {name: [0.0, 0.0] for name in ("BatchNorm_0", "BatchNorm_1")}
    all_h1 = []
    for k in range(batches):
        x = calib[k * batch_size : (k + 1) * batch_size]
        h = x @ p["Conv_0"]["kernel"][0, 0] + p["Conv_0"]["bias"]
        all_h1.append(h)
        for name, conv in (("BatchNorm_0", "Conv_1"), ("BatchNorm_1", None)):
            mean, var = h.mean((0, 1, 2)), h.var((0, 1, 2))  # biased: 1/m
            sums[name][0] += mean
            sums[name][1] += var
            h = np.maximum((h - mean) / np.sqrt(var + EPS) * p[name]["scale"] + p[name]["bias"], 0)
            if conv:
                h = h @ p[conv]["kernel"][0, 0] + p[conv]["bias"]
    stats = {name: {"mean": m / batches, "var": v / batches} for name, (m, v) in sums.items()}
    # Equal-size batches: the average of batch means is the mean over all calibration pixels.
    np.testing.assert_allclose(stats["BatchNorm_0"]["mean"], np.concatenate(all_h1).mean((0, 1, 2)), rtol=1e-12)
    return stats


def _perturbed(params):
    direction = landscape.random_direction(jax.random.key(5), params, ignore="random")
    moved = jax.tree.map(lambda w, d: w + 0.8 * d, params, direction)
    moved["Conv_0"]["kernel"] = 3.0 * moved["Conv_0"]["kernel"]
    moved["Conv_0"]["bias"] = moved["Conv_0"]["bias"] + 1.0
    return moved


@pytest.mark.parametrize("batches", [None, 2])
def test_recomputed_batch_stats_are_the_average_of_batch_statistics(bn_problem, batches):
    model, variables, _, _, calib = bn_problem
    stats_fn = recalibration.make_batch_stats_fn(model, variables, calib, batch_size=8, calib_batches=batches)
    used = 3 if batches is None else batches  # 26 images: 3 full batches of 8, the rest dropped
    for params in (variables["params"], _perturbed(variables["params"])):
        got = jax.jit(stats_fn)(params)
        want = _hand_batch_stats(params, calib, 8, used)
        for name in want:
            for stat in ("mean", "var"):
                np.testing.assert_allclose(np.asarray(got[name][stat]), want[name][stat], rtol=1e-12, atol=1e-13)
    assert stats_fn.calib_info == {"calib_n": 8 * used, "calib_batch_size": 8, "calib_batches": used}


def test_recalibrated_loss_uses_fresh_statistics(bn_problem):
    model, variables, images, labels, calib = bn_problem
    recal = recalibration.make_recalibrated_loss_fn(
        model, variables, images, labels, calib, batch_size=5, calib_batch_size=8
    )
    assert recal.info["recalibrated"] is True and recal.info["calib_batches"] == 3 and recal.info["bn"] == "eval"
    recal_sums = jax.jit(recal.per_example_sums)  # (loss sum, correct count): loss and accuracy in one pass
    logits_with = jax.jit(
        lambda params, stats: model.apply({"params": params, "batch_stats": stats}, images, train=False)
    )

    def eval_loss(params, stats):  # eval-mode mean cross-entropy and accuracy, by hand
        logits = np.asarray(logits_with(params, stats))
        top = logits.max(1, keepdims=True)
        logp = logits - top - np.log(np.sum(np.exp(logits - top), 1, keepdims=True))
        return -np.mean(logp[np.arange(12), labels]), np.mean(np.argmax(logits, 1) == labels)

    moved = _perturbed(variables["params"])
    for params in (variables["params"], moved):
        loss_sum, correct = recal_sums(params)
        want_loss, want_accuracy = eval_loss(params, _hand_batch_stats(params, calib, 8, 3))
        assert float(loss_sum) / 12 == pytest.approx(want_loss, abs=TIGHT)
        assert float(correct) / 12 == want_accuracy
    stale_loss, _ = eval_loss(moved, variables["batch_stats"])
    assert abs(float(recal_sums(moved)[0]) / 12 - stale_loss) > 1e-2

    # Unchanged under jit + lax.map (vmapped chunks) inside the landscape measures.
    d = landscape.random_direction(jax.random.key(9), moved)
    curve = landscape.surface_1d(recal, moved, d, num=4, span=(-0.5, 1.0), batch_size=2)  # t = -0.5, 0, 0.5, 1
    assert curve.recalibrated is True and curve.loss_info["recalibrated"] is True
    assert curve.t[1] == 0.0 and curve.loss[1] == pytest.approx(float(recal_sums(moved)[0]) / 12, abs=TIGHT)
    assert curve.loss[3] == pytest.approx(float(recal_sums(_axpy(moved, [(1.0, d)]))[0]) / 12, abs=TIGHT)
    assert curve.accuracy is not None


def test_recalibration_refuses_impossible_requests(bn_problem):
    model, variables, images, labels, calib = bn_problem
    with pytest.raises(ValueError, match="batch_stats"):
        recalibration.make_batch_stats_fn(model, {"params": variables["params"]}, calib, batch_size=8)
    with pytest.raises(ValueError, match="at most 3 batches"):
        recalibration.make_batch_stats_fn(model, variables, calib, batch_size=8, calib_batches=4)
