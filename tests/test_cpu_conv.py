"""jaxsam's CPU convolutions (matrix products on tiny maps and 1x1 kernels, XLA's in batch chunks) against XLA's own."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxsam.models import cpu_conv, get_model

NHWC = ("NHWC", "HWIO", "NHWC")


def _relative_error(a, b) -> float:
    return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(a)), 1e-30))


def _loss(conv, strides, padding):
    def loss(x, w):
        return jnp.sum(jnp.sin(conv(x, w, strides, padding, dimension_numbers=NHWC)))

    return loss


@pytest.mark.parametrize(
    "size, kernel, stride, padding",
    [
        (8, 3, 2, "SAME"),
        (7, 3, 2, ((1, 1), (1, 1))),  # PyTorch's padding=1 on an odd map
        (8, 1, 2, "VALID"),  # a ResNet projection shortcut
        (2, 3, 1, ((1, 1), (1, 1))),  # VGG16's last block
        (1, 3, 1, "SAME"),
    ],
)
def test_gradients_and_hvps_match_xla(size, kernel, stride, padding):
    rng = np.random.RandomState(size * 10 + kernel + stride)
    cin, cout = rng.randint(1, 9), rng.randint(1, 9)
    x = jnp.asarray(rng.randn(3, size, size, cin), jnp.float32)
    w = jnp.asarray(rng.randn(kernel, kernel, cin, cout), jnp.float32)
    native = _loss(lax.conv_general_dilated, (stride, stride), padding)
    pads = lax.padtype_to_pads((size, size), (kernel, kernel), (stride, stride), padding) if isinstance(
        padding, str) else padding  # fmt: skip

    def as_matmuls(x, w, strides, _, dimension_numbers):
        return cpu_conv.conv_as_matmuls(x, w, strides, tuple(tuple(p) for p in pads))

    fast = _loss(as_matmuls, (stride, stride), padding)
    assert float(fast(x, w)) == pytest.approx(float(native(x, w)), rel=1e-5, abs=1e-5)
    for a, b in zip(jax.grad(native, (0, 1))(x, w), jax.grad(fast, (0, 1))(x, w)):
        assert a.shape == b.shape and _relative_error(a, b) < 1e-5
    tangent = (jnp.asarray(rng.randn(*x.shape), jnp.float32), jnp.asarray(rng.randn(*w.shape), jnp.float32))
    hvp_native = jax.jvp(jax.grad(native, (0, 1)), (x, w), tangent)[1]
    hvp_fast = jax.jvp(jax.grad(fast, (0, 1)), (x, w), tangent)[1]
    for a, b in zip(hvp_native, hvp_fast):
        assert _relative_error(a, b) < 1e-5


def test_matmuls_only_on_tiny_maps_and_1x1_kernels_on_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_conv, "conv_as_matmuls", lambda *a: calls.append(a[0].shape + a[1].shape[:2]) or
                        lax.conv_general_dilated(a[0], a[1], a[2], a[3], dimension_numbers=NHWC))  # fmt: skip
    for size, kernel in ((1, 3), (2, 3), (4, 3), (4, 1)):
        x, w = jnp.ones((2, size, size, 3)), jnp.ones((kernel, kernel, 3, 5))
        cpu_conv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC)
    expected = [(2, 1, 1, 3, 3, 3), (2, 2, 2, 3, 3, 3), (2, 4, 4, 3, 1, 1)] if jax.default_backend() == "cpu" else []
    assert calls == expected


@pytest.mark.parametrize("batch, chunk, stride, padding", [(5, 2, 1, "SAME"), (6, 3, 2, ((1, 1), (1, 1))), (4, 4, 1, "VALID")])
def test_batch_chunks_match_xla_in_values_gradients_and_hvps(batch, chunk, stride, padding):
    rng = np.random.RandomState(batch + chunk)
    x = jnp.asarray(rng.randn(batch, 6, 6, 3), jnp.float32)
    w = jnp.asarray(rng.randn(3, 3, 3, 4), jnp.float32)
    pads = lax.padtype_to_pads((6, 6), (3, 3), (stride, stride), padding) if isinstance(padding, str) else padding
    native = _loss(lax.conv_general_dilated, (stride, stride), padding)
    chunked = _loss(lambda x, w, s, _, dimension_numbers: cpu_conv.conv_in_chunks(x, w, s, tuple(pads), chunk),
                    (stride, stride), padding)  # fmt: skip
    assert float(chunked(x, w)) == pytest.approx(float(native(x, w)), rel=1e-5, abs=1e-5)
    tangent = (jnp.asarray(rng.randn(*x.shape), jnp.float32), jnp.asarray(rng.randn(*w.shape), jnp.float32))
    for f in (jax.grad, lambda fn, argnums: lambda x, w: jax.jvp(jax.grad(fn, argnums), (x, w), tangent)[1]):
        for a, b in zip(f(native, (0, 1))(x, w), f(chunked, (0, 1))(x, w)):
            assert a.shape == b.shape and _relative_error(a, b) < 1e-5


def test_large_inputs_are_chunked_by_the_environment_setting(monkeypatch):
    sizes = []
    real = cpu_conv._native
    monkeypatch.setattr(cpu_conv, "_native", lambda x, *a: sizes.append(x.shape[0]) or real(x, *a))
    monkeypatch.setattr(cpu_conv, "CHUNK_BYTES", 0)
    monkeypatch.setattr(cpu_conv, "CHUNK_CHANNELS", 1)
    x, w = jnp.ones((7, 4, 4, 2)), jnp.ones((3, 3, 2, 2))
    for setting in ("3", "0", ""):
        monkeypatch.setenv("JAXSAM_CPU_CONV_CHUNK", setting)
        cpu_conv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC)
    on_cpu = jax.default_backend() == "cpu"
    assert sizes == ([3, 3, 1, 7, 7] if on_cpu else [])
    monkeypatch.setenv("JAXSAM_CPU_CONV_CHUNK", "many")
    with pytest.raises(ValueError, match="JAXSAM_CPU_CONV_CHUNK='many': set it to a whole number of images"):
        cpu_conv.batch_chunk()


def test_unsupported_settings_fall_back_to_xla_exactly():
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(2, 6, 6, 4), jnp.float32)
    w = jnp.asarray(rng.randn(3, 3, 2, 4), jnp.float32)
    kwargs = dict(rhs_dilation=(2, 2), dimension_numbers=NHWC, feature_group_count=2)
    a = lax.conv_general_dilated(x, w, (1, 1), "SAME", **kwargs)
    b = cpu_conv.conv_general_dilated(x, w, (1, 1), "SAME", **kwargs)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", ["vgg16"])  # ResNet18 differs only in 1x1 kernels: covered shape by shape above
def test_networks_have_the_same_parameters_and_gradients_with_either_convolution(name):
    x = jnp.asarray(np.random.RandomState(1).randn(4, 32, 32, 3), jnp.float32)
    y = jnp.arange(4) % 10
    grads = []
    for conv in ("native", "xla"):
        model = get_model(name, width=0.0625, conv=conv)
        variables = model.init(jax.random.key(0), x[:1], train=False)

        def loss(params):
            logits, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

        grads.append(jax.jit(jax.grad(loss))(variables["params"]))
    assert jax.tree.structure(grads[0]) == jax.tree.structure(grads[1])
    # Relative to each layer's largest entry, or to the largest entry overall for
    # layers whose exact gradient is zero (a convolution's bias before BatchNorm:
    # both give rounding noise of ~1e-7 there).
    scale = max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(grads[0]))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        error = float(jnp.max(jnp.abs(a - b)))
        assert error <= 1e-3 * float(jnp.max(jnp.abs(a))) or error <= 1e-5 * scale, error


def test_unknown_conv_is_refused():
    with pytest.raises(ValueError, match="unknown conv 'fast': use one of auto, xla, native, onednn"):
        get_model("resnet18", conv="fast")
