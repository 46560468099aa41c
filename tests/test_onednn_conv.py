"""The oneDNN FFI convolution (jaxsam/models/onednn_conv.py) against XLA's: values, gradients, HVPs.

Tolerances are derived, not tuned: a float32 sum of K products carries an
error of at most γ_K·Σ|terms| with γ_K = K·u/(1 - K·u), u = 2^-24 (Higham,
"Accuracy and Stability of Numerical Algorithms", 3.1), whatever order the
library sums in; so two implementations differ by at most twice that, and a
chain of two bilinear maps (the HVP) by the propagated bound computed below
with the same convolutions applied to absolute values.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxsam.models import onednn_conv

# The extension is experimental: on an AVX2 CPU its calls corrupted the heap (docs/DESIGN.md, "oneDNN off
# by default"), so these tests, which would crash there at random, run only when asked for.
pytestmark = [
    pytest.mark.skipif(
        not onednn_conv.AVAILABLE or jax.default_backend() != "cpu",
        reason=onednn_conv.NOTICE or "the oneDNN convolution runs on the CPU backend only",
    ),
    pytest.mark.skipif(
        os.environ.get("JAXSAM_TEST_ONEDNN") != "1",
        reason="conv='onednn' is experimental (heap corruption on AVX2, docs/DESIGN.md): JAXSAM_TEST_ONEDNN=1 runs these",
    ),
]

NHWC = ("NHWC", "HWIO", "NHWC")
U = 2.0**-24

SHAPES = [  # size, kernel, stride, padding (the tests/test_cpu_conv.py shapes and two more)
    (8, 3, 2, "SAME"),  # asymmetric: pads (0, 1)
    (7, 3, 2, ((1, 1), (1, 1))),  # PyTorch's padding=1 on an odd map
    (8, 1, 2, "VALID"),  # a ResNet projection shortcut
    (2, 3, 1, ((1, 1), (1, 1))),  # VGG16's last block
    (1, 3, 1, "SAME"),
    (6, 3, 1, ((0, 2), (1, 0))),  # explicit asymmetric
    (9, 3, 2, "VALID"),
]


def _gamma(k: int) -> float:
    return k * U / (1 - k * U)


def _pads(size, kernel, stride, padding):
    if isinstance(padding, str):
        return tuple(tuple(p) for p in lax.padtype_to_pads((size, size), (kernel, kernel), (stride, stride), padding))
    return padding


@pytest.mark.parametrize("size, kernel, stride, padding", SHAPES)
def test_values_gradients_and_hvps_match_xla(size, kernel, stride, padding):
    rng = np.random.RandomState(size * 10 + kernel + stride)
    n, cin, cout = 3, rng.randint(1, 9), rng.randint(1, 9)
    strides, pads = (stride, stride), _pads(size, kernel, stride, padding)
    ho, wo = ((size + lo + hi - kernel) // stride + 1 for lo, hi in pads)
    x, u = (jnp.asarray(rng.randn(n, size, size, cin), jnp.float32) for _ in range(2))
    w, v = (jnp.asarray(rng.randn(kernel, kernel, cin, cout), jnp.float32) for _ in range(2))
    t = jnp.asarray(rng.randn(n, ho, wo, cout), jnp.float32)
    xla = lambda a, b: lax.conv_general_dilated(a, b, strides, padding, dimension_numbers=NHWC)
    dnn = lambda a, b: onednn_conv.conv_general_dilated(a, b, strides, padding, dimension_numbers=NHWC)

    def everything(conv):
        linear = lambda a, b: jnp.sum(conv(a, b) * t)  # gradients: bwd_data(t, w), bwd_weights(x, t)
        square = lambda a, b: 0.5 * jnp.sum(conv(a, b) ** 2)
        hvp = jax.jvp(jax.grad(square, (0, 1)), (x, w), (u, v))[1]
        return conv(x, w), jax.grad(linear, (0, 1))(x, w), hvp

    ours, ref = jax.jit(lambda: everything(dnn))(), jax.jit(lambda: everything(xla))()

    # Bounds from XLA's convolutions of absolute values (F: forward, BD/BW: its two transposes).
    F = lambda a, b: xla(jnp.abs(a), jnp.abs(b))
    BD = lambda dy, b: jax.vjp(lambda a: xla(a, jnp.abs(b)), x)[1](jnp.abs(dy))[0]
    BW = lambda a, dy: jax.vjp(lambda b: xla(jnp.abs(a), b), w)[1](jnp.abs(dy))[0]
    k_f, k_d, k_w = kernel * kernel * cin, kernel * kernel * cout, n * ho * wo
    y = xla(x, w)
    e_y = _gamma(k_f) * F(x, w)
    dy = xla(u, w) + xla(x, v)
    e_dy = _gamma(k_f) * (F(u, w) + F(x, v)) + U * jnp.abs(dy)
    bounds = (
        e_y,
        (_gamma(k_d) * BD(t, w), _gamma(k_w) * BW(x, t)),
        # h_x = BD(dy, w) + BD(y, v), h_w = BW(x, dy) + BW(u, y): propagated errors + their own sums' + the add.
        (BD(e_dy, w) + BD(e_y, v) + (_gamma(k_d) + U) * (BD(dy, w) + BD(y, v)),
         BW(x, e_dy) + BW(u, e_y) + (_gamma(k_w) + U) * (BW(x, dy) + BW(u, y))),
    )  # fmt: skip
    for a, b, bound in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), jax.tree.leaves(bounds)):
        assert a.shape == b.shape
        excess = float(jnp.max(jnp.abs(a - b) - 2 * bound - 1e-30))
        assert excess <= 0, (excess, float(jnp.max(jnp.abs(a - b))))


def test_primitives_are_cached_by_shape():
    x, w = jnp.ones((2, 5, 5, 3)), jnp.ones((3, 3, 3, 4))
    f = jax.jit(lambda x, w: onednn_conv.conv_nhwc(x, w, (1, 1), ((1, 1), (1, 1))))
    f(x, w).block_until_ready()
    before = onednn_conv.cache_size()
    f(x + 1, w).block_until_ready()
    jax.jit(lambda x, w: onednn_conv.conv_nhwc(x, w, (1, 1), ((1, 1), (1, 1))) * 2)(x, w).block_until_ready()
    assert onednn_conv.cache_size() == before >= 1
    f(jnp.ones((3, 5, 5, 3)), w).block_until_ready()
    assert onednn_conv.cache_size() == before + 1


def test_other_dtypes_and_settings_fall_back_to_jaxsams_xla_convolution():
    x, w = jnp.ones((2, 6, 6, 4), jnp.bfloat16), jnp.ones((3, 3, 4, 4), jnp.bfloat16)
    assert onednn_conv.supported(x, w, (1, 1), "SAME", dimension_numbers=NHWC) is None
    x32 = x.astype(jnp.float32)
    assert onednn_conv.supported(x32, w.astype(jnp.float32), (1, 1), "SAME", rhs_dilation=(2, 2),
                                 dimension_numbers=NHWC) is None  # fmt: skip
    assert onednn_conv.supported(x32, w.astype(jnp.float32), (1, 1), ((-1, 0), (0, 0)), dimension_numbers=NHWC) is None
    out = onednn_conv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC)
    assert out.dtype == jnp.bfloat16 and out.shape == (2, 6, 6, 4)


def test_vmap_folds_a_mapped_activation_into_the_batch_and_loops_otherwise():
    """vmap over images (one call of B*N images), over kernels and per-example gradients (loops)."""
    rng = np.random.RandomState(0)
    x, t = jnp.asarray(rng.randn(2, 3, 5, 5, 2), jnp.float32), jnp.asarray(rng.randn(2, 3, 5, 5, 4), jnp.float32)
    w, ws = jnp.asarray(rng.randn(3, 3, 2, 4), jnp.float32), jnp.asarray(rng.randn(2, 3, 3, 2, 4), jnp.float32)
    pads = ((1, 1), (1, 1))

    def run(conv):
        linear = lambda a, b, c: jnp.sum(conv(a, b) * c)
        return (jax.vmap(lambda a: conv(a, w))(x),  # forward, images mapped: folded
                jax.vmap(conv)(x, ws),  # images and kernels mapped: a loop
                # per-example gradients: the data gradient folded, the weight gradient a loop
                jax.vmap(jax.grad(linear, (0, 1)), (0, None, 0))(x, w, t))  # fmt: skip

    xla = lambda a, b: lax.conv_general_dilated(a, b, (1, 1), pads, dimension_numbers=NHWC)
    ours = jax.jit(lambda: run(lambda a, b: onednn_conv.conv_nhwc(a, b, (1, 1), pads)))()
    ref = jax.jit(lambda: run(xla))()
    bounds = jax.jit(lambda: run(lambda a, b: xla(jnp.abs(a), jnp.abs(b))))()  # the same sums of |terms|
    t_abs_grads = jax.vmap(jax.grad(lambda a, b, c: jnp.sum(xla(a, b) * c), (0, 1)), (0, None, 0))
    bounds = (bounds[0], bounds[1], t_abs_grads(jnp.abs(x), jnp.abs(w), jnp.abs(t)))
    gammas = (_gamma(9 * 2), _gamma(9 * 2), (_gamma(9 * 4), _gamma(3 * 5 * 5)))
    for a, b, bound, g in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), jax.tree.leaves(bounds),
                              jax.tree.leaves(gammas)):  # fmt: skip
        assert a.shape == b.shape
        assert float(jnp.max(jnp.abs(a - b) - 2 * g * bound - 1e-30)) <= 0


def test_the_layer_choice_keeps_matrix_products_where_they_were_faster():
    """With the extension: 1x1 kernels, and maps of at most cpu_conv.SMALL_MAP pixels with at least
    MATMUL_MIN_CHANNELS input channels, stay on cpu_conv (the same program, so the same bits); other
    plain convolutions go to oneDNN."""
    from jaxsam.models import cpu_conv

    rng = np.random.default_rng(0)
    wide = onednn_conv.MATMUL_MIN_CHANNELS
    cases = [((2, 8, 8, 4), (1, 1, 4, 6), False), ((2, 2, 2, wide), (3, 3, wide, 6), False),
             ((2, 2, 2, 4), (3, 3, 4, 6), True), ((2, 4, 4, wide), (3, 3, wide, 6), True),
             ((2, 8, 8, 4), (3, 3, 4, 6), True)]  # fmt: skip
    for x_shape, w_shape, on_onednn in cases:
        x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
        w = jnp.asarray(rng.standard_normal(w_shape), jnp.float32)
        args = ((1, 1), ((w_shape[0] // 2,) * 2,) * 2)
        chosen = jax.jit(lambda a, b: onednn_conv.layer_conv_general_dilated(a, b, *args, dimension_numbers=NHWC))
        want = onednn_conv.conv_general_dilated if on_onednn else cpu_conv.conv_general_dilated
        expected = jax.jit(lambda a, b: want(a, b, *args, dimension_numbers=NHWC))
        np.testing.assert_array_equal(np.asarray(chosen(x, w)), np.asarray(expected(x, w)))
