"""2-D convolutions arranged so that XLA:CPU runs them fast; XLA's own convolution elsewhere.

Three rewrites, each exact up to float32 rounding and each plain JAX (so every
derivative, Hessian-vector products included, stays automatic):

* **Tiny maps (at most 2x2) and 1x1 kernels: matrix products.** A k_h×k_w
  convolution is a sum of matrix products over shifted (and strided) slices
  of the padded input,

      y[n, p, q, :] = Σ_{i,j} x_pad[n, s·p + i, s·q + j, :] @ w[i, j].

  On XLA:CPU (jax 0.10) a 3x3 convolution on a 2x2 map — VGG16's last block,
  512 -> 512 channels — is pathological: 2.7 s forward for a batch of 128
  against 0.05 s as that slice sum; the whole VGG16 step runs 3.8x faster.
  A ResNet's 1x1 stride-2 projection is one strided slice and one matrix
  product: forward plus both gradients 87 ms against 198 ms (64 -> 128
  channels on 32x32 maps, batch 128).
* **Everything else: XLA's convolution on chunks of `BATCH_CHUNK` images.**
  XLA:CPU's convolution kernels, and above all its weight gradient (computed as
  a convolution whose window is the whole map, after transposing activations),
  fall out of cache on a batch of 128: on ResNet18's 32x32x64 layer the
  forward, input-gradient and weight-gradient take 393/389/502 ms for the
  batch at once and 243/218/290 ms as four chunks of 32, and the whole
  ResNet18 train step (with the 1x1 rewrite) runs at 13.7 img/s against 12.0
  with XLA's plain convolutions (`scripts/bench.py --native`, one run). The chunks are a Python loop
  over slices (unrolled, not a `while`, in which XLA:CPU's convolution
  gradients are slow; docs/DESIGN.md).

Measured with `python scripts/bench.py` and the per-layer breakdown in
docs/DESIGN.md ("CPU convolutions").

`conv_general_dilated` is a drop-in for `lax.conv_general_dilated` (Flax's
`nn.Conv(conv_general_dilated=...)`): it rewrites only plain NHWC/HWIO
convolutions on the CPU backend; dilations, groups, other layouts and every
GPU/TPU call are exactly `lax.conv_general_dilated`.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")
# Maps of at most this many pixels (2x2) use the slice sum.
SMALL_MAP = 4
# Images per convolution call on CPU (32 was fastest of 8/16/32/64/128 on
# ResNet18's layers, 2-core machine; `JAXSAM_CPU_CONV_CHUNK` overrides, 0 = whole batch),
# for inputs of at least CHUNK_BYTES with at least CHUNK_CHANNELS channels (the
# width-1/8 ResNet18, 8-64 channels, gained nothing and compiled 50% longer).
BATCH_CHUNK = 32
CHUNK_BYTES = 4 << 20
CHUNK_CHANNELS = 64


def batch_chunk() -> int:
    """Images per XLA convolution call on CPU: $JAXSAM_CPU_CONV_CHUNK, else `BATCH_CHUNK` (0: no chunking)."""
    value = os.environ.get("JAXSAM_CPU_CONV_CHUNK", "")
    if not value:
        return BATCH_CHUNK
    try:
        chunk = int(value)
    except ValueError:
        chunk = -1
    if chunk < 0:
        raise ValueError(f"JAXSAM_CPU_CONV_CHUNK={value!r}: set it to a whole number of images (0 = no chunking)")
    return chunk


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
    if pads is None:
        return native()
    if lhs.shape[1] * lhs.shape[2] <= SMALL_MAP or rhs.shape[:2] == (1, 1):
        # Plain JAX ops: autodiff transposes the slices and matrix products, so
        # the gradients (and forward-over-reverse HVPs) are matrix products too.
        return conv_as_matmuls(lhs, rhs, strides, pads)
    large = lhs.size * lhs.dtype.itemsize >= CHUNK_BYTES and lhs.shape[3] >= CHUNK_CHANNELS
    return conv_in_chunks(lhs, rhs, strides, pads, batch_chunk() if large else 0)


def conv_in_chunks(x: jax.Array, w: jax.Array, strides: tuple[int, int], pads: tuple, chunk: int) -> jax.Array:
    """XLA's NHWC convolution applied to `chunk` images at a time and concatenated (0 or ≥ batch: one call)."""
    n = x.shape[0]
    if chunk <= 0 or chunk >= n:
        return _native(x, w, strides, pads)
    return jnp.concatenate([_native(x[i : i + chunk], w, strides, pads) for i in range(0, n, chunk)], axis=0)


def _is_nhwc(dimension_numbers: Any, lhs_shape, rhs_shape) -> bool:
    if dimension_numbers is None:
        return False
    return lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers) == lax.conv_dimension_numbers(
        lhs_shape, rhs_shape, _NHWC
    )
