"""The input pipeline: training batches on the host, augmentation and normalization on device.

Training order and augmentation are deterministic functions of
``(seed, epoch, step)``: epoch e visits the examples in
``permutation(fold_in(key(seed), e))``, so a run resumed at (epoch, step) sees
exactly the batches an uninterrupted run sees. The standard CIFAR augmentation
(He et al. 2016, "Deep Residual Learning for Image Recognition": 4-pixel zero
padding, random 32x32 crop, random horizontal flip) and normalization run
inside the jitted step on device, so only uint8 batches cross to the device:

    for images, labels in train_batches(data.train, 128, seed=0, epoch=epoch):
        state = train_step(state, images, labels)
    # and inside train_step:  x = augment(key, images)      # float32, normalized

Evaluation batches are padded to one shape and carry a mask, so a sum over the
mask gives exact full-split metrics with a single compilation. Every name here
is also `jaxsam.data`'s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxsam.download import DataError

if TYPE_CHECKING:
    from jaxsam.data import Split

# Per-channel statistics of the training images as [0, 1] floats (the values
# the CIFAR literature normalizes with).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


# ---------------------------------------------------------------------------
# Batching (host side).


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """Order in which epoch `epoch` visits the n training examples.

    A pure function of (seed, epoch, n), so a resumed run recomputes it:
    `jax.random.permutation(fold_in(key(seed), epoch), n)` as numpy.
    """
    key = jax.random.fold_in(jax.random.key(seed), epoch)
    return np.asarray(jax.random.permutation(key, n))


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Full training batches in an epoch of n examples (the partial last batch is dropped)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size!r})")
    return n // batch_size


def train_batches(
    split: Split, batch_size: int, *, seed: int, epoch: int, start_step: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Training batches of one epoch, from `start_step` on.

    Batch s is examples `epoch_permutation(seed, epoch, n)[s*B:(s+1)*B]`, so
    resuming at (epoch, start_step) yields exactly the batches an uninterrupted
    epoch yields from there.

    Args:
      split: the training split.
      batch_size: B, the global batch size.
      seed: the data-order seed.
      epoch: epoch number (0-based).
      start_step: first step to yield, 0 <= start_step <= steps_per_epoch.

    Returns:
      An iterator of (images uint8 (B, 32, 32, 3), labels int32 (B,)).
    """
    n = len(split)
    steps = steps_per_epoch(n, batch_size)
    if steps == 0:
        raise DataError(f"batch_size {batch_size:,} exceeds the {n:,} training examples: lower batch_size")
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step must be in 0..{steps} for {steps} steps per epoch (got {start_step!r})")

    # A generator, so the permutation is drawn when iteration starts and the
    # checks above run at the call.
    def batches():
        order = epoch_permutation(seed, epoch, n)
        for step in range(start_step, steps):
            indices = order[step * batch_size : (step + 1) * batch_size]
            yield split.images[indices], split.labels[indices]

    return batches()


def eval_batches(split: Split, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The whole split once, in order, in batches of one shape.

    The last batch is padded with zero images and label 0; `mask` marks the
    real examples, so `sum(mask * per_example_metric)` over all batches divided
    by `len(split)` is the exact full-split metric, and one compiled step
    serves every batch.

    Args:
      split: the split to evaluate.
      batch_size: B.

    Returns:
      An iterator of (images uint8 (B, 32, 32, 3), labels int32 (B,),
      mask float32 (B,)).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size!r})")

    def batches():
        n = len(split)
        for start in range(0, n, batch_size):
            images = split.images[start : start + batch_size]
            labels = split.labels[start : start + batch_size]
            real = len(labels)
            mask = np.zeros(batch_size, np.float32)
            mask[:real] = 1.0
            if real < batch_size:
                pad = batch_size - real
                images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), np.uint8)])
                labels = np.concatenate([labels, np.zeros(pad, np.int32)])
            yield images, labels, mask

    return batches()


# ---------------------------------------------------------------------------
# On device (jit-compatible).

PAD = 4  # default pixels of zero padding around the image before the random crop

# (x/255 - mean)/std for every uint8 value x and channel, computed in float64
# and rounded once. Looking values up instead of computing them makes the
# result bit-identical in every context: XLA turns the divisions into
# multiplications differently in eager, jitted and fused code (1-ulp
# differences), and a gather of 256x3 values is as fast as the arithmetic.
_NORMALIZED = (
    (np.arange(256, dtype=np.float64)[:, None] / 255.0 - np.asarray(CIFAR10_MEAN)) / np.asarray(CIFAR10_STD)
).astype(np.float32)


def normalize(images: jax.Array) -> jax.Array:
    """uint8 pixels -> float32 (x/255 - mean) / std per channel (CIFAR10_MEAN/STD).

    Each value is the formula evaluated in float64 and rounded once to float32,
    identically under jit, vmap and eagerly.

    Args:
      images: uint8 (..., 3), channels last.

    Returns:
      float32 array of the same shape.
    """
    if jnp.result_type(images) != jnp.uint8:
        # A float input is most likely already normalized; doing it twice fails silently.
        raise TypeError(f"normalize expects uint8 pixels (got {jnp.result_type(images)})")
    if images.shape[-1] != 3:
        raise ValueError(f"normalize expects 3 channels last (got shape {images.shape})")
    table = jnp.asarray(_NORMALIZED)
    return table[images.astype(jnp.int32), jnp.arange(3)]


def _crop_and_flip_one(key: jax.Array, image: jax.Array, padding: int) -> jax.Array:
    height, width, channels = image.shape
    k_offset, k_flip = jax.random.split(key)
    dy, dx = jax.random.randint(k_offset, (2,), 0, 2 * padding + 1)
    # Zero in uint8 before normalizing, as torchvision's RandomCrop(32, padding=4)
    # on PIL images: the border is black, not the mean colour.
    padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    window = jax.lax.dynamic_slice(padded, (dy, dx, 0), (height, width, channels))
    return jnp.where(jax.random.bernoulli(k_flip), window[:, ::-1, :], window)


def crop_and_flip(
    key: jax.Array, images: jax.Array, first_index: jax.Array | int = 0, *, padding: int = PAD
) -> jax.Array:
    """Random crop of the zero-padded image (4 pixels by default), then a horizontal flip with probability 1/2.

    Example i of the batch draws its offset (one of 9x9 for padding 4) and flip from
    `fold_in(key, first_index + i)`: its position in the global batch. Under a
    per-device map, pass the device's first global index, and every example
    gets the same augmentation whatever the number of devices.

    Args:
      key: a PRNG key.
      images: uint8 (B, H, W, C).
      first_index: global batch position of images[0].
      padding: pixels of zero border before the crop; 0 keeps only the flip.

    Returns:
      uint8 (B, H, W, C).
    """
    if images.ndim != 4:
        raise ValueError(f"crop_and_flip expects a batch (B, H, W, C) (got shape {images.shape})")
    if not isinstance(padding, int) or padding < 0:
        raise ValueError(f"crop padding must be an integer >= 0 (got {padding!r}); 4 is the standard CIFAR setting")
    positions = first_index + jnp.arange(images.shape[0])
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, positions)
    return jax.vmap(lambda k, image: _crop_and_flip_one(k, image, padding))(keys, images)


def augment(
    key: jax.Array, images: jax.Array, first_index: jax.Array | int = 0, *, padding: int = PAD
) -> jax.Array:
    """The standard CIFAR training augmentation, on device: `normalize(crop_and_flip(key, images, first_index))`.

    Args:
      key: a PRNG key, e.g. `fold_in(fold_in(base_key, epoch), step)` for a
        resumable run.
      images: uint8 (B, 32, 32, 3).
      first_index: global batch position of images[0].
      padding: crop padding in pixels (`crop_and_flip`).

    Returns:
      float32 (B, 32, 32, 3), normalized.

    Example:
      >>> import jax, numpy as np
      >>> x = np.zeros((8, 32, 32, 3), np.uint8)
      >>> jax.jit(augment)(jax.random.key(0), x).shape
      (8, 32, 32, 3)
    """
    return normalize(crop_and_flip(key, images, first_index, padding=padding))
