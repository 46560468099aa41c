"""The loss whose geometry is measured: a fixed, augmentation-free subset, summed exactly.

Every sharpness number depends on which function is measured. Here it is
the mean plain cross-entropy (no label smoothing, no weight decay) over a
fixed subset of N examples, BatchNorm in eval mode (running statistics) by
default, so L(w) is a deterministic function of the parameters alone — the
convention of Keskar et al. 2017, Foret et al. 2021 and Andriushchenko et
al. 2023 for post-hoc measures.

The subset is cut into fixed-size microbatches (the last one padded and
masked) and summed with `lax.scan`, so memory does not grow with N and the
value is sum / N, not a mean of per-batch means.

    loss_fn = make_loss_fn(model, variables, images, labels, batch_size=256)
    loss_fn(variables["params"])      # scalar
    loss_fn.accuracy(params)          # companion, same subset
    loss_fn.info                      # {"n": ..., "batch_size": ..., "bn": "eval", "subset": ...}

With `bn="train"` each microbatch is normalized with its own statistics (the
model's training-mode function; the running statistics are not updated):
the loss then depends on the microbatch size, recorded in `info`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxsam import data

BN_MODES = ("eval", "train")


def _microbatches(images: np.ndarray, labels: np.ndarray, batch_size: int):
    """(images, labels, mask) reshaped to (num_batches, batch_size, ...), padded with masked zeros."""
    n = labels.shape[0]
    num_batches = -(-n // batch_size)
    pad = num_batches * batch_size - n
    mask = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    if pad:
        images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
        labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
    shape = (num_batches, batch_size)
    return (
        images.reshape(shape + images.shape[1:]),
        labels.reshape(shape).astype(np.int32),
        mask.reshape(shape),
    )


@dataclasses.dataclass(frozen=True)
class LossFunction:
    """`loss_fn(params) -> scalar`: mean cross-entropy over a fixed subset (see module docstring).

    Attributes:
      per_example_sums: `(params) -> (loss_sum, correct_sum)` over the whole subset.
      n: number of examples.
      info: what was measured (subset name, n, microbatch size, BatchNorm mode),
        copied into every result record.
      batch_sums: `(params, images, labels, mask) -> (loss_sum, correct_sum)`
        of one microbatch (None for `from_function` losses).
      images, labels: the subset as given (host arrays), for `chunks`.
    """

    per_example_sums: Callable[[Any], tuple[jax.Array, jax.Array]]
    n: int
    info: dict[str, Any]
    batch_sums: Callable[..., tuple[jax.Array, jax.Array]] | None = None
    images: np.ndarray | None = dataclasses.field(default=None, repr=False)
    labels: np.ndarray | None = dataclasses.field(default=None, repr=False)

    def __call__(self, params: Any) -> jax.Array:
        return self.per_example_sums(params)[0] / self.n

    def accuracy(self, params: Any) -> jax.Array:
        """Fraction of the subset classified correctly."""
        return self.per_example_sums(params)[1] / self.n

    def chunks(self, m: int) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The subset cut into consecutive chunks of m examples: (images, labels, mask), leading axis = chunk.

        For m-sharpness (Foret et al. 2021; Andriushchenko & Flammarion 2022),
        where the perturbation is found and applied per chunk of m examples.
        The last chunk is padded and masked when m does not divide n.
        """
        if self.batch_sums is None:
            raise ValueError("m-sharpness needs a loss built by make_loss_fn (it must know its examples)")
        if not 1 <= m <= self.n:
            raise ValueError(f"m must be between 1 and the subset size {self.n} (got {m})")
        return tuple(jnp.asarray(a) for a in _microbatches(self.images, self.labels, m))


def make_loss_fn(
    model: nn.Module,
    variables: dict[str, Any],
    images: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int = 500,
    bn: str = "eval",
    subset: str = "",
) -> LossFunction:
    """Builds the measured loss of `model` on `(images, labels)` as a function of the parameters.

    Args:
      model: a Flax module called as `model.apply(variables, x, train=...)`.
      variables: its variables; everything except "params" (e.g. BatchNorm
        running statistics) stays fixed.
      images: uint8 (N, H, W, 3) pixels (normalized here with the training
        statistics) or float images used as given.
      labels: int (N,).
      batch_size: microbatch size of the `lax.scan`; N need not divide by it.
      bn: "eval" (running statistics) or "train" (per-microbatch statistics).
      subset: a name recorded in `info` (e.g. "train[:4096]").

    Returns:
      A `LossFunction`: callable on params, with `.accuracy(params)` and `.info`.
    """
    if bn not in BN_MODES:
        raise ValueError(f"unknown BatchNorm mode bn={bn!r}: use 'eval' (running statistics) or 'train'")
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise ValueError(
            f"need as many labels as images, at least one (got {images.shape[0]} images, {labels.shape[0]} labels)"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    n = int(labels.shape[0])
    batch_size = min(batch_size, n)
    xs, ys, masks = (jnp.asarray(a) for a in _microbatches(images, labels, batch_size))
    fixed = {k: v for k, v in variables.items() if k != "params"}
    as_float = data.normalize if images.dtype == np.uint8 else (lambda x: x)

    def batch_sums(params, x, y, m):
        inputs = as_float(x)
        if bn == "eval":
            logits = model.apply({"params": params, **fixed}, inputs, train=False)
        else:
            logits, _ = model.apply({"params": params, **fixed}, inputs, train=True, mutable=["batch_stats"])
        # Plain cross-entropy in at least float32 (bfloat16 logits are widened; float64 kept).
        logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
        logp = jax.nn.log_softmax(logits)
        nll = -jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]
        correct = (jnp.argmax(logits, -1) == y).astype(logp.dtype)
        return jnp.sum(nll * m), jnp.sum(correct * m)

    def per_example_sums(params):
        def body(carry, batch):
            loss, correct = batch_sums(params, *batch)
            return (carry[0] + loss, carry[1] + correct), None

        # The sums' dtype is whatever one microbatch gives (float64 under x64 with float64 inputs).
        shapes = jax.eval_shape(batch_sums, params, xs[0], ys[0], masks[0])
        zeros = tuple(jnp.zeros([], s.dtype) for s in shapes)
        (loss_sum, correct_sum), _ = jax.lax.scan(body, zeros, (xs, ys, masks))
        return loss_sum, correct_sum

    info = {"subset": subset or f"{n} examples", "n": n, "batch_size": batch_size, "bn": bn}
    return LossFunction(
        per_example_sums=per_example_sums, n=n, info=info, batch_sums=batch_sums, images=images, labels=labels
    )


def from_function(loss_fn: Callable[[Any], jax.Array], **info: Any) -> Callable[[Any], jax.Array]:
    """Wraps any `params -> scalar` so results can carry a description (`info`)."""
    return LossFunction(per_example_sums=lambda p: (loss_fn(p), jnp.nan), n=1, info=dict(info))


def info_of(loss_fn: Callable) -> dict[str, Any]:
    """The description of a loss function built here, or {} for any other callable."""
    return dict(getattr(loss_fn, "info", {}))
