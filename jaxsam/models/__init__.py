"""The study's networks, looked up by name: `get_model("resnet18", width=0.25)`.

Every model is a Flax linen module used as

    variables = model.init(key, images, train=False)   # {'params', 'batch_stats'}
    logits = model.apply(variables, images, train=False)
    logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])

with NHWC float images and float32 logits of shape (N, num_classes).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from jaxsam.models import layers
from jaxsam.models.resnet import BasicBlock, ResNet, resnet18
from jaxsam.models.vgg import VGG, VGG16_LAYOUT, vgg16

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "vgg16": vgg16,
}


def _as_dtype(dtype: Any) -> Any:
    try:
        return jnp.dtype(dtype)
    except TypeError as err:
        raise ValueError(f"unknown model dtype {dtype!r}: use 'float32' or 'bfloat16'") from err


def get_model(
    name: str, num_classes: int = 10, *, width: float = 1.0, dtype: Any = jnp.float32, conv: str = "auto"
) -> nn.Module:
    """Builds one of the study's networks.

    Args:
      name: "resnet18" or "vgg16".
      num_classes: number of logits.
      width: channel multiplier (> 0); 1.0 is the published network.
      dtype: compute dtype ("float32" or "bfloat16", or a jnp dtype);
        parameters stay float32.
      conv: "auto" (= "xla"): convolutions arranged for XLA:CPU
        (`jaxsam.models.cpu_conv`: matrix products on 2x2 maps and for 1x1
        kernels, batch chunks elsewhere). "onednn" (experimental: on an AVX2
        CPU its calls corrupted the heap, docs/DESIGN.md): oneDNN through the
        XLA FFI (`pip install -e ".[cpu-fast]"`, `jaxsam.models.onednn_conv`).
        "native": XLA's own convolution. On GPU/TPU all four are XLA's convolution.

    Returns:
      The Flax module.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = get_model("resnet18", width=0.125)
      >>> variables = model.init(jax.random.key(0), jnp.zeros((2, 32, 32, 3)), train=False)
      >>> model.apply(variables, jnp.zeros((2, 32, 32, 3))).shape
      (2, 10)
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(sorted(MODELS))}")
    if not width > 0:
        raise ValueError(f"model width must be > 0 (got {width!r}); e.g. width=0.25 for a CPU-sized network")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1 (got {num_classes!r})")
    if conv not in layers.CONV_IMPLS:
        raise ValueError(f"unknown conv {conv!r}: use one of {', '.join(layers.CONV_IMPLS)}")
    return MODELS[name](num_classes=int(num_classes), width=float(width), dtype=_as_dtype(dtype), conv=conv)


__all__ = ["MODELS", "get_model", "ResNet", "BasicBlock", "resnet18", "VGG", "VGG16_LAYOUT", "vgg16"]
