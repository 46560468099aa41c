"""Adapters: a linen module, an NNX module or a plain function on fixed data, as the geometry oracle.

`make_loss_fn` is the one entry point. It returns a `loss.LossFunction`
whose static kernel says how one microbatch becomes (Σ loss, Σ correct):

* a linen module with its variables — with or without BatchNorm state, with
  or without a `train` argument (read from the signature of `__call__`);
* an NNX module (`flax.nnx`), split into its graph and state with
  `nnx.split`; its parameters are `nnx.state(model, nnx.Param)`;
* a plain function `fn(params, batch)` giving one loss per example (shape
  (B,)) or the mean over the batch (a scalar; then it is evaluated one
  example at a time under `vmap`, so the padded examples can be masked).

The per-example loss of a model is any `loss(outputs, targets)`, default
`optax.softmax_cross_entropy_with_integer_labels`; a least-squares loss
½‖f(x) − y‖² is `lambda out, y: 0.5 * jnp.sum((out - y) ** 2, -1)`.
Preprocessing is an argument: inputs reach the model as given (uint8 stays
uint8) unless `preprocess` is set (the CIFAR application passes
`jaxsam.data.normalize`).

Flax is imported here only, and only when a flax module is given.

    loss_fn = make_loss_fn(model, variables, images, labels, preprocess=normalize)
    loss_fn = make_loss_fn(nnx_model, None, x, y, loss=squared_error, batch_size=64)
    loss_fn = make_loss_fn(fn, batch=(x, y))
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsam.geometry import loss as loss_lib


DEFAULT_LOSS = optax.softmax_cross_entropy_with_integer_labels


@dataclasses.dataclass(frozen=True)
class LinenKernel:
    """One microbatch of a linen module: apply, per-example loss, masked sums.

    Attributes:
      module: the flax.linen module (hashable: it is static).
      train: the value of its `train` argument, or None when it has none.
      mutable: BatchNorm in training mode: statistics of each microbatch,
        running statistics not updated (`mutable=["batch_stats"]`, discarded).
      loss: per-example loss(outputs, targets).
      preprocess: inputs -> model inputs, or None.
    """

    module: Any
    train: bool | None
    mutable: bool
    loss: Callable
    preprocess: Callable | None
    summable = True

    def prepare(self, params, state):
        return state

    def outputs(self, params, state, inputs):
        x = inputs if self.preprocess is None else self.preprocess(inputs)
        kwargs = {} if self.train is None else {"train": self.train}
        variables = {"params": params, **(state or {})}
        if self.mutable:
            return self.module.apply(variables, x, mutable=["batch_stats"], **kwargs)[0]
        return self.module.apply(variables, x, **kwargs)

    def sums(self, params, state, batch, mask):
        inputs, targets = batch
        return loss_lib.reduce_outputs(self.loss, self.outputs(params, state, inputs), targets, mask)


@dataclasses.dataclass(frozen=True)
class NnxKernel:
    """One microbatch of an NNX module: merge the graph with (params, state), call, masked sums.

    The merged copy is put in eval or train mode (`.eval()` / `.train()`);
    train-mode BatchNorm statistics it computes are discarded.
    """

    graphdef: Any
    train: bool
    loss: Callable
    preprocess: Callable | None
    summable = True

    def prepare(self, params, state):
        return state

    def sums(self, params, state, batch, mask):
        inputs, targets = batch
        x = inputs if self.preprocess is None else self.preprocess(inputs)
        return loss_lib.reduce_outputs(self.loss, _nnx_outputs(self.graphdef, self.train, params, state, x), targets,
                                       mask)  # fmt: skip


@functools.partial(jax.jit, static_argnums=(0, 1))
def _nnx_outputs(graphdef, train, params, state, x):
    # Merged inside a program of its own: NNX lets a module mutate its
    # variables (train-mode BatchNorm statistics) only in the trace that
    # created them, and the enclosing scan or jit may close over the state.
    from flax import nnx

    model = nnx.merge(graphdef, params, state)
    model.train() if train else model.eval()
    return model(x)


@dataclasses.dataclass(frozen=True)
class FunctionKernel:
    """One microbatch of a plain `fn(params, batch)`: per-example values, or a batch mean evaluated per example."""

    fn: Callable
    summable = True

    def prepare(self, params, state):
        return state

    def sums(self, params, state, batch, mask):
        # Which of the two the function is, from its output's shape (abstract evaluation, nothing compiled).
        if jax.eval_shape(self.fn, params, batch).shape == ():
            one = lambda example: self.fn(params, jax.tree.map(lambda a: a[None], example))  # noqa: E731
            per = jax.vmap(one)(batch)
        else:
            per = jnp.asarray(self.fn(params, batch))
        if per.shape != mask.shape:
            raise ValueError(f"fn(params, batch) gave shape {per.shape} for a microbatch of {mask.shape[0]}: "
                             "give one loss per example, or the mean over the batch")  # fmt: skip
        per = per.astype(jnp.promote_types(per.dtype, jnp.float32))
        return jnp.sum(per * mask), jnp.full((), jnp.nan, per.dtype)


def _is_linen(model: Any) -> bool:
    linen = sys.modules.get("flax.linen")
    return linen is not None and isinstance(model, linen.Module)


def _is_nnx(model: Any) -> bool:
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(model, nnx.Module)


def _has_train(module: Any) -> bool:
    try:
        return "train" in inspect.signature(type(module).__call__).parameters
    except (TypeError, ValueError):
        return False


def _targets(targets: Any) -> np.ndarray:
    targets = np.asarray(targets)
    # Integer labels as int32, whatever they were stored as (uint8, int64).
    return targets.astype(np.int32) if np.issubdtype(targets.dtype, np.integer) else targets


def check_integer_labels(targets: Any, n: int) -> None:
    """Refuses targets the default loss (softmax cross-entropy with integer labels) cannot take."""
    targets = np.asarray(targets)
    if not np.issubdtype(targets.dtype, np.integer) or targets.shape != (n,):
        raise ValueError(
            f"the default loss, softmax cross-entropy with integer labels, takes class indices of shape ({n},); got "
            f"{targets.dtype} targets of shape {targets.shape}: pass integer labels (one-hot: y.argmax(-1)), or "
            "another per-example loss, e.g. loss=optax.softmax_cross_entropy for one-hot or soft targets"
        )


def check_train_mode_batches(n: int, batch_size: int) -> None:
    """Refuses train-mode BatchNorm over microbatches that do not divide the n examples.

    In train mode each microbatch is normalized by its own statistics, so the
    zero rows that pad a short last microbatch would enter its mean and
    variance and silently change every loss of that microbatch.

    Raises:
      ValueError: one line naming batch sizes that divide n.
    """
    size = min(int(batch_size), int(n))
    if size >= 1 and n % size:
        divisors = [d for d in range(size, 0, -1) if n % d == 0][:2]
        raise ValueError(
            f"bn='train' normalizes each microbatch by its own statistics, so batch_size={batch_size} must divide "
            f"the {n} examples (padding rows would enter the last one's statistics): use batch_size="
            f"{' or '.join(map(str, divisors))}, or the first {n - n % size} examples"
        )


def make_loss_fn(
    model: Any,
    variables: Any = None,
    inputs: Any = None,
    targets: Any = None,
    *,
    batch: Any = None,
    loss: Callable = DEFAULT_LOSS,
    preprocess: Callable | None = None,
    batch_size: int = 500,
    bn: str = "eval",
    subset: str = "",
) -> loss_lib.LossFunction:
    """The measured loss of `model` on fixed data, as a function of the parameters (see the module docstring).

    Args:
      model: a flax.linen module, a flax.nnx module, or a function
        `fn(params, batch)` (per-example losses (B,) or the batch mean).
      variables: linen: its variables; everything except "params" (e.g.
        BatchNorm running statistics) stays fixed. NNX and functions: None.
      inputs, targets: the examples (leading axis N); for a function they
        form `batch = (inputs, targets)` unless `batch` is given.
      batch: for a function, any pytree of arrays with a leading axis N.
      loss: per-example `loss(outputs, targets)` of a model (entries past the
        example axis are summed); default softmax cross-entropy with integer labels.
      preprocess: applied to a model's inputs inside the compiled program
        (e.g. `jaxsam.data.normalize` for CIFAR uint8 pixels); None: as given.
      batch_size: microbatch size; N need not divide by it.
      bn: "eval" (running statistics) or "train" (each microbatch's own
        statistics; the loss then depends on the microbatch size, which must
        divide N). For a linen module without a `train` argument only "eval".
      subset: a name recorded in `info` (e.g. "train[:4096]").

    Returns:
      A `LossFunction`: callable on params, with `.value_and_grad`, `.hvp`,
      `.accuracy` (classification) and `.info`.

    Example:
      >>> import jax.numpy as jnp, numpy as np
      >>> fn = lambda w, batch: 0.5 * (batch[0] @ w - batch[1]) ** 2  # least squares, per example
      >>> x, y = np.eye(3), np.ones(3)
      >>> loss_fn = make_loss_fn(fn, batch=(x, y), batch_size=2)
      >>> float(loss_fn(jnp.zeros(3)))
      0.5
    """
    if bn not in loss_lib.BN_MODES:
        raise ValueError(f"unknown BatchNorm mode bn={bn!r}: use 'eval' (running statistics) or 'train'")
    info = {"subset": subset, "bn": bn}
    if _is_linen(model) or _is_nnx(model):
        if inputs is None or targets is None:
            raise ValueError("a model needs inputs and targets (make_loss_fn(model, variables, inputs, targets))")
        n_in, n_out = np.shape(inputs)[:1], np.shape(targets)[:1]
        if n_in != n_out or not n_in or n_in[0] == 0:
            raise ValueError(f"need as many labels as images, at least one (got {n_in[0] if n_in else 0} images, "
                             f"{n_out[0] if n_out else 0} labels)")  # fmt: skip
        if bn == "train":
            check_train_mode_batches(n_in[0], batch_size)
        data = (np.asarray(inputs), _targets(targets))
    if _is_linen(model):
        if not isinstance(variables, dict) or "params" not in variables:
            raise ValueError("a linen module needs its variables, a dict with 'params' (model.init's result)")
        has_train = _has_train(model)
        if bn == "train" and not has_train:
            raise ValueError(f"bn='train' needs a module with a `train` argument; {type(model).__name__} has none")
        state = {k: v for k, v in variables.items() if k != "params"}
        if loss is DEFAULT_LOSS:
            check_integer_labels(targets, len(data[1]))
        mutable = bn == "train" and bool(jax.tree.leaves(state.get("batch_stats", {})))
        kernel = LinenKernel(model, (bn == "train") if has_train else None, mutable, loss, preprocess)
        return loss_lib.from_data(kernel, data, state, batch_size=batch_size, info=info)
    if _is_nnx(model):
        from flax import nnx

        if variables is not None:
            raise ValueError("an NNX module holds its own variables: pass variables=None")
        if loss is DEFAULT_LOSS:
            check_integer_labels(targets, len(data[1]))
        graphdef, _, state = nnx.split(model, nnx.Param, ...)
        kernel = NnxKernel(graphdef, bn == "train", loss, preprocess)
        return loss_lib.from_data(kernel, data, state, batch_size=batch_size, info=info)
    if not callable(model):
        raise TypeError(f"make_loss_fn takes a flax module or a function fn(params, batch), got {type(model).__name__}")
    if preprocess is not None:
        raise ValueError("preprocess applies to a model's inputs; a function fn(params, batch) prepares its own batch")
    if bn != "eval":
        raise ValueError("bn applies to flax modules; a function fn(params, batch) has no BatchNorm mode")
    if variables is not None:
        raise ValueError("a function fn(params, batch) takes its parameters when called: pass variables=None")
    if batch is None:
        if inputs is None:
            raise ValueError("a function needs its data: make_loss_fn(fn, batch=...) or make_loss_fn(fn, None, x, y)")
        batch = (inputs, targets) if targets is not None else inputs
    info.pop("bn")
    return loss_lib.from_data(FunctionKernel(model), jax.tree.map(np.asarray, batch), None, batch_size=batch_size,
                              info=info)  # fmt: skip
