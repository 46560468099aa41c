"""BatchNorm recalibration (linen adapter): a loss whose running statistics are recomputed for each parameter point.

`make_loss_fn` measures with the running statistics of the trained network,
which do not match perturbed or interpolated weights (they make the midpoint
of an interpolation between two BatchNorm networks look far worse than it
is). `make_recalibrated_loss_fn` gives the eval-mode loss with statistics
recomputed for the parameters it is given, from calibration images — what
PyTorch's BatchNorm does with momentum=None (SWA's `update_bn`). The
calibration images are leaves of the loss (arguments of every program, not
constants), like its data.

    loss_fn = make_recalibrated_loss_fn(model, variables, images, labels, calib_images)
    interpolate(loss_fn, params_a, params_b)       # each point with its own statistics
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxsam.geometry import loss as loss_lib
from jaxsam.geometry.adapters import DEFAULT_LOSS, LinenKernel, _has_train, _targets

CALIB_VARIANCE = "mean over calibration batches of the per-batch biased variance (flax BatchNorm train mode)"


def _batch_stats(module: Any, preprocess: Callable | None, params: Any, fixed: Any, stored: Any, xs: jax.Array):
    """The statistics of every train-mode BatchNorm, averaged over the calibration batches xs (k, b, ...)."""
    import flax.linen as nn
    from flax import traverse_util

    flat = traverse_util.flatten_dict(stored)
    zeros = traverse_util.unflatten_dict({key: jnp.zeros_like(v) for key, v in flat.items()})
    momenta: dict[tuple[str, ...], float] = {}  # filled while tracing: which layers computed batch statistics

    def one_batch(x):
        seen: dict[tuple[str, ...], float] = {}

        def interceptor(next_fun, args, kwargs, context):
            layer = context.module
            if isinstance(layer, nn.BatchNorm) and context.method_name == "__call__":
                use_running = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
                use_running = layer.use_running_average if use_running is None else use_running
                if not use_running:
                    path = tuple(layer.path)
                    if path in seen:
                        raise ValueError(f"BatchNorm {'/'.join(path)} is called more than once per forward pass")
                    seen[path] = float(layer.momentum)
            return next_fun(*args, **kwargs)

        inputs = x if preprocess is None else preprocess(x)
        with nn.intercept_methods(interceptor):
            _, updates = module.apply({**fixed, "params": params, "batch_stats": zeros}, inputs, train=True,
                                      mutable=["batch_stats"])  # fmt: skip
        momenta.update(seen)
        new = traverse_util.flatten_dict(updates["batch_stats"])
        # new = momentum * 0 + (1 - momentum) * batch statistic
        return {key: (new[key] / (1 - seen[key[:-1]])).astype(v.dtype) if key[:-1] in seen else jnp.zeros_like(v)
                for key, v in flat.items()}  # fmt: skip

    def body(total, x):
        stats = one_batch(x)
        return {key: total[key] + stats[key] for key in total}, None

    total, _ = jax.lax.scan(body, {key: jnp.zeros_like(v) for key, v in flat.items()}, xs)
    if not momenta:
        raise ValueError("no BatchNorm computed batch statistics in training mode: nothing to recalibrate")
    k = xs.shape[0]
    return traverse_util.unflatten_dict({key: total[key] / k if key[:-1] in momenta else flat[key] for key in flat})


def _calibration(variables: Any, calib_images: Any, batch_size: int, calib_batches: int | None):
    if "batch_stats" not in variables or not jax.tree.leaves(variables["batch_stats"]):
        raise ValueError("variables have no 'batch_stats': nothing to recalibrate (use make_loss_fn)")
    calib_images = np.asarray(calib_images)
    m = int(calib_images.shape[0])
    if m == 0:
        raise ValueError("need at least one calibration image")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    batch_size = min(int(batch_size), m)
    available = m // batch_size
    k = available if calib_batches is None else int(calib_batches)
    if not 1 <= k <= available:
        raise ValueError(
            f"calib_batches={calib_batches} batches of {batch_size} need {k * batch_size} calibration images "
            f"(have {m}: at most {available} batches)"
        )
    xs = jnp.asarray(calib_images[: k * batch_size].reshape((k, batch_size) + calib_images.shape[1:]))
    info = {"calib_n": k * batch_size, "calib_batch_size": batch_size, "calib_batches": k}
    return xs, info


class _BatchStatsFn:
    """`params -> batch_stats` of `make_batch_stats_fn` (its arrays are held here, its info in `calib_info`)."""

    def __init__(self, module, preprocess, fixed, stored, xs, calib_info):
        self._args = (module, preprocess)
        self._arrays = (fixed, stored, xs)
        self.calib_info = calib_info

    def __call__(self, params: Any) -> Any:
        return _batch_stats(*self._args, params, *self._arrays)


def make_batch_stats_fn(
    model: Any,
    variables: dict[str, Any],
    calib_images: np.ndarray,
    *,
    batch_size: int = 500,
    calib_batches: int | None = None,
    preprocess: Callable | None = None,
) -> Callable[[Any], Any]:
    """`params -> batch_stats`: BatchNorm statistics recomputed for the given parameters.

    The calibration images are cut into `calib_batches` batches of
    `batch_size` (default: as many full batches as fit; the remainder is
    dropped so all batches have the same size). The model runs in training
    mode on each batch (`lax.scan`, running statistics not used), and every
    BatchNorm's statistics are the cumulative average over the batches — what
    PyTorch's BatchNorm does with momentum=None (SWA's `update_bn`):

      mean = (1/K) Σ_k mean_k,   var = (1/K) Σ_k var_k,

    where mean_k and var_k are the batch statistics flax computes in train
    mode: var_k is the biased (1/m) variance over the batch's pixels. With
    equal-size batches the mean is exactly the mean over all calibration
    pixels; the variance is the average within-batch variance (it leaves out
    the spread of the batch means, as PyTorch's estimate does; PyTorch also
    stores the unbiased m/(m−1) version, a negligible difference for m = batch
    × H × W). Layers after a BatchNorm see activations normalized with batch
    statistics, as in training.

    The per-batch statistics are read from flax's own update
    momentum·old + (1 − momentum)·batch with the old statistics set to zero,
    divided by (1 − momentum) of that layer (read from the module), so any
    momentum works. BatchNorm layers that use running averages even in
    training mode keep their stored statistics. A BatchNorm module called more
    than once per forward pass is refused.

    Args:
      model: a linen module called as `model.apply(variables, x, train=True, mutable=["batch_stats"])`.
      variables: its variables; "batch_stats" gives the tree structure (and the
        statistics of layers that are not recomputed), other collections stay fixed.
      calib_images: calibration inputs, given to the model as they are unless `preprocess` is set.
      batch_size: calibration batch size.
      calib_batches: number of batches (default: all full batches).
      preprocess: applied to each calibration batch (e.g. `jaxsam.data.normalize`).

    Returns:
      A pure, jit- and vmap-able function of the parameters, with `.calib_info`.
    """
    xs, info = _calibration(variables, calib_images, batch_size, calib_batches)
    fixed = {name: v for name, v in variables.items() if name not in ("params", "batch_stats")}
    return _BatchStatsFn(model, preprocess, fixed, variables["batch_stats"], xs, info)


@dataclasses.dataclass(frozen=True)
class RecalibratedKernel:
    """An eval-mode linen kernel whose `batch_stats` are recomputed from the parameters before the microbatches.

    Not summable: the statistics depend on the parameters, so gradients go
    through the whole loss (one compiled call per evaluation on the host).
    """

    inner: LinenKernel
    summable = False

    def prepare(self, params, state):
        stats = _batch_stats(self.inner.module, self.inner.preprocess, params, state["fixed"], state["stored"],
                             state["calib"])  # fmt: skip
        return {**state["fixed"], "batch_stats": stats}

    def sums(self, params, state, batch, mask):
        return self.inner.sums(params, state, batch, mask)


def make_recalibrated_loss_fn(
    model: Any,
    variables: dict[str, Any],
    images: np.ndarray,
    labels: np.ndarray,
    calib_images: np.ndarray,
    *,
    batch_size: int = 500,
    calib_batch_size: int | None = None,
    calib_batches: int | None = None,
    subset: str = "",
    calib_subset: str = "",
    preprocess: Callable | None = None,
    loss: Callable = DEFAULT_LOSS,
) -> loss_lib.LossFunction:
    """`make_loss_fn`'s eval-mode loss, with BatchNorm statistics recomputed for each `params`.

    `loss_fn(params)` first recomputes the running statistics for `params`
    (`make_batch_stats_fn`: train-mode passes over the calibration batches,
    cumulative average of batch means and biased batch variances, i.e.
    PyTorch's momentum=None), then evaluates the mean loss on `(images,
    labels)` in eval mode with them. It is pure, jit-able and `lax.map`-able,
    so `interpolate`, `surface_1d` and `surface_2d` use it unchanged; each
    point then costs the calibration passes plus the loss. Its `info` says
    `recalibrated: True` and describes the calibration set.

    Args:
      model, variables, images, labels, batch_size, subset, preprocess, loss:
        as `make_loss_fn` (a linen module with a `train` argument, bn="eval");
        variables["batch_stats"] is replaced at every evaluation.
      calib_images: images for the statistics (like `images`), e.g. a slice
        of the training set; `preprocess` applies to them too.
      calib_batch_size: calibration batch size (default `batch_size`); the
        statistics depend on it (the variance is a within-batch variance).
      calib_batches: number of calibration batches (default: all full batches).
      calib_subset: a name for the calibration set, recorded in `info`.

    Returns:
      A `LossFunction` with `.accuracy` (also recalibrated) and `.info`.
    """
    if not _has_train(model):
        raise ValueError(f"recalibration runs the model in training mode: {type(model).__name__} has no `train` argument")
    xs, calib_info = _calibration(variables, calib_images, batch_size if calib_batch_size is None else calib_batch_size,
                                  calib_batches)  # fmt: skip
    images, labels = np.asarray(images), _targets(labels)
    if images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise ValueError(f"need as many labels as images, at least one (got {images.shape[0]} images, "
                         f"{labels.shape[0]} labels)")  # fmt: skip
    fixed = {name: v for name, v in variables.items() if name not in ("params", "batch_stats")}
    state = {"fixed": fixed, "stored": variables["batch_stats"], "calib": xs}
    kernel = RecalibratedKernel(LinenKernel(model, False, False, loss, preprocess))
    info = {"subset": subset, "bn": "eval", "recalibrated": True,
            "calib_subset": calib_subset or f"{calib_info['calib_n']} examples", **calib_info,
            "calib_variance": CALIB_VARIANCE}  # fmt: skip
    return loss_lib.from_data(kernel, (images, labels), state, batch_size=batch_size, info=info)
