"""ResNet18 for CIFAR-10 (He et al. 2016, "Deep Residual Learning for Image
Recognition"), the CIFAR variant used by the SAM literature and by the
PyTorch study this project re-implements: a 3x3 stem convolution with 64
channels and no max-pool, four stages of two BasicBlocks (64/128/256/512
channels, stride 2 at the start of stages 2-4), BatchNorm after every
convolution, a 1x1-convolution + BatchNorm projection shortcut whenever the
shape changes, global average pooling and a dense classifier.

At width 1 it has 11,173,962 trainable parameters, the count of the PyTorch
CIFAR ResNet18.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxsam.models import layers


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity or projection shortcut."""

    features: int
    strides: int = 1
    dtype: Any = jnp.float32
    conv: str = "auto"

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        y = layers.conv(self.features, 3, strides=self.strides, use_bias=False, dtype=self.dtype, impl=self.conv)(x)
        y = nn.relu(layers.batch_norm(train, self.dtype)(y))
        y = layers.conv(self.features, 3, use_bias=False, dtype=self.dtype, impl=self.conv)(y)
        y = layers.batch_norm(train, self.dtype)(y)
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = layers.conv(self.features, 1, strides=self.strides, use_bias=False, dtype=self.dtype, impl=self.conv)(x)
            shortcut = layers.batch_norm(train, self.dtype)(shortcut)
        return nn.relu(y + shortcut)


class ResNet(nn.Module):
    """CIFAR ResNet built from BasicBlocks; `stage_sizes=(2, 2, 2, 2)` is ResNet18.

    Attributes:
      stage_sizes: blocks per stage.
      num_classes: size of the logits.
      width: channel multiplier (0.25 gives a 16/32/64/128-channel network).
      dtype: compute dtype; parameters and BatchNorm statistics stay float32
        and the logits are returned in float32.
      conv: "auto" (`cpu_conv`: convolutions arranged for XLA:CPU on CPU) or "native".
    """

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    num_classes: int = 10
    width: float = 1.0
    dtype: Any = jnp.float32
    conv: str = "auto"

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = x.astype(self.dtype)
        x = layers.conv(layers.scaled_width(64, self.width), 3, use_bias=False, dtype=self.dtype, impl=self.conv)(x)
        x = nn.relu(layers.batch_norm(train, self.dtype)(x))
        for stage, num_blocks in enumerate(self.stage_sizes):
            features = layers.scaled_width(64 * 2**stage, self.width)
            for block in range(num_blocks):
                strides = 2 if stage > 0 and block == 0 else 1
                x = BasicBlock(features, strides, self.dtype, self.conv)(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return layers.classifier(self.num_classes, self.dtype)(x).astype(jnp.float32)


def resnet18(num_classes: int = 10, width: float = 1.0, dtype: Any = jnp.float32, conv: str = "auto") -> ResNet:
    """The CIFAR ResNet18 (BasicBlocks [2, 2, 2, 2])."""
    return ResNet(stage_sizes=(2, 2, 2, 2), num_classes=num_classes, width=width, dtype=dtype, conv=conv)
