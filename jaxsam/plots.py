"""Figures of saved geometry results: loss curves, contour surfaces, spectral densities, metric curves.

Every function takes results as saved (the dicts of `record.to_dict()`, after
a JSON round trip, or the result dataclasses themselves), writes one PNG
(6 x 4 in at 120 dpi, parent folders created) and returns its path. Nothing
here imports training state or JAX.

Figures are drawn on `matplotlib.figure.Figure` objects with the Agg canvas,
not through `pyplot`: no global backend is switched, no figure is registered
with pyplot, and each figure is freed once saved. The study report's panel
figures (one panel per network and optimizer) are in `jaxsam.plot_panels`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib import cm, colors, ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

FIGSIZE = (6.0, 4.0)  # inches
DPI = 120
DENSITY_FLOOR = 1e-8
FONT = {"title": 11, "label": 10, "tick": 9, "legend": 8}
LOSS_LABEL = "cross-entropy loss (nats)"


def _as_dict(result: Any) -> Mapping[str, Any]:
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        return {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
    if isinstance(result, Mapping):
        return result
    raise TypeError(f"expected a result record or its to_dict() output, got {type(result).__name__}")


def _none_to_nan(value: Any) -> Any:
    if value is None:
        return math.nan
    if isinstance(value, (list, tuple)):
        return [_none_to_nan(v) for v in value]
    return value


def _floats(value: Any) -> np.ndarray | None:
    """A JSON list (None = NaN, as `records.to_json` writes non-finite numbers) or array -> float array."""
    if value is None:
        return None
    return np.asarray(_none_to_nan(value.tolist() if hasattr(value, "tolist") else value), dtype=np.float64)


def _figure() -> tuple[Figure, Any]:
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    return fig, ax


def _style(ax: Any, title: str, xlabel: str, ylabel: str) -> None:
    if title:
        ax.set_title(title, fontsize=FONT["title"])
    ax.set_xlabel(xlabel, fontsize=FONT["label"])
    ax.set_ylabel(ylabel, fontsize=FONT["label"])
    ax.tick_params(labelsize=FONT["tick"])


def _save(fig: Figure, path: str | os.PathLike, *, layout: bool = True) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout:
        fig.tight_layout()
    fig.savefig(path, dpi=DPI, format="png")
    fig.clear()
    return path


def _default_curve_xlabel(kinds: set[str]) -> str:
    if kinds == {"interpolation"}:
        return "interpolation coefficient t  (0 = first, 1 = second network)"
    if kinds == {"slice"}:
        return "step t along the direction  (filter-normalized units)"
    return "t"


def plot_curve(
    results: Sequence[tuple[str, Any]],
    path: str | os.PathLike,
    *,
    title: str = "",
    xlabel: str | None = None,
    log_loss: bool = False,
) -> pathlib.Path:
    """Loss (and accuracy, if recorded) along 1-D interpolations or slices.

    Loss is drawn as solid lines on the left axis; accuracy, when a result
    has it, as dashed lines of the same colour on a right axis in percent.
    Interpolations get thin vertical lines at t = 0 and t = 1.

    Args:
      results: [(label, CurveResult or its dict)], one line (pair) each.
      path: the PNG to write.
      title: figure title.
      xlabel: x-axis label (default from the results' kind).
      log_loss: log-scale loss axis.

    Returns:
      The path written.
    """
    if not results:
        raise ValueError("plot_curve needs at least one (label, result)")
    fig, ax = _figure()
    _draw_curves(ax, results, title=title, xlabel=xlabel, log_loss=log_loss)
    return _save(fig, path)


def _draw_curves(ax: Any, results: Sequence[tuple[str, Any]], *, title: str = "", xlabel: str | None = None,
                 log_loss: bool = False, legend: bool = True) -> None:  # fmt: skip
    """plot_curve's drawing on one axes."""
    acc_ax = None
    handles = []
    kinds = set()
    for index, (label, result) in enumerate(results):
        result = _as_dict(result)
        kinds.add(str(result.get("kind", "")))
        t, loss = _floats(result["t"]), _floats(result["loss"])
        color = f"C{index % 10}"
        (line,) = ax.plot(t, loss, color=color, lw=1.6, marker="o" if len(t) <= 30 else None, ms=3, label=str(label))
        handles.append(line)
        accuracy = _floats(result.get("accuracy"))
        if accuracy is not None and np.any(np.isfinite(accuracy)):
            if acc_ax is None:
                acc_ax = ax.twinx()
                acc_ax.set_ylabel("accuracy (%)  (dashed)", fontsize=FONT["label"])
                acc_ax.tick_params(labelsize=FONT["tick"])
            acc_ax.plot(t, 100 * accuracy, color=color, lw=1.1, ls="--", alpha=0.9)
    if kinds == {"interpolation"}:
        for mark in (0.0, 1.0):
            ax.axvline(mark, color="0.6", lw=0.8, ls=":", zorder=0)
    if log_loss:
        ax.set_yscale("log")
    xlabel = xlabel if xlabel is not None else _default_curve_xlabel(kinds)
    _style(ax, title, xlabel, LOSS_LABEL + ("  (solid)" if acc_ax else ""))
    ax.grid(True, alpha=0.3)
    if acc_ax is not None:  # one key for the line styles
        handles += [
            Line2D([], [], color="0.2", lw=1.6, label="loss"),
            Line2D([], [], color="0.2", lw=1.1, ls="--", label="accuracy"),
        ]
    if legend and len(handles) > 1:
        # Below the axes: curves of landscapes fill the whole plot area, wherever a legend goes inside.
        ax.legend(
            handles=handles,
            fontsize=FONT["legend"],
            loc="upper center",
            bbox_to_anchor=(0.5, -0.16),
            ncols=min(len(handles), 4),
            frameon=False,
        )


def _levels(loss: np.ndarray, count: int = 20) -> tuple[np.ndarray, Any]:
    """Contour levels over the finite losses: log-spaced when they span more than 30x."""
    finite = loss[np.isfinite(loss)]
    if finite.size == 0:
        raise ValueError("the surface has no finite loss value to draw")
    lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        hi = lo + max(abs(lo), 1.0) * 1e-6
    if lo > 0 and hi / lo > 30:
        return np.geomspace(lo, hi, count), colors.LogNorm(vmin=lo, vmax=hi)
    return np.linspace(lo, hi, count), colors.Normalize(vmin=lo, vmax=hi)


def plot_surface(
    result: Any,
    path: str | os.PathLike,
    *,
    title: str = "",
    xlabel: str = "α  (step along direction 1)",
    ylabel: str = "β  (step along direction 2)",
) -> pathlib.Path:
    """A 2-D loss surface as a filled contour with labelled contour lines.

    Levels are linear, or logarithmic when the loss spans more than 30x (far
    points of a sharp minimum); non-finite points are left blank. The colour
    bar is labelled "loss"; the centre (0, 0), the parameters themselves, is
    marked with a star.

    Args:
      result: a SurfaceResult or its dict (keys x, y, loss (ny, nx)).
      path: the PNG to write.
      title: figure title.
      xlabel, ylabel: axis labels.

    Returns:
      The path written.
    """
    fig, ax = _figure()
    _draw_surface(fig, ax, result, title=title, xlabel=xlabel, ylabel=ylabel)
    return _save(fig, path)


def _surface_arrays(result: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    result = _as_dict(result)
    x, y, loss = _floats(result["x"]), _floats(result["y"]), _floats(result["loss"])
    if loss.shape != (len(y), len(x)):
        raise ValueError(f"loss must have shape (len(y), len(x)) = ({len(y)}, {len(x)}), got {loss.shape}")
    return x, y, loss


def _draw_surface(fig: Figure, ax: Any, result: Any, *, title: str = "", xlabel: str = "", ylabel: str = "",
                  levels: tuple[np.ndarray, Any] | None = None) -> None:  # fmt: skip
    """plot_surface's drawing on one axes; `levels` = (levels, norm) shared between panels."""
    x, y, loss = _surface_arrays(result)
    shared = levels is not None
    # A new norm per panel (not a copy, which would share its callbacks): a colour
    # bar resets its ticks whenever its norm, or one sharing callbacks, changes.
    levels, norm = (levels[0], type(levels[1])(vmin=levels[1].vmin, vmax=levels[1].vmax)) if shared else _levels(loss)
    masked = np.ma.masked_invalid(loss)
    filled = ax.contourf(x, y, masked, levels=levels, norm=norm, cmap="viridis", extend="neither")
    line_levels = levels[::2]
    lines = ax.contour(x, y, masked, levels=line_levels, norm=norm, colors="white", linewidths=0.6, alpha=0.8)
    ax.clabel(lines, lines.levels[::2], inline=True, fontsize=7, fmt="%.3g")
    # Panels that share levels get the whole shared range on every colour bar, even
    # where their own losses cover only part of it.
    mappable = cm.ScalarMappable(norm=norm, cmap=filled.cmap) if shared else filled
    bar = fig.colorbar(mappable, ax=ax)
    bar.set_label("loss", fontsize=FONT["label"])
    bar.ax.tick_params(labelsize=FONT["tick"])
    if isinstance(norm, colors.LogNorm):
        # Plain numbers at a few of the levels: log colour bars otherwise label only powers of ten.
        bar.set_ticks(levels[:: max(1, len(levels) // 6)])
        bar.ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%.3g"))
        bar.ax.yaxis.set_minor_locator(ticker.NullLocator())
    if x[0] <= 0 <= x[-1] and y[0] <= 0 <= y[-1]:
        ax.plot([0.0], [0.0], marker="*", ms=12, color="red", mec="white", mew=0.8, ls="none", label="centre w")
        ax.legend(fontsize=FONT["legend"], loc="upper right", framealpha=0.85)
    ax.set_aspect("equal" if np.isclose(x[-1] - x[0], y[-1] - y[0]) else "auto")
    ax.xaxis.set_major_locator(ticker.MaxNLocator(5))
    ax.yaxis.set_major_locator(ticker.MaxNLocator(5))
    _style(ax, title, xlabel, ylabel)


def _flat(value: Any) -> np.ndarray:
    array = _floats(value)
    return np.zeros(0) if array is None else array.ravel()


def plot_spectral_density(
    results: Sequence[tuple[str, Mapping[str, Any]]],
    path: str | os.PathLike,
    *,
    title: str = "",
    xlabel: str = "eigenvalue",
) -> pathlib.Path:
    """Hessian spectral densities (e.g. stochastic Lanczos quadrature) on a log density axis.

    Densities below 1e-8 are drawn at 1e-8 (a smoothed SLQ density spans many
    orders of magnitude and is exactly 0 far from the Ritz values). When a
    result has "nodes" (Ritz values, any shape), they are shown as short
    ticks along the bottom in the series' colour.

    Args:
      results: [(label, {"grid": (G,), "density": (G,), optional "nodes", "weights"})].
      path: the PNG to write.
      title: figure title.
      xlabel: x-axis label.

    Returns:
      The path written.
    """
    if not results:
        raise ValueError("plot_spectral_density needs at least one (label, result)")
    fig, ax = _figure()
    _draw_density(ax, results, title=title, xlabel=xlabel)
    return _save(fig, path)


def _draw_density(ax: Any, results: Sequence[tuple[str, Mapping[str, Any]]], *, title: str = "",
                  xlabel: str = "eigenvalue") -> None:  # fmt: skip
    """plot_spectral_density's drawing on one axes."""
    has_nodes = False
    for index, (label, result) in enumerate(results):
        result = _as_dict(result)
        grid, density = _flat(result["grid"]), _flat(result["density"])
        if grid.shape != density.shape:
            raise ValueError(f"{label}: grid and density differ in length ({grid.size} vs {density.size})")
        color = f"C{index % 10}"
        density = np.where(np.isfinite(density), np.maximum(density, DENSITY_FLOOR), np.nan)
        ax.plot(grid, density, color=color, lw=1.4, label=label)
        nodes = _flat(result.get("nodes"))
        nodes = nodes[np.isfinite(nodes)]
        if nodes.size:
            has_nodes = True
            ax.plot(
                nodes,
                np.full(nodes.shape, 0.02 + 0.03 * index),
                ls="none",
                marker="|",
                ms=8,
                color=color,
                alpha=0.7,
                transform=ax.get_xaxis_transform(),
            )
    ax.set_yscale("log")
    ax.set_ylim(bottom=DENSITY_FLOOR / 10)  # the floor sits above the node ticks
    _style(ax, title, xlabel, f"density  (floored at {DENSITY_FLOOR:g})")
    ax.grid(True, which="major", alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    if has_nodes:
        handles.append(Line2D([], [], ls="none", marker="|", ms=8, color="0.3", label="Ritz values (ticks)"))
    if len(handles) > 1:
        ax.legend(handles=handles, fontsize=FONT["legend"], loc="best", framealpha=0.85)


def plot_metric_curves(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | os.PathLike,
    *,
    title: str = "",
    xlabel: str = "epoch",
    ylabel: str = "",
    log_y: bool = False,
) -> pathlib.Path:
    """Generic lines, e.g. per-epoch test accuracy or tracked sharpness of several runs.

    Args:
      series: {label: (x values, y values)}; None values (JSON NaN) are gaps.
      path: the PNG to write.
      title, xlabel, ylabel: labels (give units in ylabel, e.g. "test accuracy (%)").
      log_y: log-scale y axis.

    Returns:
      The path written.
    """
    if not series:
        raise ValueError("plot_metric_curves needs at least one series")
    fig, ax = _figure()
    for index, (label, (xs, ys)) in enumerate(series.items()):
        xs, ys = _flat(xs), _flat(ys)
        if xs.shape != ys.shape:
            raise ValueError(f"{label}: {xs.size} x values but {ys.size} y values")
        ax.plot(xs, ys, color=f"C{index % 10}", lw=1.5, marker="o" if xs.size <= 30 else None, ms=3, label=label)
    if log_y:
        ax.set_yscale("log")
    _style(ax, title, xlabel, ylabel)
    ax.grid(True, alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=FONT["legend"], loc="best", framealpha=0.85)
    return _save(fig, path)


__all__ = [
    "plot_curve",
    "plot_surface",
    "plot_spectral_density",
    "plot_metric_curves",
]
