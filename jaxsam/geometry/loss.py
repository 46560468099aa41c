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

Measures that run their loops on the host (the CPU backend, see `driver`)
use `value`, `value_and_grad` and `hvp` instead: the same sums, one compiled
call per microbatch added up in Python, compiled once per model and shape.

With `bn="train"` each microbatch is normalized with its own statistics (the
model's training-mode function; the running statistics are not updated):
the loss then depends on the microbatch size, recorded in `info`.
"""

from __future__ import annotations

import dataclasses
import functools
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


def _as_inputs(x: jax.Array) -> jax.Array:
    """uint8 pixels are normalized with the training statistics; float images are used as given."""
    return data.normalize(x) if x.dtype == jnp.uint8 else x


def _microbatch_sums(model: nn.Module, bn: str, params, fixed, x, y, m) -> tuple[jax.Array, jax.Array]:
    """(Σ cross-entropy, Σ correct) over one microbatch's unmasked examples."""
    if bn == "eval":
        logits = model.apply({"params": params, **fixed}, _as_inputs(x), train=False)
    else:
        logits, _ = model.apply({"params": params, **fixed}, _as_inputs(x), train=True, mutable=["batch_stats"])
    # Plain cross-entropy in at least float32 (bfloat16 logits are widened; float64 kept).
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]
    correct = (jnp.argmax(logits, -1) == y).astype(logp.dtype)
    return jnp.sum(nll * m), jnp.sum(correct * m)


# One compiled program per (model, BatchNorm mode, shapes), shared by every
# LossFunction of that model: the training tracker builds a new loss each
# epoch (new BatchNorm statistics) and reuses these programs.
@functools.partial(jax.jit, static_argnums=(0, 1))
def _microbatch_loss(model, bn, params, fixed, x, y, m):
    return _microbatch_sums(model, bn, params, fixed, x, y, m)[0]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _microbatch_value_and_grad(model, bn, params, fixed, x, y, m):
    return jax.value_and_grad(lambda p: _microbatch_sums(model, bn, p, fixed, x, y, m)[0])(params)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _microbatch_hvp(model, bn, params, v, fixed, x, y, m):
    # Forward-over-reverse, as `hessian.hvp`.
    grad = jax.grad(lambda p: _microbatch_sums(model, bn, p, fixed, x, y, m)[0])
    return jax.jvp(grad, (params,), (v,))[1]


@jax.jit
def _add(a, b):
    return jax.tree.map(jnp.add, a, b)


@jax.jit
def _divide(tree, n):
    return jax.tree.map(lambda x: x / n.astype(x.dtype), tree)


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
      model, fixed, bn: the network, its non-parameter variables and the
        BatchNorm mode, for the host-driven sums (`value_and_grad`, `hvp`);
        None for `from_function` losses.
      microbatches: (images, labels, mask), each with a leading microbatch axis.
    """

    per_example_sums: Callable[[Any], tuple[jax.Array, jax.Array]]
    n: int
    info: dict[str, Any]
    batch_sums: Callable[..., tuple[jax.Array, jax.Array]] | None = None
    images: np.ndarray | None = dataclasses.field(default=None, repr=False)
    labels: np.ndarray | None = dataclasses.field(default=None, repr=False)
    model: nn.Module | None = dataclasses.field(default=None, repr=False)
    fixed: dict[str, Any] | None = dataclasses.field(default=None, repr=False)
    bn: str = "eval"
    microbatches: tuple[jax.Array, jax.Array, jax.Array] | None = dataclasses.field(default=None, repr=False)

    def __call__(self, params: Any) -> jax.Array:
        return self.per_example_sums(params)[0] / self.n

    def accuracy(self, params: Any) -> jax.Array:
        """Fraction of the subset classified correctly."""
        return self.per_example_sums(params)[1] / self.n

    # -- host-driven sums: one compiled call per microbatch, summed in Python.
    # On XLA:CPU a convolution's gradient inside a loop (the `lax.scan` of
    # `__call__`) is about 10x slower than outside one (docs/DESIGN.md), so
    # the measures take gradients and Hessian-vector products through these
    # when their loops run on the host (`driver.host_loops()`). Not traceable.

    @property
    def summable(self) -> bool:
        """Whether the host-driven sums below go microbatch by microbatch (False: one compiled call)."""
        return self.model is not None and self.microbatches is not None

    def _host_sum(self, per_batch: Callable, *args: Any) -> Any:
        xs, ys, masks = self.microbatches
        total = None
        for i in range(xs.shape[0]):
            part = per_batch(self.model, self.bn, *args, self.fixed, xs[i], ys[i], masks[i])
            total = part if total is None else _add(total, part)
        return _divide(total, jnp.asarray(self.n))

    def value(self, params: Any) -> jax.Array:
        """L(params), host-driven (see above)."""
        if not self.summable:
            return _jit_once(self, "value", lambda: jax.jit(self))(params)
        return self._host_sum(_microbatch_loss, params)

    def value_and_grad(self, params: Any) -> tuple[jax.Array, Any]:
        """(L(params), ∇L(params)), host-driven (see above)."""
        if not self.summable:
            return _jit_once(self, "value_and_grad", lambda: jax.jit(jax.value_and_grad(self)))(params)
        return self._host_sum(_microbatch_value_and_grad, params)

    def hvp(self, params: Any, v: Any) -> Any:
        """H(params)·v, host-driven (see above)."""
        if not self.summable:
            hvp = lambda p, t: jax.jvp(jax.grad(self), (p,), (t,))[1]  # noqa: E731
            return _jit_once(self, "hvp", lambda: jax.jit(hvp))(params, v)
        return self._host_sum(_microbatch_hvp, params, v)

    def chunks(self, m: int) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The subset cut into consecutive chunks of m examples: (images, labels, mask), leading axis = chunk.

        For m-sharpness (Foret et al. 2021; Andriushchenko & Flammarion 2022),
        where the perturbation is found and applied per chunk of m examples.
        The last chunk is padded and masked when m does not divide n.
        """
        self._check_chunk_size(m)
        return tuple(jnp.asarray(a) for a in _microbatches(self.images, self.labels, m))

    def chunk_losses(self, m: int) -> list["LossFunction"]:
        """The same chunks as `chunks(m)`, each as its own LossFunction (for host-driven m-sharpness)."""
        self._check_chunk_size(m)
        if self.model is None:
            raise ValueError("host-driven m-sharpness needs a loss built by make_loss_fn")
        return [
            make_loss_fn(
                self.model, {**self.fixed, "params": None}, self.images[start : start + m],
                self.labels[start : start + m], batch_size=self.info["batch_size"], bn=self.bn,
                subset=f"{self.info['subset']}[{start}:{min(start + m, self.n)}]",
            )
            for start in range(0, self.n, m)
        ]  # fmt: skip

    def _check_chunk_size(self, m: int) -> None:
        if self.batch_sums is None:
            raise ValueError("m-sharpness needs a loss built by make_loss_fn (it must know its examples)")
        if not 1 <= m <= self.n:
            raise ValueError(f"m must be between 1 and the subset size {self.n} (got {m})")


def _jit_once(loss_fn: LossFunction, name: str, make: Callable[[], Callable]) -> Callable:
    """A compiled function cached on the (frozen) loss object, so repeated host calls compile once."""
    cache = loss_fn.__dict__.setdefault("_compiled", {})
    if name not in cache:
        cache[name] = make()
    return cache[name]


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

    def batch_sums(params, x, y, m):
        return _microbatch_sums(model, bn, params, fixed, x, y, m)

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
        per_example_sums=per_example_sums, n=n, info=info, batch_sums=batch_sums, images=images, labels=labels,
        model=model, fixed=fixed, bn=bn, microbatches=(xs, ys, masks),
    )  # fmt: skip


def from_function(loss_fn: Callable[[Any], jax.Array], **info: Any) -> Callable[[Any], jax.Array]:
    """Wraps any `params -> scalar` so results can carry a description (`info`)."""
    return LossFunction(per_example_sums=lambda p: (loss_fn(p), jnp.nan), n=1, info=dict(info))


def info_of(loss_fn: Callable) -> dict[str, Any]:
    """The description of a loss function built here, or {} for any other callable."""
    return dict(getattr(loss_fn, "info", {}))
