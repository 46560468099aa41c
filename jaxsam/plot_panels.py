"""The study report's panel figures: one figure, one panel per (model, optimizer) or per measure.

Each function takes the panels' saved results (as `jaxsam.plots` does), draws
them on one grid of axes with shared styling and a shared legend, writes one
PNG and returns its path. The single-result figures and the drawing helpers
are in `jaxsam.plots`; nothing here imports training state or JAX.
"""

from __future__ import annotations

import os
import pathlib
import textwrap
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

# The drawing helpers are shared with the single-result figures.
from jaxsam.plots import (
    DPI,
    FONT,
    _draw_curves,
    _draw_density,
    _draw_surface,
    _flat,
    _levels,
    _save,
    _style,
    _surface_arrays,
)


PANEL_SIZE = (4.4, 3.3)  # inches per panel


def _panel_figure(nrows: int, ncols: int) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(PANEL_SIZE[0] * ncols, PANEL_SIZE[1] * nrows + 0.6), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = np.array([[fig.add_subplot(nrows, ncols, r * ncols + c + 1) for c in range(ncols)]
                     for r in range(nrows)])  # fmt: skip
    return fig, axes


def _grid_shape(panels: Sequence[Sequence[Any]]) -> tuple[int, int]:
    if not panels or not any(panels):
        raise ValueError("a panel figure needs at least one panel")
    return len(panels), max(len(row) for row in panels)


def _filled_panels(panels, axes: np.ndarray):
    """(axes, panel, column) for every cell of the grid that holds a panel."""
    for r, row in enumerate(panels):
        for c, panel in enumerate(row):
            if panel is not None:
                yield axes[r, c], panel, c


def _finish_panels(fig: Figure, axes: np.ndarray, panels, title: str, path, legend_handles=None) -> pathlib.Path:
    for r, row in enumerate(panels):
        for c in range(axes.shape[1]):
            if c >= len(row) or row[c] is None:
                axes[r, c].set_axis_off()
    if title:  # wrapped to the figure's width (about 11 characters per inch at this size)
        fig.suptitle(textwrap.fill(title, width=int(fig.get_figwidth() * 11)), fontsize=FONT["title"] + 1)
    if legend_handles:
        fig.legend(handles=legend_handles, loc="lower center", ncols=min(len(legend_handles), 5),
                   fontsize=FONT["legend"] + 1, frameon=False)  # fmt: skip
        fig.tight_layout(rect=(0, 0.07 + 0.02 * (len(legend_handles) > 5), 1, 1))
    else:
        fig.tight_layout()
    return _save(fig, path, layout=False)


def plot_band_panels(
    panels: Sequence[Sequence[tuple[str, Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float]]]] | None]],
    path: str | os.PathLike,
    *,
    title: str = "",
    xlabel: str = "epoch",
    ylabel: str = "",
    log_y: bool = False,
    log_x: bool = False,
) -> pathlib.Path:
    """A grid of panels of mean lines with ± std bands (e.g. test accuracy over epochs, seeds averaged).

    Args:
      panels: rows of (panel title, {label: (x, mean, std)}) or None for an empty cell;
        a std of NaN (one seed) draws no band. The same label has the same colour in every panel.
      path: the PNG to write.
      title, xlabel, ylabel: figure title and every panel's axis labels (units in ylabel).
      log_y, log_x: log-scale y / x axes (log_x: x values are not epochs).

    Returns:
      The path written.
    """
    nrows, ncols = _grid_shape(panels)
    fig, axes = _panel_figure(nrows, ncols)
    colours: dict[str, str] = {}
    for ax, (panel_title, series), _ in _filled_panels(panels, axes):
        for label, (xs, mean, std) in series.items():
            colour = colours.setdefault(label, f"C{len(colours) % 10}")
            xs, mean, std = _flat(xs), _flat(mean), _flat(std)
            ax.plot(xs, mean, color=colour, lw=1.6, marker="o" if xs.size <= 30 else None, ms=3, label=label)
            if np.any(np.isfinite(std)):
                ax.fill_between(xs, mean - std, mean + std, color=colour, alpha=0.2, lw=0)
        if log_y:
            ax.set_yscale("log")
        if log_x:
            ax.set_xscale("log")
            ticks = sorted({float(x) for xs, _, _ in series.values() for x in _flat(xs)})
            ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
            ax.axhline(0, color="0.5", lw=0.8)
        else:
            ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        _style(ax, panel_title, xlabel, ylabel)
        ax.grid(True, alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=FONT["legend"], loc="best", framealpha=0.85)
    return _finish_panels(fig, axes, panels, title, path)


def plot_scatter_panels(
    panels: Sequence[Sequence[tuple[str, str, Sequence[Mapping[str, Any]]] | None]],
    path: str | os.PathLike,
    *,
    title: str = "",
    ylabel: str = "",
    legend: Sequence[Mapping[str, Any]] = (),
) -> pathlib.Path:
    """A grid of scatter panels (e.g. each sharpness measure against the generalization gap).

    Args:
      panels: rows of (panel title, x label, points) or None; each point a dict
        with x, y, colour, marker and filled (bool).
      path: the PNG to write.
      title, ylabel: figure title and the shared y label.
      legend: entries {label, colour, marker, filled} of a legend below the panels.

    Returns:
      The path written.
    """
    nrows, ncols = _grid_shape(panels)
    fig, axes = _panel_figure(nrows, ncols)
    for ax, (panel_title, xlabel, points), c in _filled_panels(panels, axes):
        for p in points:
            face = p["colour"] if p.get("filled", True) else "none"
            ax.plot([p["x"]], [p["y"]], ls="none", marker=p["marker"], ms=7, mfc=face, mec=p["colour"], mew=1.4)
        _style(ax, panel_title, xlabel, ylabel if c == 0 else "")
        ax.grid(True, alpha=0.3)
    handles = [Line2D([], [], ls="none", marker=e["marker"], ms=7, mec=e["colour"], mew=1.4,
                      mfc=e["colour"] if e.get("filled", True) else "none", label=e["label"])
               for e in legend]  # fmt: skip
    return _finish_panels(fig, axes, panels, title, path, legend_handles=handles)


def plot_curve_panels(
    panels: Sequence[Sequence[tuple[str, Sequence[tuple[str, Any]]] | None]],
    path: str | os.PathLike,
    *,
    title: str = "",
    xlabel: str | None = None,
) -> pathlib.Path:
    """A grid of plot_curve panels (e.g. the base -> SAM interpolation per model and optimizer)."""
    nrows, ncols = _grid_shape(panels)
    fig, axes = _panel_figure(nrows, ncols)
    for ax, (panel_title, curves), _ in _filled_panels(panels, axes):
        _draw_curves(ax, curves, title=panel_title, xlabel=xlabel, legend=False)
        if len(curves) > 1:
            ax.legend(fontsize=FONT["legend"], loc="best", framealpha=0.85)
    return _finish_panels(fig, axes, panels, title, path)


def plot_surface_panels(
    panels: Sequence[Sequence[tuple[str, Any] | None]],
    path: str | os.PathLike,
    *,
    title: str = "",
    xlabel: str = "α  (direction 1)",
    ylabel: str = "β  (direction 2)",
) -> pathlib.Path:
    """A grid of 2-D loss surfaces with the same contour levels in every panel, so they compare."""
    nrows, ncols = _grid_shape(panels)
    losses = [_surface_arrays(p[1])[2] for row in panels for p in row if p is not None]
    shared = _levels(np.concatenate([loss.ravel() for loss in losses]))
    fig, axes = _panel_figure(nrows, ncols)
    for ax, (panel_title, result), _ in _filled_panels(panels, axes):
        _draw_surface(fig, ax, result, title=panel_title, xlabel=xlabel, ylabel=ylabel, levels=shared)
    return _finish_panels(fig, axes, panels, title, path)


def plot_density_panels(
    panels: Sequence[Sequence[tuple[str, Sequence[tuple[str, Mapping[str, Any]]]] | None]],
    path: str | os.PathLike,
    *,
    title: str = "",
) -> pathlib.Path:
    """A grid of spectral-density panels (e.g. base vs SAM per model and optimizer)."""
    nrows, ncols = _grid_shape(panels)
    fig, axes = _panel_figure(nrows, ncols)
    for ax, (panel_title, results), _ in _filled_panels(panels, axes):
        _draw_density(ax, results, title=panel_title, xlabel="Hessian eigenvalue")
    return _finish_panels(fig, axes, panels, title, path)


__all__ = [
    "plot_band_panels",
    "plot_scatter_panels",
    "plot_curve_panels",
    "plot_surface_panels",
    "plot_density_panels",
]
