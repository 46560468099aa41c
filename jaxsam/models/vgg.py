"""VGG16 with BatchNorm for CIFAR-10 (Simonyan & Zisserman 2015, "Very Deep
Convolutional Networks for Large-Scale Image Recognition"; BatchNorm after
Ioffe & Szegedy 2015), in the CIFAR form of the PyTorch study: thirteen 3x3
convolutions (with bias) each followed by BatchNorm and ReLU, five 2x2
max-pools, and a single dense layer from the 1x1x512 map to the classes.

At width 1 it has 14,728,266 trainable parameters, the count of the PyTorch
CIFAR VGG16.
"""

from __future__ import annotations

from typing import Any, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp

from jaxsam.models import layers

# Output channels of each 3x3 convolution; "M" is a 2x2 max-pool.
VGG16_LAYOUT: tuple[Union[int, str], ...] = (
    64, 64, "M",
    128, 128, "M",
    256, 256, 256, "M",
    512, 512, 512, "M",
    512, 512, 512, "M",
)  # fmt: skip


class VGG(nn.Module):
    """Plain conv-BN-ReLU stack described by `layout`, then a dense classifier.

    Attributes:
      layout: channel counts and "M" (max-pool) markers.
      num_classes: size of the logits.
      width: channel multiplier for CPU-scale runs.
      dtype: compute dtype; parameters and BatchNorm statistics stay float32
        and the logits are returned in float32.
      conv: "auto" (`cpu_conv`: convolutions arranged for XLA:CPU on CPU) or "native".
    """

    layout: Sequence[Union[int, str]] = VGG16_LAYOUT
    num_classes: int = 10
    width: float = 1.0
    dtype: Any = jnp.float32
    conv: str = "auto"

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = x.astype(self.dtype)
        for item in self.layout:
            if item == "M":
                x = layers.max_pool_2x2(x)
            else:
                x = layers.conv(layers.scaled_width(int(item), self.width), 3, use_bias=True, dtype=self.dtype, impl=self.conv)(x)
                x = nn.relu(layers.batch_norm(train, self.dtype)(x))
        x = x.reshape((x.shape[0], -1))
        return layers.classifier(self.num_classes, self.dtype)(x).astype(jnp.float32)


def vgg16(num_classes: int = 10, width: float = 1.0, dtype: Any = jnp.float32, conv: str = "auto") -> VGG:
    """The CIFAR VGG16 with BatchNorm."""
    return VGG(layout=VGG16_LAYOUT, num_classes=num_classes, width=width, dtype=dtype, conv=conv)
