"""A 2-D convolution that XLA:CPU runs fast on tiny maps: the sum of k_h·k_w matrix products.

A k_h×k_w convolution is a sum of matrix products over shifted (and
strided) slices of the padded input:

    y[n, p, q, :] = Σ_{i,j} x_pad[n, s·p + i, s·q + j, :] @ w[i, j].

On XLA:CPU (jax 0.10) a 3x3 convolution on a 2x2 map — VGG16's last block,
512 -> 512 channels — is pathological: 2.7 s forward for a batch of 128
against 0.05 s as that slice sum, and 4.2 s against 0.17 s for both
gradients; the whole VGG16 train step runs 3.8x faster with it (docs/DESIGN.md,
`python scripts/bench.py`). On larger maps XLA's own convolution is as fast
or faster, including its gradients, so it is kept there.

`conv_general_dilated` is a drop-in for `lax.conv_general_dilated` (Flax's
`nn.Conv(conv_general_dilated=...)`): on the CPU backend, for maps of at
most `SMALL_MAP` pixels, it is the slice sum (plain JAX, so every derivative,
Hessian-vector products included, is automatic); everywhere else (larger
maps, GPU, TPU, dilations, groups, other layouts) it is exactly
`lax.conv_general_dilated`.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")
# Maps of at most this many pixels (2x2) use the slice sum.
SMALL_MAP = 4


def _native(x, w, strides, pads):
    return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC)


def conv_as_matmuls(x: jax.Array, w: jax.Array, strides: tuple[int, int], pads: tuple) -> jax.Array:
    """Σ_{i,j} slice_ij(pad(x)) @ w[i, j]: an NHWC/HWIO convolution as k_h·k_w matrix products.

    `pads` is ((top, bottom), (left, right)); equal to
    `lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))`.
    """
    (sh, sw), ((pt, pb), (pl, pr)) = strides, pads
    n, h, wd, cin = x.shape
    kh, kw, _, cout = w.shape
    ho, wo = (h + pt + pb - kh) // sh + 1, (wd + pl + pr - kw) // sw + 1
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    out = None
    for i in range(kh):
        for j in range(kw):
            patch = lax.slice(xp, (0, i, j, 0), (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, cin), (1, sh, sw, 1))
            term = jnp.einsum("nhwc,cd->nhwd", patch, w[i, j], preferred_element_type=x.dtype)
            out = term if out is None else out + term
    return out


def _explicit_pads(padding: Any, x_shape, w_shape, strides) -> tuple | None:
    if isinstance(padding, str):
        return tuple(tuple(p) for p in lax.padtype_to_pads(x_shape[1:3], w_shape[:2], strides, padding))
    pads = tuple(tuple(int(v) for v in p) for p in padding)
    return pads if len(pads) == 2 and all(len(p) == 2 for p in pads) else None


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """`lax.conv_general_dilated`, as matrix products on small maps on the CPU backend (see module docstring)."""
    native = functools.partial(
        lax.conv_general_dilated, lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
        dimension_numbers, feature_group_count, batch_group_count, precision, preferred_element_type,
    )  # fmt: skip
    if jax.default_backend() != "cpu" or lhs.ndim != 4:
        return native()
    plain = (
        all(d == 1 for d in (lhs_dilation or (1, 1)))
        and all(d == 1 for d in (rhs_dilation or (1, 1)))
        and feature_group_count == 1
        and batch_group_count == 1
        and preferred_element_type in (None, lhs.dtype)
        and _is_nhwc(dimension_numbers, lhs.shape, rhs.shape)
    )
    strides = tuple(int(s) for s in window_strides)
    pads = _explicit_pads(padding, lhs.shape, rhs.shape, strides) if plain else None
    if pads is None or lhs.shape[1] * lhs.shape[2] > SMALL_MAP:
        return native()
    # Plain JAX ops: autodiff transposes the slices and matrix products, so
    # the gradients (and forward-over-reverse HVPs) are matrix products too.
    return conv_as_matmuls(lhs, rhs, strides, pads)


def _is_nhwc(dimension_numbers: Any, lhs_shape, rhs_shape) -> bool:
    if dimension_numbers is None:
        return False
    return lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers) == lax.conv_dimension_numbers(
        lhs_shape, rhs_shape, _NHWC
    )
