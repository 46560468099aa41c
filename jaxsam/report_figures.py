"""The study report's figures, from the collected rows of `jaxsam.study` (drawn by `jaxsam.plot_panels`).

Test accuracy and each tracked measure over epochs (one panel per network x
optimizer, base vs SAM), each measure against the generalization gap with its
Kendall τ, base -> SAM interpolations, 2-D surfaces with shared contour
levels and spectral densities: every figure the saved numbers allow.
"""

from __future__ import annotations

import math
import os
from typing import Any

import ml_collections
import numpy as np

from jaxsam import plot_panels
from jaxsam import study as lib
from jaxsam.report import _groups, _label, _model_label, _models, kendall_taus

MARKERS = {"resnet18": "o", "vgg16": "s"}


def _by_epoch(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float], list[float]] | None:
    """Mean and std over seeds of a per-epoch series, on the epochs every seed has."""
    series = [r["epochs"] for r in rows if key in r["epochs"]]
    if not series:
        return None
    length = min(len(s["epoch"]) for s in series)
    epochs = series[0]["epoch"][:length]
    values = np.array([[np.nan if v is None else v for v in s[key][:length]] for s in series], dtype=float)
    keep = ~np.all(np.isnan(values), axis=0)
    if not keep.any():
        return None
    scale = 100.0 if key == "test_accuracy" else 1.0
    mean = scale * np.nanmean(values[:, keep], axis=0)
    std = scale * (np.nanstd(values[:, keep], axis=0, ddof=1) if len(series) > 1 else np.full(keep.sum(), np.nan))
    return list(np.array(epochs)[keep]), list(mean), list(std)


def figures(study: ml_collections.ConfigDict, rows: list[dict[str, Any]], out_dir: str) -> dict[str, str]:
    """Writes every figure the rows allow into out_dir; returns {name: path relative to the study folder}."""
    made: dict[str, str] = {}
    models, groups = _models(study), _groups(study)
    folder = os.path.basename(out_dir.rstrip("/"))

    def save(name: str, draw) -> None:
        path = os.path.join(out_dir, f"{name}.png")
        draw(path)
        made[name] = f"{folder}/{name}.png"

    # Per-epoch curves: one panel per model (rows) x optimizer group (columns), base vs SAM.
    per_epoch = [("test_accuracy", "test accuracy (%)")] + [(k, label) for k, label in lib.TRACKED]
    for key, ylabel in per_epoch:
        panels = []
        for model in models:
            row = []
            for base, arms in groups:
                series = {}
                for arm in arms:
                    band = _by_epoch([r for r in rows if (r["model"], r["arm"]) == (model, arm)], key)
                    if band:
                        series[_label(arm)] = band
                threshold = _by_epoch([r for r in rows if (r["model"], r["arm"]) == (model, base)], lib.THRESHOLD)
                if key == "track_preconditioned" and series and threshold:
                    series["Adam's threshold (2+2β₁)/((1−β₁)η)"] = threshold
                row.append((f"{_model_label(model)}, {_label(base)}", series) if series else None)
            panels.append(row)
        if any(p for row in panels for p in row):
            name = "test_accuracy" if key == "test_accuracy" else key.replace("track_", "tracked_")
            seeds = "mean ± std over seeds" if int(study.seeds) > 1 else "one seed"
            save(name, lambda path, panels=panels, ylabel=ylabel: plot_panels.plot_band_panels(
                panels, path, title=f"{ylabel[0].upper() + ylabel[1:]} after each epoch ({seeds})",
                xlabel="epoch", ylabel=ylabel, log_y=key == "track_preconditioned"))  # fmt: skip

    # Each measure against the generalization gap.
    arms_in_rows = [a for _, arms in groups for a in arms]
    # Arms beyond the optimizer groups (the study's extra_arms, e.g. original_adam) get colours too.
    arms_in_rows += sorted({r["arm"] for r in rows} - set(arms_in_rows))
    colours = {arm: f"C{i % 10}" for i, arm in enumerate(arms_in_rows)}
    taus = kendall_taus(rows)
    scatter = []
    for key, label, _ in lib.MEASURE_COLUMNS:
        points = [{"x": r[key], "y": 100 * r["gap"], "colour": colours[r["arm"]], "marker": MARKERS.get(r["model"], "^"),
                   "filled": lib.ARMS[r["arm"]].base is None}
                  for r in rows if key in r and "gap" in r and math.isfinite(r[key])]  # fmt: skip
        if points:
            tau = f"  (Kendall τ {taus[key]['tau']:+.2f})" if key in taus else ""
            scatter.append((f"{label}{tau}", label, points))
    if scatter:
        ncols = 3
        panels = [scatter[i : i + ncols] for i in range(0, len(scatter), ncols)]
        present = {(r["model"], r["arm"]) for r in rows}
        legend = [{"label": _label(arm), "colour": colours[arm], "marker": "D", "filled": lib.ARMS[arm].base is None}
                  for arm in arms_in_rows if any(a == arm for _, a in present)]  # fmt: skip
        legend += [{"label": _model_label(m), "colour": "0.3", "marker": MARKERS.get(m, "^")} for m in models]
        save("sharpness_vs_gap", lambda path: plot_panels.plot_scatter_panels(
            panels, path, title="Sharpness of each final minimum against its generalization gap (one point per run)",
            ylabel="generalization gap (train − test accuracy, pp)", legend=legend))  # fmt: skip

    # Base -> SAM interpolation, every seed.
    panels = []
    for model in models:
        row = []
        for base, arms in groups:
            curves = []
            for r in sorted((r for r in rows if (r["model"], r["arm"]) == (model, base) and "interpolation" in r),
                            key=lambda r: r["seed"]):  # fmt: skip
                for name, curve in r["interpolation"].items():
                    if isinstance(curve, dict) and not name.startswith("init"):
                        curves.append((f"seed {r['seed']}", curve))
            partner = next((a for a in arms if a != base), None)
            if curves and partner:
                row.append((f"{_model_label(model)}: {_label(base)} (t=0) → {_label(partner)} (t=1)", curves))
            else:
                row.append(None)
        panels.append(row)
    if any(p for row in panels for p in row):
        save("interpolation", lambda path: plot_panels.plot_curve_panels(
            panels, path, title="Training loss on the straight line from the base minimum to the SAM minimum",
            xlabel="t"))  # fmt: skip

    # 2-D surfaces (first seed) and spectral densities, one figure per model.
    for model in models:
        first = {r["arm"]: r for r in rows if r["model"] == model and r["seed_index"] == 0}
        panels = [[(_label(a), first[a]["surface_2d"]) if a in first and "surface_2d" in first[a] else None
                   for a in arms] for _, arms in groups]  # fmt: skip
        if any(p for row in panels for p in row):
            save(f"surface_{model}", lambda path, panels=panels, model=model: plot_panels.plot_surface_panels(
                panels, path, title=f"{_model_label(model)}: training loss around each minimum "
                                    f"(random filter-normalized directions, seed {min(r['seed'] for r in first.values())})"))  # fmt: skip
        panels = [[(f"{_model_label(model)}, {_label(base)}",
                    [(_label(a), first[a]["density"]) for a in arms if a in first and "density" in first[a]])]
                  for base, arms in groups]  # fmt: skip
        panels = [[p for p in row if p[1]] for row in panels]
        panels = [row for row in panels if row]
        if panels:
            flat = [p for row in panels for p in row]
            ncols = 2
            grid = [flat[i : i + ncols] for i in range(0, len(flat), ncols)]
            save(f"density_{model}", lambda path, grid=grid, model=model: plot_panels.plot_density_panels(
                grid, path, title=f"{_model_label(model)}: Hessian spectral density (stochastic Lanczos quadrature)"))  # fmt: skip
    return made
