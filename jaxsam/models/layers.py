"""Building blocks shared by the study's networks: the one place that says how
a convolution, a BatchNorm and a width multiplier are made.

The conventions follow the PyTorch CIFAR models the study compares against
(kuangliu/pytorch-cifar, the source of the 11,173,962 / 14,728,266 parameter
counts): 3x3 convolutions with symmetric padding 1 (PyTorch's `padding=1`, which
differs from 'SAME' for stride 2), BatchNorm with PyTorch's momentum 0.1 (Flax
momentum 0.9) and epsilon 1e-5.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxsam.models import cpu_conv

# He et al. 2015 ("Delving deep into rectifiers"), fan-out normal, as torchvision's
# ResNet initializes its convolutions.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def scaled_width(channels: int, width: float) -> int:
    """Channel count `channels * width`, rounded, at least 1."""
    return max(1, int(round(channels * width)))


CONV_IMPLS = ("auto", "xla", "native", "onednn")


ONEDNN_WARNING = ("conv=onednn is experimental: on an AVX2 CPU its calls corrupted the heap (docs/DESIGN.md, "
                  "'oneDNN off by default'); conv=auto runs XLA's convolutions")  # fmt: skip


def conv_notice(impl: str) -> str:
    """One line for a run whose `model.conv` needs a word here, else "".

    "onednn" on the CPU backend says that the oneDNN extension is experimental.
    """
    import jax

    return ONEDNN_WARNING if impl == "onednn" and jax.default_backend() == "cpu" else ""


def conv(features: int, kernel: int, *, strides: int = 1, use_bias: bool, dtype: Any, impl: str = "auto") -> nn.Conv:
    """A kxk convolution with PyTorch's symmetric padding (k // 2 on each side).

    `impl="auto"` is "xla": `cpu_conv.conv_general_dilated` (on the CPU
    backend: matrix products on maps of 2x2 or smaller and for 1x1 kernels,
    XLA's convolution on chunks of 32 images for large activations).
    "onednn" (experimental, the `cpu-fast` extra; ValueError without it):
    `onednn_conv.layer_conv_general_dilated`, oneDNN through the XLA FFI
    except where matrix products were faster. It is not the default: on an
    AVX2 CPU its calls corrupted the heap (docs/DESIGN.md).
    "native": XLA's own convolution, unchunked. All are exactly XLA's
    convolution on GPU/TPU, and all have the same parameters.
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"unknown convolution impl {impl!r}: use one of {', '.join(CONV_IMPLS)}")
    custom = None
    if impl == "onednn":
        from jaxsam.models import onednn_conv  # builds or loads the extension once, if the extra is installed

        if not onednn_conv.AVAILABLE:
            raise ValueError(f"conv='onednn' needs the oneDNN extension: {onednn_conv.REASON}; or use conv='auto'")
        custom = onednn_conv.layer_conv_general_dilated
    elif impl in ("auto", "xla"):
        custom = cpu_conv.conv_general_dilated
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(strides, strides),
        padding=((pad, pad), (pad, pad)),
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=conv_kernel_init,
        conv_general_dilated=custom,
    )


def batch_norm(train: bool, dtype: Any) -> nn.BatchNorm:
    """BatchNorm with batch statistics in training and running averages in eval.

    Statistics are reduced in float32 even for bfloat16 compute (Flax's default),
    and scale/bias and the running averages are float32.
    """
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        dtype=dtype,
        param_dtype=jnp.float32,
    )


def classifier(num_classes: int, dtype: Any) -> nn.Dense:
    """The final dense layer; float32 parameters whatever the compute dtype."""
    return nn.Dense(num_classes, dtype=dtype, param_dtype=jnp.float32)


max_pool_2x2 = functools.partial(nn.max_pool, window_shape=(2, 2), strides=(2, 2))
