"""The oracle: a loss over fixed data, as a pytree, summed exactly over fixed-size microbatches.

Every geometry measure is an algorithm over three calls of one loss — its
value, its value and gradient, and a Hessian-vector product. `LossFunction`
is that loss. It is a JAX pytree whose leaves are the data (the examples cut
into microbatches, the mask of the padded last one, the number of examples,
fixed model state such as BatchNorm statistics) and whose static part is how
one microbatch becomes a loss (the model's apply function, the per-example
loss, the preprocessing). So a compiled function that takes a `LossFunction`
as an argument is compiled once per (model, loss, shapes): a second call on
other data or other model state of the same shapes compiles nothing, and no
example is ever a compile-time constant of the program.

The value is mean over the N examples, sum / N — not a mean of per-batch means
— with the last microbatch padded and masked, so memory does not grow with N
(the convention of Keskar et al. 2017, Foret et al. 2021 and Andriushchenko
et al. 2023 for post-hoc measures: a fixed subset, no augmentation, eval-mode
BatchNorm).

    loss_fn = make_loss_fn(model, variables, images, labels, batch_size=256)   # linen
    loss_fn = make_loss_fn(nnx_model, None, x, y, loss=squared_error)           # NNX
    loss_fn = make_loss_fn(lambda params, batch: ..., batch=(x, y))              # any function
    loss_fn(params)                   # scalar, traceable
    loss_fn.value_and_grad(params)    # (L, ∇L), summed microbatch by microbatch
    loss_fn.hvp(params, v)            # H v, forward-over-reverse
    loss_fn.accuracy(params)          # classification: argmax(outputs) == integer targets
    loss_fn.info                      # {"subset": ..., "n": ..., "batch_size": ..., "bn": ...}

The methods above are traceable (each is one `lax.scan` over microbatches).
Where a measure's loop runs — inside one compiled program or driven from
Python, one compiled call per microbatch — is the executor's choice
(`driver`), not the loss's.

Model adapters (linen, NNX, plain functions) live in `adapters`; this module
does not import flax.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

BN_MODES = ("eval", "train")


class _Meta:
    """Host-side description of a loss (`n`, `info`), carried in the pytree's static part.

    Every `_Meta` compares equal, so two losses that differ only in their
    description (another subset name, another N with the same padded shape)
    share compiled programs. Traced code never reads it: the count used for
    sum / N is the `count` leaf. (So a loss *returned* by a compiled function
    would carry the description of the first one traced: return its leaves.)
    """

    __slots__ = ("n", "info")

    def __init__(self, n: int, info: dict[str, Any]):
        self.n, self.info = n, info

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Meta)

    def __hash__(self) -> int:
        return 0


def _add(a: Any, b: Any) -> Any:
    return jax.tree.map(jnp.add, a, b)


def _divide(tree: Any, count: jax.Array) -> Any:
    return jax.tree.map(lambda x: x / count.astype(x.dtype), tree)


@jax.tree_util.register_pytree_node_class
class LossFunction:
    """`loss_fn(params) -> scalar`: the mean loss over fixed data (see the module docstring).

    Build one with `make_loss_fn` (or `from_function` for any `params ->
    scalar`). Attributes:
      kernel: static; `kernel.sums(params, state, batch, mask) -> (loss sum,
        correct count)` of one microbatch, `kernel.prepare(params, state)`
        (state recomputed once per evaluation, e.g. recalibrated BatchNorm
        statistics) and `kernel.summable` (whether gradients may be summed
        microbatch by microbatch: False when `prepare` depends on params).
      batches: pytree of arrays shaped (num_batches, batch_size, ...), or None
        for a loss without data (`from_function`).
      mask: (num_batches, batch_size) float32, 1 for real examples, 0 for padding.
      count: the number of examples N as an array (the divisor of sum / N).
      state: fixed model state (e.g. {"batch_stats": ...}), a pytree.
      n, info: host-side description (`info` is copied into every result record).
    """

    __slots__ = ("kernel", "batches", "mask", "count", "state", "_meta")

    def __init__(self, kernel: Any, batches: Any, mask: Any, count: Any, state: Any, *, n: int, info: dict):
        self.kernel, self.batches, self.mask, self.count, self.state = kernel, batches, mask, count, state
        self._meta = _Meta(int(n), dict(info))

    # -- pytree: the data are leaves, how to compute is static.

    def tree_flatten(self):
        return (self.batches, self.mask, self.count, self.state), (self.kernel, self._meta)

    @classmethod
    def tree_unflatten(cls, aux, children):
        loss = object.__new__(cls)
        loss.batches, loss.mask, loss.count, loss.state = children
        loss.kernel, loss._meta = aux
        return loss

    @property
    def n(self) -> int:
        return self._meta.n

    @property
    def info(self) -> dict[str, Any]:
        return dict(self._meta.info)

    @property
    def num_batches(self) -> int:
        """Microbatches in the data (0 for a loss without data)."""
        return 0 if self.mask is None else int(self.mask.shape[-2])

    @property
    def summable(self) -> bool:
        """Whether value, gradient and HVP are sums of per-microbatch terms (see `kernel`)."""
        return self.batches is not None and bool(getattr(self.kernel, "summable", True))

    def with_state(self, state: Any) -> "LossFunction":
        """The same loss with other fixed model state (same structure: compiled programs are reused)."""
        return LossFunction(self.kernel, self.batches, self.mask, self.count, state, n=self.n, info=self.info)

    def with_data(self, batches: Any, mask: Any, count: Any) -> "LossFunction":
        """The same loss (kernel, state, description) on other microbatches."""
        return LossFunction(self.kernel, batches, mask, count, self.state, n=self.n, info=self.info)

    @property
    def data(self) -> tuple[Any, Any, Any]:
        """(batches, mask, count): the leaves that `chunked` gives a leading chunk axis (not the state)."""
        return self.batches, self.mask, self.count

    def chunk(self, j: Any) -> "LossFunction":
        """Chunk j of a `chunked` loss, as a loss of its own; `j` may be traced."""
        take = lambda a: lax.dynamic_index_in_dim(a, j, keepdims=False)  # noqa: E731
        return self.with_data(*jax.tree.map(take, self.data))

    # -- one microbatch.

    def microbatch(self, i: Any) -> tuple[Any, jax.Array]:
        """(batch i, its mask); `i` may be traced."""
        take = lambda a: lax.dynamic_index_in_dim(a, i, keepdims=False)  # noqa: E731
        return jax.tree.map(take, self.batches), take(self.mask)

    def microbatch_sums(self, params: Any, i: Any, state: Any = None) -> tuple[jax.Array, jax.Array]:
        """(Σ loss, Σ correct) over microbatch i's real examples; `state` defaults to `prepare`'s."""
        state = self.kernel.prepare(params, self.state) if state is None else state
        batch, mask = self.microbatch(i)
        return self.kernel.sums(params, state, batch, mask)

    # -- the whole subset (traceable).

    def sums(self, params: Any) -> tuple[jax.Array, jax.Array]:
        """(Σ loss, Σ correct) over all examples, one `lax.scan` over microbatches."""
        if self.batches is None:
            return self.kernel.sums(params, self.state, None, None)
        state = self.kernel.prepare(params, self.state)

        def body(total, xs):
            return _add(total, self.kernel.sums(params, state, *xs)), None

        first = jax.tree.map(lambda a: a[0], (self.batches, self.mask))
        shapes = jax.eval_shape(lambda b, m: self.kernel.sums(params, state, b, m), *first)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        return lax.scan(body, zeros, (self.batches, self.mask))[0]

    per_example_sums = sums  # the name of earlier versions

    def __call__(self, params: Any) -> jax.Array:
        return self.value(params)

    def value(self, params: Any) -> jax.Array:
        """L(params) = Σ loss / N."""
        return _divide(self.sums(params)[0], self.count)

    def accuracy(self, params: Any) -> jax.Array:
        """Fraction of the examples classified correctly (NaN where the loss is not a classification)."""
        return self.value_and_accuracy(params)[1]

    def value_and_accuracy(self, params: Any) -> tuple[jax.Array, jax.Array]:
        """(L(params), accuracy) from one pass."""
        return _divide(self.sums(params), self.count)

    def value_and_grad(self, params: Any) -> tuple[jax.Array, Any]:
        """(L, ∇L): per-microbatch gradients summed in a `lax.scan` (memory of one microbatch)."""
        if not self.summable:
            return jax.value_and_grad(self.value)(params)
        return self._scan_sum(lambda p, i, s: jax.value_and_grad(lambda q: self.microbatch_sums(q, i, s)[0])(p),
                              params)  # fmt: skip

    def hvp(self, params: Any, v: Any) -> Any:
        """H(params)·v, forward-over-reverse (`jax.jvp` of `jax.grad`), summed over microbatches."""
        if not self.summable:
            return jax.jvp(jax.grad(self.value), (params,), (v,))[1]

        def product(p, i, s):
            grad = jax.grad(lambda q: self.microbatch_sums(q, i, s)[0])
            return jax.jvp(grad, (p,), (v,))[1]

        return self._scan_sum(product, params)

    def _scan_sum(self, part: Callable, params: Any) -> Any:
        """Σ_i part(params, i, state) / N over microbatches i, in order (as the host-driven sums)."""
        state = self.kernel.prepare(params, self.state)
        shapes = jax.eval_shape(part, params, 0, state)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        def body(total, i):
            return _add(total, part(params, i, state)), None

        total, _ = lax.scan(body, zeros, jnp.arange(self.num_batches))
        return _divide(total, self.count)

    # -- m-sharpness.

    def chunked(self, m: int) -> "LossFunction":
        """The examples cut into consecutive chunks of m, as one loss with a leading chunk axis on its leaves.

        For m-sharpness (Foret et al. 2021; Andriushchenko & Flammarion 2022),
        where the perturbation is found and applied per chunk: `jax.tree.map(lambda
        a: a[j], chunked.data)` (or `chunked.chunk(j)`) is chunk j's own loss;
        the fixed model state is shared, not stacked. Each chunk is cut into microbatches of
        min(batch_size, m); the last chunk is padded and masked when m does
        not divide N.
        """
        if self.batches is None:
            raise ValueError("m-sharpness needs a loss built by make_loss_fn (it must know its examples)")
        if not 1 <= m <= self.n:
            raise ValueError(f"m must be between 1 and the subset size {self.n} (got {m})")
        flat = jax.tree.map(lambda a: np.asarray(a).reshape((-1,) + a.shape[2:])[: self.n], self.batches)
        size = min(int(self.info.get("batch_size", m)), m)
        if self.info.get("bn") == "train" and (self.n % m or m % size):
            raise ValueError(f"bn='train' normalizes each microbatch by its own statistics, so m={m} must divide the "
                             f"{self.n} examples and be a multiple of the microbatch size {size} (padding rows "
                             "would enter a microbatch's statistics)")  # fmt: skip
        chunks = [jax.tree.map(lambda a: a[start : start + m], flat) for start in range(0, self.n, m)]
        parts = [_microbatches(chunk, size, per=m) for chunk in chunks]
        batches = jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *[p[0] for p in parts])
        mask = jnp.asarray(np.stack([p[1] for p in parts]))
        count = jnp.asarray([p[2] for p in parts], jnp.int32)
        info = {**self.info, "m": m}
        return LossFunction(self.kernel, batches, mask, count, self.state, n=m, info=info)


def _microbatches(batch: Any, batch_size: int, per: int | None = None) -> tuple[Any, np.ndarray, int]:
    """(batch reshaped to (num_batches, batch_size, ...), mask, n), padded with masked zeros.

    `per`: pad to this many examples (the chunks of m-sharpness all get the
    shape of a full chunk), else to a multiple of batch_size.
    """
    leaves = jax.tree.leaves(batch)
    n = int(leaves[0].shape[0])
    total = per if per is not None else n
    num_batches = -(-total // batch_size)
    pad = num_batches * batch_size - n
    mask = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)]).reshape(num_batches, batch_size)

    def cut(a):
        a = np.asarray(a)
        if pad:
            a = np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)])
        return a.reshape((num_batches, batch_size) + a.shape[1:])

    return jax.tree.map(cut, batch), mask, n


def from_data(
    kernel: Any, batch: Any, state: Any = None, *, batch_size: int = 500, info: dict | None = None
) -> LossFunction:
    """A `LossFunction` of `kernel` over `batch` (a pytree of arrays with a leading example axis).

    The adapters (`make_loss_fn`) call this; use it directly for a kernel of
    your own: any hashable object with `sums(params, state, batch, mask) ->
    (Σ loss, Σ correct)` over one microbatch, `prepare(params, state) ->
    state` and `summable`.
    """
    leaves = jax.tree.leaves(batch)
    if not leaves:
        raise ValueError("the data have no arrays")
    sizes = {int(np.shape(a)[0]) if np.ndim(a) else -1 for a in leaves}
    if len(sizes) != 1 or min(sizes) <= 0:
        raise ValueError(f"every data array needs the same number of examples, at least one (got sizes {sorted(sizes)})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    n = sizes.pop()
    batch_size = min(int(batch_size), n)
    batches, mask, _ = _microbatches(batch, batch_size)
    info = {"subset": f"{n} examples", "n": n, "batch_size": batch_size, **(info or {})}
    info["subset"] = info["subset"] or f"{n} examples"
    return LossFunction(kernel, jax.tree.map(jnp.asarray, batches), jnp.asarray(mask), jnp.asarray(n, jnp.int32),
                        state, n=n, info=info)  # fmt: skip


class _Whole:
    """Kernel of a loss without data: `fn(params) -> scalar` (`from_function`)."""

    summable = False

    def __init__(self, fn: Callable[[Any], jax.Array]):
        self.fn = fn

    def prepare(self, params, state):
        return state

    def sums(self, params, state, batch, mask):
        value = jnp.asarray(self.fn(params))
        return value, jnp.full((), jnp.nan, jnp.promote_types(value.dtype, jnp.float32))

    def __eq__(self, other):
        return isinstance(other, _Whole) and other.fn is self.fn

    def __hash__(self):
        return hash(self.fn)


def from_function(loss_fn: Callable[[Any], jax.Array], **info: Any) -> LossFunction:
    """Any `params -> scalar` as a `LossFunction` (no data, no accuracy), with a description `info`.

    The function is the program: its arrays are constants of it. For data
    passed as arguments (compiled once per shape), use `make_loss_fn(fn,
    batch=...)` with `fn(params, batch)`.
    """
    if isinstance(loss_fn, LossFunction):
        return loss_fn
    return LossFunction(_Whole(loss_fn), None, None, jnp.asarray(1, jnp.int32), None, n=1, info=info)


def as_loss(loss_fn: Any) -> LossFunction:
    """The oracle of `loss_fn`: itself if it is a `LossFunction`, else `from_function(loss_fn)`."""
    return loss_fn if isinstance(loss_fn, LossFunction) else from_function(loss_fn)


def info_of(loss_fn: Any) -> dict[str, Any]:
    """The description of a loss function built here, or {} for any other callable."""
    return dict(getattr(loss_fn, "info", {}))


def reduce_outputs(loss: Callable, outputs: jax.Array, targets: Any, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(Σ per-example loss, Σ correct) over one microbatch, masked.

    `loss(outputs, targets)` gives one value per example or per output entry;
    entries past the example axis are summed (a least-squares loss ½Σ(f − y)²
    per example). Outputs are widened to at least float32 (bfloat16 logits).
    "Correct" is argmax(outputs) == targets for integer targets with one
    fewer axis than the outputs, else NaN (no accuracy).
    """
    outputs = outputs.astype(jnp.promote_types(outputs.dtype, jnp.float32))
    per = jnp.asarray(loss(outputs, targets))
    per = per.reshape(per.shape[:1] + (-1,)).sum(-1) if per.ndim > 1 else per
    per = per.astype(jnp.promote_types(per.dtype, jnp.float32))
    if per.shape != mask.shape:
        raise ValueError(f"the loss gave shape {per.shape} for a microbatch of {mask.shape[0]}: it must give one "
                         "value per example (or per output entry, summed per example)")  # fmt: skip
    loss_sum = jnp.sum(per * mask)
    targets = jnp.asarray(targets)
    if jnp.issubdtype(targets.dtype, jnp.integer) and outputs.ndim == targets.ndim + 1:
        correct = jnp.sum((jnp.argmax(outputs, -1) == targets).astype(per.dtype) * mask)
    else:
        correct = jnp.full((), jnp.nan, per.dtype)
    return loss_sum, correct


def make_loss_fn(*args: Any, **kwargs: Any) -> LossFunction:
    """The measured loss of a model (linen, NNX) or of a function on fixed data; see `adapters.make_loss_fn`."""
    from jaxsam.geometry import adapters

    return adapters.make_loss_fn(*args, **kwargs)


__all__ = ["LossFunction", "BN_MODES", "make_loss_fn", "from_function", "from_data", "as_loss", "info_of",
           "reduce_outputs"]  # fmt: skip
