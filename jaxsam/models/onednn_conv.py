"""oneDNN 2-D convolutions for the CPU backend, through the XLA FFI.

The C++ side (`jaxsam/_csrc/onednn_conv.cc`) exports three FFI handlers, float32 with
NHWC activations and HWIO kernels: the forward convolution, its data gradient
and its weight gradient. Here each is a JAX primitive, and the three are
closed under differentiation: every one is bilinear, so its JVP is itself
applied to (tangent, primal) and (primal, tangent), and its two transposes are
the other two primitives,

    y  = fwd(x, w)           x̄ = bwd_data(ȳ, w)    w̄ = bwd_weights(x, ȳ)
    dx = bwd_data(dy, w)     dȳ = fwd(d̄x, w)        w̄ = bwd_weights(d̄x, dy)
    dw = bwd_weights(x, dy)  x̄ = bwd_data(dy, d̄w)   dȳ = fwd(x, d̄w)

so `jax.grad`, `jax.jvp` and forward-over-reverse Hessian-vector products
(`jax.jvp(jax.grad(f), ...)`) all stay oneDNN calls. (A `custom_vjp` could
not be forward-differentiated.)

The library is built from `jaxsam/_csrc/onednn_conv.cc` at the first import
once the `cpu-fast` extra is installed (`pip install -e ".[cpu-fast]"`:
oneDNN from PyPI; `jaxsam.models.onednn_build` compiles it with g++). Without
it `AVAILABLE` is False, `NOTICE` says why, and `conv_general_dilated` is
exactly `jaxsam.models.cpu_conv.conv_general_dilated`.

Each call runs on XLA's own intra-op thread pool (the batch cut into one
single-threaded oneDNN call per pool thread), so it never competes with XLA's
threads for the cores; `JAXSAM_ONEDNN_THREADING=omp` gives the calls to
oneDNN's OpenMP team instead (the C++ source's header says more).
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src import dispatch
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from jaxsam.models import cpu_conv, onednn_build

# jaxsam's XLA:CPU convolution, for every call oneDNN does not take (bound now, so that a caller may
# substitute this module's function for `cpu_conv.conv_general_dilated` without a loop).
_fallback = cpu_conv.conv_general_dilated
_TARGETS = ("jaxsam_onednn_conv_fwd", "jaxsam_onednn_conv_bwd_data", "jaxsam_onednn_conv_bwd_weights")
BUILD_HINT = onednn_build.INSTALL_HINT


def _load() -> tuple[Any, str]:
    """The library ($JAXSAM_ONEDNN_CONV_LIB, else built from source by `onednn_build`), or None and why."""
    path = os.environ.get(onednn_build.LIBRARY_ENV_VAR, "")
    if not path:
        try:
            path = onednn_build.build(log=lambda line: print(line, file=sys.stderr))
        except onednn_build.BuildError as err:
            return None, str(err)
    try:
        lib = ctypes.CDLL(path)
    except OSError as err:
        return None, f"{path} did not load ({err})"
    for name in _TARGETS:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
    return lib, ""


_LIB, REASON = _load()
AVAILABLE: bool = _LIB is not None
NOTICE = "" if AVAILABLE else f"onednn_conv: {REASON}; using jaxsam's XLA convolutions"


def cache_size() -> int:
    """Number of oneDNN primitives the library has built and cached (0 when not built)."""
    if _LIB is None:
        return 0
    fn = _LIB.jaxsam_onednn_conv_cache_size
    fn.restype = ctypes.c_int64
    return int(fn())


def busy_seconds() -> float:
    """Wall seconds spent inside the library's calls since it loaded, summed over threads (0 when not built)."""
    if _LIB is None:
        return 0.0
    fn = _LIB.jaxsam_onednn_conv_busy_ns
    fn.restype = ctypes.c_int64
    return int(fn()) * 1e-9


def _out_hw(h, w, kh, kw, strides, pads):
    (sh, sw), ((pt, pb), (pl, pr)) = strides, pads
    return (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1


def _make(name: str, target: str, shape_rule) -> Primitive:
    prim = Primitive(name)
    dispatch.simple_impl(prim)
    prim.def_abstract_eval(lambda a, b, **p: jax.core.ShapedArray(shape_rule(a.shape, b.shape, **p), a.dtype))
    lowering = jax.ffi.ffi_lowering(target)

    def lower(ctx, a, b, *, strides, pads, **_):
        (sh, sw), ((pt, pb), (pl, pr)) = strides, pads
        attrs = dict(sh=sh, sw=sw, pt=pt, pb=pb, pl=pl, pr=pr)
        return lowering(ctx, a, b, **{k: np.int64(v) for k, v in attrs.items()})

    mlir.register_lowering(prim, lower, platform="cpu")
    return prim


def _fwd_shape(x, w, *, strides, pads):
    return (x[0], *_out_hw(x[1], x[2], w[0], w[1], strides, pads), w[3])


conv_p = _make("onednn_conv_fwd", _TARGETS[0], _fwd_shape)
conv_bwd_data_p = _make("onednn_conv_bwd_data", _TARGETS[1], lambda dy, w, *, lhs_shape, **_: lhs_shape)
conv_bwd_weights_p = _make("onednn_conv_bwd_weights", _TARGETS[2], lambda x, dy, *, rhs_shape, **_: rhs_shape)


def _shape(v) -> tuple[int, ...]:
    return tuple(v.aval.shape)


# Transposes: each primitive is bilinear; its transposes are the other two (module docstring).
ad.defbilinear(
    conv_p,
    lambda ct, x, w, **p: conv_bwd_data_p.bind(ct, w, lhs_shape=_shape(x), **p),
    lambda ct, x, w, **p: conv_bwd_weights_p.bind(x, ct, rhs_shape=_shape(w), **p),
)
ad.defbilinear(
    conv_bwd_data_p,
    lambda ct, dy, w, *, lhs_shape, **p: conv_p.bind(ct, w, **p),
    lambda ct, dy, w, *, lhs_shape, **p: conv_bwd_weights_p.bind(ct, dy, rhs_shape=_shape(w), **p),
)
ad.defbilinear(
    conv_bwd_weights_p,
    lambda ct, x, dy, *, rhs_shape, **p: conv_bwd_data_p.bind(dy, ct, lhs_shape=_shape(x), **p),
    lambda ct, x, dy, *, rhs_shape, **p: conv_p.bind(x, ct, **p),
)


def _batch(prim, args, dims, **params):
    """vmap: an activation mapped alone joins the images (one call); any other mapping is a loop."""
    moved = [a if d is None else jnp.moveaxis(a, d, 0) for a, d in zip(args, dims)]
    mapped = [d is not None for d in dims]
    if prim is not conv_bwd_weights_p and mapped == [True, False]:
        a = moved[0]  # (B, N, ...) activations against one kernel: a batch of B * N images
        shape = params.get("lhs_shape")
        if shape is not None:
            params = dict(params, lhs_shape=(a.shape[0] * shape[0], *shape[1:]))
        out = prim.bind(a.reshape(a.shape[0] * a.shape[1], *a.shape[2:]), moved[1], **params)
        return out.reshape(a.shape[0], a.shape[1], *out.shape[1:]), 0

    def one(sliced):
        it = iter(sliced)
        return prim.bind(*[next(it) if m else a for a, m in zip(moved, mapped)], **params)

    return lax.map(one, [a for a, m in zip(moved, mapped) if m]), 0


for _prim in (conv_p, conv_bwd_data_p, conv_bwd_weights_p):
    batching.primitive_batchers[_prim] = functools.partial(_batch, _prim)


def conv_nhwc(x: jax.Array, w: jax.Array, strides: tuple[int, int], pads: tuple) -> jax.Array:
    """The oneDNN convolution of float32 NHWC `x` with HWIO `w`.

    Args:
      x: input, shape (N, H, W, C), float32.
      w: kernel, shape (KH, KW, C, O), float32.
      strides: (stride_h, stride_w).
      pads: ((top, bottom), (left, right)), non-negative.

    Returns:
      (N, HO, WO, O) float32, equal to
      `lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))`
      up to float32 rounding.
    """
    if not AVAILABLE:
        raise RuntimeError(NOTICE)
    strides = tuple(int(s) for s in strides)
    pads = tuple(tuple(int(p) for p in pair) for pair in pads)
    return conv_p.bind(x, w, strides=strides, pads=pads)


def supported(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
              feature_group_count=1, batch_group_count=1, preferred_element_type=None) -> tuple | None:
    """The explicit pads if this call can run on oneDNN (CPU backend, plain float32 NHWC/HWIO), else None."""
    if not AVAILABLE or jax.default_backend() != "cpu" or lhs.ndim != 4 or rhs.ndim != 4:
        return None
    plain = (
        all(d == 1 for d in (lhs_dilation or (1, 1)))
        and all(d == 1 for d in (rhs_dilation or (1, 1)))
        and feature_group_count == 1
        and batch_group_count == 1
        and lhs.dtype == jnp.float32
        and rhs.dtype == jnp.float32
        and preferred_element_type in (None, jnp.float32)
        and cpu_conv._is_nhwc(dimension_numbers, lhs.shape, rhs.shape)
    )
    strides = tuple(int(s) for s in window_strides)
    pads = cpu_conv._explicit_pads(padding, lhs.shape, rhs.shape, strides) if plain else None
    if pads is None or any(p < 0 for pair in pads for p in pair):
        return None
    return pads


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
    """`lax.conv_general_dilated` on oneDNN where it can be, else `cpu_conv.conv_general_dilated`.

    A drop-in for Flax's `nn.Conv(conv_general_dilated=...)`. Plain float32
    NHWC/HWIO convolutions (no dilation, one group, non-negative padding) on
    the CPU backend with the library built run as `conv_nhwc`; everything else
    is exactly `jaxsam.models.cpu_conv.conv_general_dilated`.

    Args:
      lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
      dimension_numbers, feature_group_count, batch_group_count, precision,
      preferred_element_type: as `jax.lax.conv_general_dilated`.

    Returns:
      The convolution, as `jax.lax.conv_general_dilated` returns it.

    Example:
      >>> x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
      >>> conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")).shape
      (2, 8, 8, 4)
    """
    args = (lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count, precision, preferred_element_type)  # fmt: skip
    pads = supported(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                     feature_group_count, batch_group_count, preferred_element_type)  # fmt: skip
    if pads is None:
        return _fallback(*args)
    return conv_nhwc(lhs, rhs, tuple(window_strides), pads)


# Maps of at most cpu_conv.SMALL_MAP pixels with at least this many input channels stay on matrix products.
MATMUL_MIN_CHANNELS = 256


def layer_conv_general_dilated(lhs: jax.Array, rhs: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
    """The networks' convolution with the extension: `conv_general_dilated`, except where matrix products won.

    1x1 kernels, and maps of at most `cpu_conv.SMALL_MAP` pixels with at least
    `MATMUL_MIN_CHANNELS` input channels, stay on
    `cpu_conv.conv_general_dilated`'s matrix products, which were faster than
    oneDNN there (VGG16's 2x2 maps, forward and backward at batch 64: 20.5
    against 57.1 ms at 512 channels, 7.1 against 12.8 at 256, but 3.2 against
    2.1 at 128; `python scripts/conv_prototype.py layers`); every other
    plain float32 NHWC/HWIO convolution runs on oneDNN.

    Args:
      lhs, rhs, *args, **kwargs: as `jax.lax.conv_general_dilated`.

    Returns:
      The convolution.
    """
    small = lhs.ndim == 4 and rhs.ndim == 4 and (
        rhs.shape[:2] == (1, 1)
        or (lhs.shape[1] * lhs.shape[2] <= cpu_conv.SMALL_MAP and rhs.shape[2] >= MATMUL_MIN_CHANNELS))
    if small:
        return _fallback(lhs, rhs, *args, **kwargs)
    return conv_general_dilated(lhs, rhs, *args, **kwargs)
