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
* `recalibration.make_recalibrated_loss_fn` — a loss that first recomputes
  the BatchNorm statistics for the parameters it is given (the running
  statistics of the trained network do not match perturbed or interpolated
  weights).

Every measure takes a `loss.LossFunction` (whose `.info` is copied into the
result and whose accuracy is computed on the same pass when asked for) or
any `params -> scalar`. The grid is one `driver.Loop` over its points: one
compiled loop on accelerators (`batch_size` points vmapped together), driven
from Python on the CPU backend; memory for one point at a time.

    loss_fn = make_loss_fn(model, variables, images, labels, batch_size=500)
    d1 = random_direction(jax.random.key(0), params)
    d2 = random_direction(jax.random.key(1), params)
    surface = surface_2d(loss_fn, params, d1, d2, num=(25, 25))
    json.dump(surface.to_dict(), f)
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxsam.geometry import driver
from jaxsam.geometry import loss as loss_lib
from jaxsam.geometry.records import CurveResult, SurfaceResult

NORMALIZATIONS = ("filter", "layer", "none")
IGNORES = ("bn_and_bias", "none", "random")


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


def _point(kind: str, base: Any, dirs: Any, c: jax.Array) -> Any:
    """The parameters at grid coordinate c: (1 − t) a + t b, w + t d, or w + x d1 + y d2."""
    if kind == "interpolation":
        return _combine(base, [(c, dirs)], base_coef=1 - c)
    if kind == "slice":
        return _combine(base, [(c, dirs)])
    return _combine(base, [(c[0], dirs[0]), (c[1], dirs[1])])


# The grid as a loop. inputs: {"base", "dirs", "coords" (steps·b, ...)}; static: (kind, b, accuracy),
# b points per step (0: one point, not stacked).


def _grid_init(params, inputs, static):
    # The widest float: any loss dtype is held exactly (the values go to float64 numpy anyway).
    n = inputs["coords"].shape[0]
    return jnp.zeros((n,), jnp.result_type(float)), jnp.zeros((n,), jnp.result_type(float))


def _grid_query(i, carry, params, inputs, static):
    kind, b, _ = static
    if not b:
        return _point(kind, inputs["base"], inputs["dirs"], inputs["coords"][i]), None
    coords = lax.dynamic_slice_in_dim(inputs["coords"], i * b, b)
    return jax.vmap(lambda c: _point(kind, inputs["base"], inputs["dirs"], c))(coords), None


def _grid_update(i, carry, _, answer, params, inputs, static):
    _, b, accuracy = static
    losses, accs = carry
    loss, acc = answer if accuracy else (answer, jnp.full(jnp.shape(answer), jnp.nan))
    if not b:
        return losses.at[i].set(loss.astype(losses.dtype)), accs.at[i].set(acc.astype(accs.dtype))
    put = lambda a, v: lax.dynamic_update_slice_in_dim(a, v.astype(a.dtype), i * b, 0)  # noqa: E731
    return put(losses, loss), put(accs, acc)


def _grid_finish(carry, params, inputs, static):
    return carry


@functools.partial(jax.jit, static_argnums=0)
def _norms(kind: str, base: Any, dirs: Any) -> dict[str, jax.Array]:
    """The squared norms (and d1·d2) the records report."""
    if kind == "interpolation":
        diff = _sub(dirs, base)
        return {"a": _dot(base, base), "b": _dot(dirs, dirs), "diff": _dot(diff, diff)}
    if kind == "slice":
        return {"w": _dot(base, base), "d": _dot(dirs, dirs)}
    return {"w": _dot(base, base), "d1": _dot(dirs[0], dirs[0]), "d2": _dot(dirs[1], dirs[1]),
            "d12": _dot(dirs[0], dirs[1])}  # fmt: skip


def _map_grid(loss_fn, accuracy, kind, base, dirs, coords, batch_size):
    """(losses, accuracies or None, squared norms) of the loss at every grid point (see `_point`)."""
    if batch_size is not None and int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1 or None (got {batch_size})")
    coords = np.asarray(coords)
    num = coords.shape[0]
    b = 0 if batch_size is None or int(batch_size) == 1 else min(int(batch_size), num)
    steps = num if not b else -(-num // b)
    if b and steps * b > num:  # the last block is filled with copies of the last point, dropped below
        coords = np.concatenate([coords, np.repeat(coords[-1:], steps * b - num, axis=0)])
    loop = driver.Loop("value_and_accuracy" if accuracy else "value", _grid_init, _grid_query, _grid_update,
                       _grid_finish, block=b, vmap=True)  # fmt: skip
    inputs = {"base": base, "dirs": dirs, "coords": jnp.asarray(coords)}
    losses, accs = driver.run(loop, loss_fn, base, inputs, steps=steps, static=(kind, b, bool(accuracy)))
    losses = np.asarray(losses, dtype=np.float64)[:num]
    accs = np.asarray(accs, dtype=np.float64)[:num]
    scalars = {name: float(value) for name, value in _norms(kind, base, dirs).items()}
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
      loss_fn: a `LossFunction` or any `params -> scalar`.
      params_a, params_b: two parameter trees of the same structure.
      num: number of grid points.
      t_range: (t_min, t_max); the default extends half the distance beyond
        each end, where the loss should rise (Goodfellow et al. 2015).
      accuracy: also evaluate the accuracy, if `loss_fn` has one.
      batch_size: points vmapped together in the compiled loop (None: one at a time).

    Returns:
      A `CurveResult` with kind="interpolation".
    """
    _check_same_tree(params_a, params_b, "params_b")
    t = _grid(*t_range, num, "t_range", exact=(0.0, 1.0))

    losses, accs, sq = _map_grid(loss_fn, accuracy, "interpolation", params_a, params_b, t, batch_size)
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
      loss_fn: a `LossFunction` or any `params -> scalar`.
      params: the centre w.
      direction: d, a tree like `params` (e.g. from `random_direction`).
      num, span: the grid; a point within rounding of t = 0 is set to 0.
      accuracy: also evaluate the accuracy, if `loss_fn` has one.
      batch_size: points vmapped together in the compiled loop (None: one at a time).
      direction_info: a description of d copied into the result.

    Returns:
      A `CurveResult` with kind="slice".
    """
    _check_same_tree(params, direction, "direction")
    t = _grid(*span, num, "span")

    losses, accs, sq = _map_grid(loss_fn, accuracy, "slice", params, direction, t, batch_size)
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

    The nx·ny points are flattened and evaluated in one loop
    (`batch_size` of them vmapped together: faster on an accelerator, memory
    grows with it).

    Args:
      loss_fn: a `LossFunction` or any `params -> scalar`.
      params: the centre w.
      d1, d2: two directions, trees like `params`.
      num: (nx, ny), or one int for both.
      span: ((x_min, x_max), (y_min, y_max)), or one (min, max) for both.
      accuracy: also evaluate the accuracy, if `loss_fn` has one.
      batch_size: points vmapped together in the compiled loop (None: one at a time).
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

    losses, accs, sq = _map_grid(loss_fn, accuracy, "surface", params, (d1, d2), coords, batch_size)
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
]
