"""ResNet18 and VGG16: exact parameter counts, shapes and dtypes."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import pytest

import jaxsam
from jaxsam.models import get_model


def _abstract_variables(model, batch=2):
    # eval_shape: full-width networks without allocating or computing anything.
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((batch, 32, 32, 3)), train=False))


# Jitted init/apply: eager op-by-op dispatch of a ResNet costs tens of seconds on CPU.
def _init(model, images):
    return jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), images)


_TINY = {}


def _tiny(name):
    """(images, variables) of a width-1/8 network, initialized once per test module.

    Compiling a ResNet's initializers takes XLA:CPU over ten seconds, so the
    tests share one set of variables per network.
    """
    if name not in _TINY:
        images = 1.0 + jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
        _TINY[name] = images, _init(get_model(name, width=0.125), images)
    return _TINY[name]


def _eval(model, variables, images):
    return jax.jit(functools.partial(model.apply, train=False))(variables, images)


def _train(model, variables, images):
    return jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(variables, images)


def _count(tree):
    return sum(leaf.size for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("name, expected", [("resnet18", 11_173_962), ("vgg16", 14_728_266)])
def test_parameter_count_matches_pytorch_cifar_models(name, expected):
    variables = _abstract_variables(get_model(name))
    assert set(variables) == {"params", "batch_stats"}
    assert _count(variables["params"]) == expected


@pytest.mark.parametrize("name", ["resnet18", "vgg16"])
def test_num_classes_changes_only_the_classifier(name):
    base = _count(_abstract_variables(get_model(name))["params"])
    hundred = _count(_abstract_variables(get_model(name, num_classes=100))["params"])
    assert hundred - base == 90 * 512 + 90  # kernel columns + biases of 90 extra classes


@pytest.mark.parametrize("name, batch_norms", [("resnet18", 20), ("vgg16", 13)])
def test_batch_stats_shapes(name, batch_norms):
    """Every BatchNorm keeps a float32 (C,) mean and var matching its scale."""
    variables = _abstract_variables(get_model(name, width=0.25))
    stats = variables["batch_stats"]
    means = [path for path, _ in jax.tree_util.tree_flatten_with_path(stats)[0] if path[-1].key == "mean"]
    assert len(means) == batch_norms  # resnet18: 17 convs + 3 projection shortcuts
    flat_params = {jax.tree_util.keystr(p[:-1]): v for p, v in jax.tree_util.tree_flatten_with_path(variables["params"])[0] if p[-1].key == "scale"}
    for path, leaf in jax.tree_util.tree_flatten_with_path(stats)[0]:
        (channels,) = leaf.shape
        chex.assert_shape(flat_params[jax.tree_util.keystr(path[:-1])], (channels,))
        assert leaf.dtype == jnp.float32


@pytest.mark.parametrize("name", ["resnet18", "vgg16"])
def test_train_and_eval_logits(name):
    model = get_model(name, width=0.125)
    images, variables = _tiny(name)
    eval_logits = _eval(model, variables, images)
    train_logits, updates = _train(model, variables, images)
    chex.assert_shape([eval_logits, train_logits], (4, 10))
    chex.assert_tree_all_finite((eval_logits, train_logits))
    chex.assert_trees_all_equal_shapes(updates["batch_stats"], variables["batch_stats"])
    # Training mode normalizes with batch statistics and updates the running ones.
    assert not jnp.allclose(eval_logits, train_logits)
    old_means = jax.tree.leaves(variables["batch_stats"])
    new_means = jax.tree.leaves(updates["batch_stats"])
    assert any(not jnp.allclose(a, b) for a, b in zip(old_means, new_means))


def test_running_mean_update_follows_pytorch_momentum():
    """After one training pass from zero, the running mean is 0.1 x the batch mean (PyTorch momentum 0.1)."""
    model = get_model("vgg16", width=0.125)
    images, variables = _tiny("vgg16")
    _, updates = _train(model, variables, images)
    kernel = variables["params"]["Conv_0"]["kernel"]
    bias = variables["params"]["Conv_0"]["bias"]
    pre_bn = jax.lax.conv_general_dilated(
        images, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    ) + bias
    expected = 0.1 * jnp.mean(pre_bn, axis=(0, 1, 2))
    chex.assert_trees_all_close(updates["batch_stats"]["BatchNorm_0"]["mean"], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["resnet18", "vgg16"])
@pytest.mark.parametrize("width, first_channels", [(0.25, 16), (0.5, 32)])
def test_width_multiplier(name, width, first_channels):
    variables = _abstract_variables(get_model(name, width=width))
    first = "Conv_0"
    chex.assert_shape(variables["params"][first]["kernel"], (3, 3, 3, first_channels))
    head = "Dense_0"
    chex.assert_shape(variables["params"][head]["kernel"], (int(512 * width), 10))


@pytest.mark.parametrize("name", ["resnet18", "vgg16"])
def test_bfloat16_compute_keeps_float32_parameters_and_logits(name):
    model = get_model(name, width=0.125, dtype="bfloat16")
    images, variables = _tiny(name)
    # The float32 model's variables serve the bfloat16 one: same structure.
    chex.assert_trees_all_equal_shapes_and_dtypes(
        variables, jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
    )
    for leaf in jax.tree.leaves(variables):
        assert leaf.dtype == jnp.float32
    logits, updates = _train(model, variables, images)
    chex.assert_shape(logits, (4, 10))
    chex.assert_type(logits, jnp.float32)
    for leaf in jax.tree.leaves(updates):
        assert leaf.dtype == jnp.float32
    # The convolutions really ran in bfloat16: the result differs from float32 compute.
    reference = _eval(get_model(name, width=0.125), variables, images)
    inference = _eval(model, variables, images)
    assert not jnp.array_equal(reference, inference)
    chex.assert_trees_all_close(inference, reference, atol=0.1, rtol=0.1)


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="unknown model 'resnet50'.*resnet18, vgg16"):
        get_model("resnet50")


@pytest.mark.parametrize("options, message", [({"width": 0}, "width must be > 0"), ({"dtype": "float31"}, "unknown model dtype")])
def test_bad_model_options(options, message):
    with pytest.raises(ValueError, match=message):
        get_model("resnet18", **options)


def test_package_reexports_get_model():
    assert jaxsam.get_model is get_model
