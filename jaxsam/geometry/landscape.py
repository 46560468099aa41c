"""Low-dimensional views of the loss landscape: interpolations, 1-D slices, 2-D surfaces.

* `interpolate` — the loss along the straight line between two parameter
  vectors, L((1 − t) a + t b) (Goodfellow, Vinyals & Saxe 2015, "Qualitatively
  characterizing neural network optimization problems"), e.g. initialization
  -> solution, or SGD's solution -> SAM's.
* `random_direction` + `surface_1d` / `surface_2d` — L(w + t d) and
  L(w + x d1 + y d2) along random Gaussian directions with filter
  normalization (Li, Xu, Taylor, Studer & Goldstein 2018, "Visualizing the
  Loss Landscape of Neural Nets"): every output filter of the direction is
  rescaled to the norm of the matching filter of the weights. The weights of a
  ReLU network can be rescaled layer by layer (W1 -> αW1, W2 -> W2/α) and,
  before a BatchNorm, filter by filter, without changing the function;
  filter-normalized directions rescale with them, so curves and surfaces
  drawn with them can be compared between networks (SGD vs SAM, SGD vs Adam)
  whatever the scale of their weights. (A per-neuron rescaling between two
  ReLU layers with no normalization in between — column o of W1 times α_o,
  row o of W2 divided by α_o — is not covered: W2's output filters mix the α_o.)
* `make_recalibrated_loss_fn` — a loss that first recomputes the BatchNorm
  statistics for the parameters it is given. `make_loss_fn` measures with the
  running statistics of the trained network, which do not match perturbed or
  interpolated weights (they make the midpoint of an interpolation between two
  BatchNorm networks look far worse than it is).

Every measure takes a pure, jit-able `loss_fn(params) -> scalar` (usually a
`loss.LossFunction`, whose `.info` is copied into the result and whose
accuracy is computed on the same pass when asked for). The whole grid is
evaluated inside one `jax.jit` under `jax.lax.map`: one compilation, one
dispatch, and memory for one point at a time (or `batch_size` points, which
`lax.map` vmaps together).

    loss_fn = make_loss_fn(model, variables, images, labels, batch_size=500)
    d1 = random_direction(jax.random.key(0), params)
    d2 = random_direction(jax.random.key(1), params)
    surface = surface_2d(loss_fn, params, d1, d2, num=(25, 25))
    json.dump(surface.to_dict(), f)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxsam import data
from jaxsam.geometry import loss as loss_lib
from jaxsam.geometry.records import Record

NORMALIZATIONS = ("filter", "layer", "none")
IGNORES = ("bn_and_bias", "none", "random")
CALIB_VARIANCE = "mean over calibration batches of the per-batch biased variance (flax BatchNorm train mode)"


# --------------------------------------------------------------------------- records


@dataclasses.dataclass(frozen=True)
class CurveResult(Record):
    """The loss along a line through parameter space.

    Attributes:
      t: (num,) the line's coordinate: the interpolation coefficient
        (0 = params_a, 1 = params_b) or the step along the direction (0 = params).
      loss: (num,) the loss at each t.
      accuracy: (num,) the accuracy at each t, or None (not asked for, or the
        loss function has none).
      kind: "interpolation" or "slice".
      span: (t_min, t_max).
      params_norm: ‖a‖ (interpolation) or ‖w‖ (slice), global L2 norm.
      direction_norm: ‖b − a‖ (interpolation) or ‖d‖ (slice).
      recalibrated: whether BatchNorm statistics were recomputed at every point
        (`make_recalibrated_loss_fn`); from `loss_info`.
      direction_info: what the direction is (caller's description, e.g.
        {"normalization": "filter", "seed": 0}; ‖b‖ for interpolations).
      loss_info: what loss was measured (`make_loss_fn`'s info).
    """

    t: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray | None
    kind: str
    span: tuple[float, float]
    params_norm: float
    direction_norm: float
    recalibrated: bool
    direction_info: dict
    loss_info: dict


@dataclasses.dataclass(frozen=True)
class SurfaceResult(Record):
    """The loss on a plane L(w + x d1 + y d2).

    Attributes:
      x: (nx,) coordinates along d1.
      y: (ny,) coordinates along d2.
      loss: (ny, nx) loss[i, j] = L(w + x[j] d1 + y[i] d2) (rows follow y, as
        `matplotlib.contourf(x, y, loss)` expects).
      accuracy: (ny, nx) or None.
      kind: "surface_2d".
      params_norm: ‖w‖.
      direction_norms: (‖d1‖, ‖d2‖).
      direction_cosine: cos∠(d1, d2); random high-dimensional directions are
        nearly orthogonal (|cos| ~ 1/sqrt(#params)).
      recalibrated: whether BatchNorm statistics were recomputed at every point.
      direction_info: the caller's description of d1, d2.
      loss_info: what loss was measured.
    """

    x: np.ndarray
    y: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray | None
    kind: str
    params_norm: float
    direction_norms: tuple[float, float]
    direction_cosine: float
    recalibrated: bool
    direction_info: dict
    loss_info: dict


# --------------------------------------------------------------------------- directions


def _is_float(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _norm_ratio(w: jax.Array, d: jax.Array, axes: tuple[int, ...] | None) -> jax.Array:
    """‖w‖ / ‖d‖ over `axes` (keepdims), 0 where ‖d‖ = 0."""
    w_norm = jnp.sqrt(jnp.sum(jnp.square(w), axis=axes, keepdims=True))
    d_norm = jnp.sqrt(jnp.sum(jnp.square(d), axis=axes, keepdims=True))
    safe = jnp.where(d_norm > 0, d_norm, 1)
    return jnp.where(d_norm > 0, w_norm / safe, 0).astype(d.dtype)


def _normalize_leaf(d: jax.Array, w: jax.Array, normalization: str, ignore: str) -> jax.Array:
    if not _is_float(w):
        return jnp.zeros_like(w)
    if w.ndim <= 1:
        if ignore == "bn_and_bias":
            return jnp.zeros_like(d)
        if ignore == "none":  # Li et al.'s code: a 1-D parameter's direction is the parameter itself
            return w.astype(d.dtype)
        if normalization == "none":
            return d
        return d * _norm_ratio(w, d, None)
    if normalization == "filter":
        return d * _norm_ratio(w, d, tuple(range(w.ndim - 1)))
    if normalization == "layer":
        return d * _norm_ratio(w, d, None)
    return d


def _check_choices(normalization: str, ignore: str) -> None:
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization={normalization!r}: use one of {', '.join(NORMALIZATIONS)}")
    if ignore not in IGNORES:
        raise ValueError(f"unknown ignore={ignore!r}: use 'bn_and_bias' (zero 1-D entries), 'none' (1-D entries "
                         "copy the weights, as Li et al.'s code) or 'random' (1-D entries random, rescaled to ‖w‖)")


def normalize_direction(
    direction: Any, params: Any, *, normalization: str = "filter", ignore: str = "bn_and_bias"
) -> Any:
    """Rescales any direction (same tree as `params`) as `random_direction` does.

    Use it for directions that are not random, e.g. a Hessian eigenvector or
    the difference between two solutions. See `random_direction` for the
    meaning of `normalization` and `ignore` and for the layout assumption.
    """
    _check_choices(normalization, ignore)
    _check_same_tree(params, direction, "direction")
    return _normalize_tree(direction, params, normalization, ignore)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _normalize_tree(direction: Any, params: Any, normalization: str, ignore: str) -> Any:
    return jax.tree.map(lambda d, w: _normalize_leaf(d, w, normalization, ignore), direction, params)


def random_direction(
    key: jax.Array,
    params: Any,
    *,
    normalization: str = "filter",
    ignore: str = "bn_and_bias",
) -> Any:
    """A Gaussian direction in parameter space, normalized to the weights (Li et al. 2018).

    All float entries are drawn from N(0, 1) with one call on `key` (in
    tree-flatten order, so the same key and the same parameter tree give the
    same direction), then:

    * normalization="filter": for every leaf with ndim ≥ 2, each output filter
      d[..., o] is rescaled to ‖w[..., o]‖ (Frobenius norm over all other axes).
    * normalization="layer": each leaf is rescaled to ‖w‖ as a whole.
    * normalization="none": the raw Gaussian.

    Entries with ndim ≤ 1 (biases, BatchNorm scale and bias), with the names
    of Li et al.'s code (`net_plotter.py`, `ignore='biasbn'` or not):
    ignore="bn_and_bias" sets them to zero; ignore="none" sets them to the
    weights themselves (d = w, Li et al.'s choice when nothing is ignored);
    ignore="random" keeps the Gaussian draw and, unless normalization="none",
    rescales it to ‖w‖ as a whole.

    A direction that comes out all zeros (every float leaf 1-D under
    ignore="bn_and_bias") would give a flat surface: it is an error.

    Layout assumption: the LAST axis of every kernel indexes output features,
    as in Flax — `nn.Conv` kernels are HWIO (filter o is kernel[:, :, :, o])
    and `nn.Dense` kernels are (in, out) (output neuron o is kernel[:, o]).
    PyTorch layouts (OIHW, (out, in)) put outputs first and would need the
    axes moved before calling this.

    Args:
      key: a JAX PRNG key.
      params: the weights w (a pytree of arrays; non-float leaves get zeros).
      normalization: "filter", "layer" or "none".
      ignore: "bn_and_bias", "none" or "random".

    Returns:
      A pytree like `params`.

    Raises:
      ValueError: unknown options, no float leaves, or an all-zero direction.
    """
    _check_choices(normalization, ignore)
    floats = [w for w in jax.tree.leaves(params) if _is_float(w)]
    if not floats:
        raise ValueError("params have no floating-point leaves to draw a direction for")
    # One draw for all float entries, cut into leaves in tree-flatten order: XLA
    # compiles one random-number kernel per total size instead of one per shape.
    flat = jax.random.normal(key, (sum(int(np.prod(jnp.shape(w))) for w in floats),), jnp.result_type(*floats))
    return _check_nonzero(_direction_from_flat(flat, params, normalization, ignore), ignore)


def _check_nonzero(direction: Any, ignore: str) -> Any:
    if all(not bool(jnp.any(d != 0)) for d in jax.tree.leaves(direction) if _is_float(d)):
        hint = (" every float leaf is 1-D and ignore='bn_and_bias' zeroes them: pass ignore='none' or 'random'"
                if ignore == "bn_and_bias" else "")
        raise ValueError(f"the direction is all zeros, so every point of the surface would be the same loss;{hint}"
                         " or give parameters with weight matrices or kernels")
    return direction


@functools.partial(jax.jit, static_argnums=(2, 3))
def _direction_from_flat(flat: jax.Array, params: Any, normalization: str, ignore: str) -> Any:
    leaves, treedef = jax.tree.flatten(params)
    gaussian, start = [], 0
    for w in leaves:
        if _is_float(w):
            size = int(np.prod(jnp.shape(w)))
            gaussian.append(flat[start : start + size].reshape(jnp.shape(w)).astype(jnp.result_type(w)))
            start += size
        else:
            gaussian.append(jnp.zeros_like(w))
    return _normalize_tree(jax.tree.unflatten(treedef, gaussian), params, normalization, ignore)


# --------------------------------------------------------------------------- evaluation on a grid


def _check_same_tree(params: Any, other: Any, name: str) -> None:
    if jax.tree.structure(params) != jax.tree.structure(other):
        raise ValueError(f"{name} must have the same tree structure as params")
    for w, d in zip(jax.tree.leaves(params), jax.tree.leaves(other)):
        if jnp.shape(w) != jnp.shape(d):
            raise ValueError(f"{name} must have the shapes of params (got {jnp.shape(d)} for a {jnp.shape(w)} leaf)")


def _dot(a: Any, b: Any) -> jax.Array:
    """Σ over float leaves of <a, b>, in the default float precision (traceable)."""
    acc = jnp.result_type(float)
    pairs = [(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)) if _is_float(x)]
    terms = [jnp.vdot(x.astype(acc), y.astype(acc)) for x, y in pairs]
    return sum(terms, jnp.zeros((), acc))


def _sub(b: Any, a: Any) -> Any:
    return jax.tree.map(lambda x, y: x - y if _is_float(x) else x, b, a)


def _combine(base: Any, terms: Sequence[tuple[jax.Array, Any]], base_coef: jax.Array | None = None) -> Any:
    """base_coef * base + Σ c_i * tree_i, leafwise, each coefficient cast to the leaf's dtype."""
    trees = [tree for _, tree in terms]

    def leaf(w, *ds):
        if not _is_float(w):
            return w
        out = w if base_coef is None else base_coef.astype(w.dtype) * w
        delta = None
        for (c, _), d in zip(terms, ds):
            term = c.astype(w.dtype) * d
            delta = term if delta is None else delta + term
        return out if delta is None else out + delta

    return jax.tree.map(leaf, base, *trees)


def _evaluator(loss_fn: Callable, accuracy: bool) -> Callable[[Any], tuple[jax.Array, jax.Array]]:
    """params -> (loss, accuracy or NaN); a LossFunction gives both from one pass."""
    if accuracy and isinstance(loss_fn, loss_lib.LossFunction):

        def evaluate(params):
            loss_sum, correct_sum = loss_fn.per_example_sums(params)
            return jnp.asarray(loss_sum) / loss_fn.n, jnp.asarray(correct_sum, jnp.result_type(loss_sum)) / loss_fn.n

    elif accuracy and callable(getattr(loss_fn, "accuracy", None)):

        def evaluate(params):
            return jnp.asarray(loss_fn(params)), jnp.asarray(loss_fn.accuracy(params))

    else:

        def evaluate(params):
            value = jnp.asarray(loss_fn(params))
            return value, jnp.full((), jnp.nan, value.dtype)

    return evaluate


def _map_grid(loss_fn, accuracy, point, base, dirs, coords, batch_size, dots):
    """[evaluate(point(base, dirs, c)) for c in coords] in one jit under lax.map.

    `dots(base, dirs) -> dict of scalars` (norms for the record) is computed
    in the same jit: one compilation and one dispatch per measure.
    """
    if batch_size is not None and int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1 or None (got {batch_size})")
    evaluate = _evaluator(loss_fn, accuracy)

    @jax.jit
    def run(base, dirs, coords):
        values = jax.lax.map(lambda c: evaluate(point(base, dirs, c)), coords, batch_size=batch_size)
        return values, dots(base, dirs)

    (losses, accs), scalars = run(base, dirs, jnp.asarray(coords))
    losses = np.asarray(losses, dtype=np.float64)
    accs = np.asarray(accs, dtype=np.float64)
    scalars = {name: float(value) for name, value in scalars.items()}
    return losses, (None if np.all(np.isnan(accs)) else accs), scalars


def _grid(lo: float, hi: float, num: int, name: str, exact: Sequence[float] = (0.0,)) -> np.ndarray:
    """linspace(lo, hi, num) with points within rounding of `exact` values snapped onto them."""
    lo, hi, num = float(lo), float(hi), int(num)
    if not hi > lo:
        raise ValueError(f"{name} must be (low, high) with low < high (got ({lo}, {hi}))")
    if num < 2:
        raise ValueError(f"need at least 2 grid points along {name} (got {num})")
    t = np.linspace(lo, hi, num)
    for value in exact:
        t[np.abs(t - value) <= 1e-9 * (hi - lo)] = value
    return t


def _recalibrated(info: Mapping[str, Any]) -> bool:
    return bool(info.get("recalibrated", False))


def interpolate(
    loss_fn: Callable[[Any], jax.Array],
    params_a: Any,
    params_b: Any,
    *,
    num: int = 25,
    t_range: tuple[float, float] = (-0.5, 1.5),
    accuracy: bool = True,
    batch_size: int | None = None,
) -> CurveResult:
    """The loss along the line through two parameter vectors: L((1 − t) a + t b).

    Grid points within rounding of t = 0 and t = 1 are set to exactly 0 and 1,
    where the parameters are then exactly a and b.

    Args:
      loss_fn: `params -> scalar`, pure and jit-able.
      params_a, params_b: two parameter trees of the same structure.
      num: number of grid points.
      t_range: (t_min, t_max); the default extends half the distance beyond
        each end, where the loss should rise (Goodfellow et al. 2015).
      accuracy: also evaluate the accuracy, if `loss_fn` has one.
      batch_size: points vmapped together under `lax.map` (None: one at a time).

    Returns:
      A `CurveResult` with kind="interpolation".
    """
    _check_same_tree(params_a, params_b, "params_b")
    t = _grid(*t_range, num, "t_range", exact=(0.0, 1.0))

    def point(a, b, c):
        return _combine(a, [(c, b)], base_coef=1 - c)

    def dots(a, b):
        diff = _sub(b, a)
        return {"a": _dot(a, a), "b": _dot(b, b), "diff": _dot(diff, diff)}

    losses, accs, sq = _map_grid(loss_fn, accuracy, point, params_a, params_b, t, batch_size, dots)
    info = loss_lib.info_of(loss_fn)
    return CurveResult(
        t=t,
        loss=losses,
        accuracy=accs,
        kind="interpolation",
        span=(float(t_range[0]), float(t_range[1])),
        params_norm=math.sqrt(sq["a"]),
        direction_norm=math.sqrt(sq["diff"]),
        recalibrated=_recalibrated(info),
        direction_info={"from": "params_a (t=0)", "to": "params_b (t=1)", "norm_b": math.sqrt(sq["b"])},
        loss_info=info,
    )


def surface_1d(
    loss_fn: Callable[[Any], jax.Array],
    params: Any,
    direction: Any,
    *,
    num: int = 51,
    span: tuple[float, float] = (-1.0, 1.0),
    accuracy: bool = True,
    batch_size: int | None = None,
    direction_info: Mapping[str, Any] | None = None,
) -> CurveResult:
    """The loss along one direction: L(w + t d), t on `num` points spanning `span`.

    With a filter-normalized d, t = ±1 moves every filter by its own norm.

    Args:
      loss_fn: `params -> scalar`, pure and jit-able.
      params: the centre w.
      direction: d, a tree like `params` (e.g. from `random_direction`).
      num, span: the grid; a point within rounding of t = 0 is set to 0.
      accuracy: also evaluate the accuracy, if `loss_fn` has one.
      batch_size: points vmapped together under `lax.map`.
      direction_info: a description of d copied into the result.

    Returns:
      A `CurveResult` with kind="slice".
    """
    _check_same_tree(params, direction, "direction")
    t = _grid(*span, num, "span")

    def point(w, d, c):
        return _combine(w, [(c, d)])

    def dots(w, d):
        return {"w": _dot(w, w), "d": _dot(d, d)}

    losses, accs, sq = _map_grid(loss_fn, accuracy, point, params, direction, t, batch_size, dots)
    info = loss_lib.info_of(loss_fn)
    return CurveResult(
        t=t,
        loss=losses,
        accuracy=accs,
        kind="slice",
        span=(float(span[0]), float(span[1])),
        params_norm=math.sqrt(sq["w"]),
        direction_norm=math.sqrt(sq["d"]),
        recalibrated=_recalibrated(info),
        direction_info=dict(direction_info or {}),
        loss_info=info,
    )


def surface_2d(
    loss_fn: Callable[[Any], jax.Array],
    params: Any,
    d1: Any,
    d2: Any,
    *,
    num: int | tuple[int, int] = (25, 25),
    span: tuple[float, float] | tuple[tuple[float, float], tuple[float, float]] = ((-1.0, 1.0), (-1.0, 1.0)),
    accuracy: bool = True,
    batch_size: int | None = None,
    direction_info: Mapping[str, Any] | None = None,
) -> SurfaceResult:
    """The loss on the plane L(w + x d1 + y d2) (Li et al. 2018's contour plots).

    The nx·ny points are flattened and evaluated under one `jax.lax.map`
    (`batch_size` of them vmapped together: faster on an accelerator, memory
    grows with it).

    Args:
      loss_fn: `params -> scalar`, pure and jit-able.
      params: the centre w.
      d1, d2: two directions, trees like `params`.
      num: (nx, ny), or one int for both.
      span: ((x_min, x_max), (y_min, y_max)), or one (min, max) for both.
      accuracy: also evaluate the accuracy, if `loss_fn` has one.
      batch_size: points vmapped together under `lax.map`.
      direction_info: a description of d1, d2 copied into the result.

    Returns:
      A `SurfaceResult`; loss has shape (ny, nx).
    """
    _check_same_tree(params, d1, "d1")
    _check_same_tree(params, d2, "d2")
    nx, ny = (num, num) if np.ndim(num) == 0 else num
    span_x, span_y = (span, span) if np.ndim(span) == 1 else span
    x = _grid(*span_x, nx, "span x")
    y = _grid(*span_y, ny, "span y")
    grid_x, grid_y = np.meshgrid(x, y)  # (ny, nx)
    coords = np.stack([grid_x.ravel(), grid_y.ravel()], axis=1)

    def point(w, ds, c):
        return _combine(w, [(c[0], ds[0]), (c[1], ds[1])])

    def dots(w, ds):
        return {"w": _dot(w, w), "d1": _dot(ds[0], ds[0]), "d2": _dot(ds[1], ds[1]), "d12": _dot(ds[0], ds[1])}

    losses, accs, sq = _map_grid(loss_fn, accuracy, point, params, (d1, d2), coords, batch_size, dots)
    info = loss_lib.info_of(loss_fn)
    n1, n2 = math.sqrt(sq["d1"]), math.sqrt(sq["d2"])
    cosine = sq["d12"] / (n1 * n2) if n1 > 0 and n2 > 0 else float("nan")
    return SurfaceResult(
        x=x,
        y=y,
        loss=losses.reshape(ny, nx),
        accuracy=None if accs is None else accs.reshape(ny, nx),
        kind="surface_2d",
        params_norm=math.sqrt(sq["w"]),
        direction_norms=(n1, n2),
        direction_cosine=cosine,
        recalibrated=_recalibrated(info),
        direction_info=dict(direction_info or {}),
        loss_info=info,
    )


# --------------------------------------------------------------------------- BatchNorm recalibration


def _as_float_images(images: jax.Array) -> jax.Array:
    return data.normalize(images) if jnp.result_type(images) == jnp.uint8 else images


def make_batch_stats_fn(
    model: nn.Module,
    variables: dict[str, Any],
    calib_images: np.ndarray,
    *,
    batch_size: int = 500,
    calib_batches: int | None = None,
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
      model: a Flax module called as `model.apply(variables, x, train=True, mutable=["batch_stats"])`.
      variables: its variables; "batch_stats" gives the tree structure (and the
        statistics of layers that are not recomputed), other collections stay fixed.
      calib_images: uint8 pixels (normalized with `data.normalize`, as the
        loss does) or float images used as given.
      batch_size: calibration batch size.
      calib_batches: number of batches (default: all full batches).

    Returns:
      A pure, jit- and vmap-able function of the parameters.
    """
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
    stored = traverse_util.flatten_dict(variables["batch_stats"])
    zeros = traverse_util.unflatten_dict({key: jnp.zeros_like(v) for key, v in stored.items()})
    fixed = {name: v for name, v in variables.items() if name not in ("params", "batch_stats")}
    momenta: dict[tuple[str, ...], float] = {}

    def one_batch(params, x):
        seen: dict[tuple[str, ...], float] = {}

        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            if isinstance(module, nn.BatchNorm) and context.method_name == "__call__":
                use_running = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
                use_running = module.use_running_average if use_running is None else use_running
                if not use_running:
                    path = tuple(module.path)
                    if path in seen:
                        raise ValueError(f"BatchNorm {'/'.join(path)} is called more than once per forward pass")
                    seen[path] = float(module.momentum)
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            _, updates = model.apply(
                {**fixed, "params": params, "batch_stats": zeros},
                _as_float_images(x),
                train=True,
                mutable=["batch_stats"],
            )
        momenta.update(seen)
        new = traverse_util.flatten_dict(updates["batch_stats"])
        # new = momentum * 0 + (1 - momentum) * batch statistic
        return {
            key: (new[key] / (1 - seen[key[:-1]])).astype(v.dtype) if key[:-1] in seen else jnp.zeros_like(v)
            for key, v in stored.items()
        }

    def batch_stats(params):
        def body(total, x):
            stats = one_batch(params, x)
            return {key: total[key] + stats[key] for key in total}, None

        start = {key: jnp.zeros_like(v) for key, v in stored.items()}
        total, _ = jax.lax.scan(body, start, xs)
        if not momenta:
            raise ValueError("no BatchNorm computed batch statistics in training mode: nothing to recalibrate")
        return traverse_util.unflatten_dict(
            {key: total[key] / k if key[:-1] in momenta else stored[key] for key in stored}
        )

    batch_stats.calib_info = {"calib_n": k * batch_size, "calib_batch_size": batch_size, "calib_batches": k}
    return batch_stats


class _StatsAsParams:
    """A model whose "params" are the pair (params, batch_stats), for `make_loss_fn`."""

    def __init__(self, model: nn.Module):
        self.model = model

    def apply(self, variables, x, train=False, **kwargs):
        (params, stats) = variables["params"]
        rest = {name: v for name, v in variables.items() if name != "params"}
        return self.model.apply({**rest, "params": params, "batch_stats": stats}, x, train=train, **kwargs)


def make_recalibrated_loss_fn(
    model: nn.Module,
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
) -> loss_lib.LossFunction:
    """`make_loss_fn`'s eval-mode loss, with BatchNorm statistics recomputed for each `params`.

    `loss_fn(params)` first recomputes the running statistics for `params`
    (`make_batch_stats_fn`: train-mode passes over the calibration batches,
    cumulative average of batch means and biased batch variances, i.e.
    PyTorch's momentum=None), then evaluates the mean cross-entropy on
    `(images, labels)` in eval mode with them. It is pure, jit-able and
    `lax.map`-able, so `interpolate`, `surface_1d` and `surface_2d` use it
    unchanged; each point then costs the calibration passes plus the loss.
    Its `info` says `recalibrated: True` and describes the calibration set.

    Args:
      model, variables, images, labels, batch_size, subset: as `make_loss_fn`
        (bn="eval"); variables["batch_stats"] is replaced at every evaluation.
      calib_images: images for the statistics (uint8 or float, like `images`),
        e.g. a slice of the training set.
      calib_batch_size: calibration batch size (default `batch_size`); the
        statistics depend on it (the variance is a within-batch variance).
      calib_batches: number of calibration batches (default: all full batches).
      calib_subset: a name for the calibration set, recorded in `info`.

    Returns:
      A `LossFunction` with `.accuracy` (also recalibrated) and `.info`. It
      has no per-microbatch `batch_sums`, so `.chunks` (m-sharpness) refuses it.
    """
    stats_fn = make_batch_stats_fn(
        model,
        variables,
        calib_images,
        batch_size=batch_size if calib_batch_size is None else calib_batch_size,
        calib_batches=calib_batches,
    )
    fixed = {name: v for name, v in variables.items() if name not in ("params", "batch_stats")}
    inner = loss_lib.make_loss_fn(
        _StatsAsParams(model), fixed, images, labels, batch_size=batch_size, bn="eval", subset=subset
    )

    def per_example_sums(params):
        return inner.per_example_sums((params, stats_fn(params)))

    info = {
        **inner.info,
        "recalibrated": True,
        "calib_subset": calib_subset or f"{stats_fn.calib_info['calib_n']} examples",
        **stats_fn.calib_info,
        "calib_variance": CALIB_VARIANCE,
    }
    return loss_lib.LossFunction(per_example_sums=per_example_sums, n=inner.n, info=info)


__all__ = [
    "CurveResult",
    "SurfaceResult",
    "NORMALIZATIONS",
    "IGNORES",
    "random_direction",
    "normalize_direction",
    "interpolate",
    "surface_1d",
    "surface_2d",
    "make_batch_stats_fn",
    "make_recalibrated_loss_fn",
]
