"""A study's dose-response: SAM − base against ρ for each ball, the trend over log ρ, and factor rows.

From the saved rows of a study (`jaxsam.study.collect`) alone. A *family* is
one SAM arm at several ρ (`adam_sam`, `adam_sam_rho0.1`, ... against their
base `adam`; `jaxsam.grid.ArmTable`); for each ρ the paired difference to
the base over seeds (Student-t 95 % interval), and per family the trend: each
seed's least-squares slope of its paired difference against log10 ρ, with a
t-interval over seeds. *Factor* rows compare an arm with label smoothing
(`<arm>` containing `_ls`) with the same arm without it, paired by seed, and
for a SAM arm the interaction: (its SAM effect with label smoothing) − (without).

    analysis = dose_response(study, rows)      # summary.json's "dose"
    lines = markdown(analysis)                  # report.md's dose-response section
    figure(analysis, "figures/dose_response.png")
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections
import numpy as np

from jaxsam import grid, plot_panels
from jaxsam.stats import LOWER, paired_difference

# The columns of the dose tables (accuracy and gap in percentage points).
COLUMNS = (("test_accuracy", "test acc. (pp)"), ("gap", "gap (pp)"), ("worst_case", "worst-case"),
           ("worst_case_adaptive", "adaptive worst-case"), ("average_case", "average-case"), ("lambda_max", "λmax"),
           ("trace", "trace"), ("preconditioned", "preconditioned λmax"))  # fmt: skip
SHARPNESS = tuple(key for key, _ in COLUMNS[2:])
PERCENT = ("test_accuracy", "gap")


def _values(rows: list[dict[str, Any]], model: str, arm: str, key: str) -> dict[int, float]:
    scale = 100.0 if key in PERCENT else 1.0
    return {r["seed"]: scale * r[key] for r in rows
            if (r["model"], r["arm"]) == (model, arm) and r.get(key) is not None and math.isfinite(r[key])}  # fmt: skip


def _paired(rows, model: str, a: str, b: str, key: str) -> tuple[list[int], list[float], list[float]]:
    """(seeds, a's values, b's values) of the seeds both arms have."""
    va, vb = _values(rows, model, a, key), _values(rows, model, b, key)
    seeds = sorted(set(va) & set(vb))
    return seeds, [va[s] for s in seeds], [vb[s] for s in seeds]


def _stem(arm: str) -> str:
    """The named arm an arm is a ρ variant of (adam_sam_rho0.1 -> adam_sam), or the arm itself."""
    stem, sep, _ = arm.rpartition("_rho")
    return stem if sep and dict.__contains__(grid.ARMS, stem) and not dict.__contains__(grid.ARMS, arm) else arm


def trend(rhos: list[float], differences: dict[float, dict[int, float]]) -> dict[str, Any]:
    """The mean over seeds of each seed's slope of its paired difference against log10 ρ, with a t-interval.

    Args:
      rhos: the family's ρ values.
      differences: {ρ: {seed: paired difference}}.

    Returns:
      `PairedDifference.to_dict()` of the slopes (per decade of ρ) against 0;
      a seed needs values at two ρ or more.
    """
    slopes = []
    for seed in sorted({s for d in differences.values() for s in d}):
        xs = [math.log10(r) for r in rhos if seed in differences.get(r, {})]
        ys = [differences[r][seed] for r in rhos if seed in differences.get(r, {})]
        if len(set(xs)) >= 2:
            slopes.append(float(np.polyfit(xs, ys, 1)[0]))
    return paired_difference([0.0] * len(slopes), slopes).to_dict()


def _family_points(study, rows, model: str) -> dict[tuple[str, str], list[tuple[float, str]]]:
    """{(base, stem): [(ρ, arm), ...] sorted by ρ} of the SAM arms the rows hold for `model`."""
    families: dict[tuple[str, str], list[tuple[float, str]]] = {}
    for arm in dict.fromkeys(r["arm"] for r in rows if r["model"] == model):
        base = grid.ARMS[arm].base
        if base is None:
            continue
        rho = float(grid.run_config(study, grid.RunSpec(model, arm, 0, 0)).sam.rho)
        families.setdefault((base, _stem(arm)), []).append((rho, arm))
    return {k: sorted(v) for k, v in families.items()}


def dose_response(study: ml_collections.ConfigDict, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """{model: {"families": [...], "factors": [...]}} for every model with a family of two ρ or more,
    or a label-smoothing arm and its counterpart ({} when the study has neither)."""
    out: dict[str, Any] = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        families = []
        for (base, stem), points in _family_points(study, rows, model).items():
            if len(points) < 2:
                continue
            family = {"label": grid.ARMS[stem].label, "stem": stem, "base": base, "points": [], "trend": {},
                      "smallest_flatter": {}}  # fmt: skip
            for key, _ in COLUMNS:
                differences = {}
                for rho, arm in points:
                    seeds, a, b = _paired(rows, model, base, arm, key)
                    differences[rho] = {s: y - x for s, x, y in zip(seeds, a, b)}
                family["trend"][key] = trend([rho for rho, _ in points], differences)
            for rho, arm in points:
                cells = {key: paired_difference(*_paired(rows, model, base, arm, key)[1:]).to_dict() for key, _ in COLUMNS}
                family["points"].append({"rho": rho, "arm": arm, "cells": cells})
            for key in SHARPNESS:
                flatter = [p["rho"] for p in family["points"] if p["cells"][key]["verdict"] == LOWER]
                family["smallest_flatter"][key] = min(flatter) if flatter else None
            families.append(family)
        factors = []
        arms = set(r["arm"] for r in rows if r["model"] == model)
        for arm in sorted(a for a in arms if "_ls" in a):
            without = arm.replace("_ls", "", 1)
            if without not in arms:
                continue
            factor = {"label": f"label smoothing 0.1: {grid.ARMS[arm].label} − {grid.ARMS[without].label}",
                      "arm": arm, "without": without,
                      "cells": {key: paired_difference(*_paired(rows, model, without, arm, key)[1:]).to_dict()
                                for key, _ in COLUMNS}}  # fmt: skip
            base, base_without = grid.ARMS[arm].base, grid.ARMS[without].base
            if base is not None and base_without is not None:
                factor["interaction"] = {key: _interaction(rows, model, (base, arm), (base_without, without), key)
                                         for key, _ in COLUMNS}  # fmt: skip
            factors.append(factor)
        if families or factors:
            out[model] = {"families": families, "factors": factors}
    return out


def _interaction(rows, model: str, smoothed: tuple[str, str], plain: tuple[str, str], key: str) -> dict[str, Any]:
    """(SAM − base with label smoothing) − (SAM − base without), paired by seed."""
    effects = []
    for base, arm in (plain, smoothed):
        seeds, a, b = _paired(rows, model, base, arm, key)
        effects.append({s: y - x for s, x, y in zip(seeds, a, b)})
    seeds = sorted(set(effects[0]) & set(effects[1]))
    return paired_difference([effects[0][s] for s in seeds], [effects[1][s] for s in seeds]).to_dict()


def _cell(d: dict[str, Any]) -> str:
    if not d or not d["n"]:
        return "–"
    if d["n"] < 2:
        return f"{d['mean']:+.3g}"
    mark = "**" if d["verdict"] != "no difference detected" else ""
    return f"{mark}{d['mean']:+.3g} [{d['ci_low']:+.3g}, {d['ci_high']:+.3g}]{mark}"


def markdown(analysis: dict[str, Any], figure_path: str | None = None) -> list[str]:
    """The dose-response section of report.md (bold: the 95 % interval excludes 0)."""
    if not analysis:
        return []
    header = "| | n | " + " | ".join(label for _, label in COLUMNS) + " |"
    rule = "|" + "---|" * (len(COLUMNS) + 2)
    out = ["## Dose-response: which ρ and ball", "",
           "Paired differences to the base arm over seeds (mean [95 % t-interval]; bold where it excludes 0); "
           "the trend is the mean over seeds of each seed's least-squares slope against log10 ρ, per decade of ρ.",
           ""]  # fmt: skip
    if figure_path:
        out += [f"![dose-response]({figure_path})", ""]
    for model, parts in analysis.items():
        for family in parts["families"]:
            out += [f"### {grid.MODEL_LABELS.get(model, model)}: {family['label']} − {grid.ARMS[family['base']].label}",
                    "", header, rule]  # fmt: skip
            for p in family["points"]:
                n = max(c["n"] for c in p["cells"].values())
                out.append(f"| ρ = {p['rho']:g} | {n} | " + " | ".join(_cell(p["cells"][k]) for k, _ in COLUMNS) + " |")
            n = max(t["n"] for t in family["trend"].values())
            out.append(f"| slope per decade | {n} | " + " | ".join(_cell(family["trend"][k]) for k, _ in COLUMNS)
                       + " |")  # fmt: skip
            flatter = [f"{label} from ρ = {family['smallest_flatter'][k]:g}" for k, label in COLUMNS
                       if family["smallest_flatter"].get(k) is not None]  # fmt: skip
            out += ["", "Detectably flatter: " + ("; ".join(flatter) if flatter else "at no ρ, by no measure") + ".",
                    ""]  # fmt: skip
        if parts["factors"]:
            out += [f"### {grid.MODEL_LABELS.get(model, model)}: label smoothing as a factor", "", header, rule]
            for factor in parts["factors"]:
                cells = factor["cells"]
                n = max(c["n"] for c in cells.values())
                out.append(f"| {factor['label']} | {n} | " + " | ".join(_cell(cells[k]) for k, _ in COLUMNS) + " |")
                if "interaction" in factor:
                    inter = factor["interaction"]
                    n = max(c["n"] for c in inter.values())
                    out.append(f"| its SAM effect with − without label smoothing | {n} | "
                               + " | ".join(_cell(inter[k]) for k, _ in COLUMNS) + " |")  # fmt: skip
            out.append("")
    return out


def figure(analysis: dict[str, Any], path: str) -> bool:
    """Paired difference against ρ (log scale), one line per family with its 95 % band; False if nothing to draw."""
    panels = []
    for model, parts in analysis.items():
        row = []
        for key, label in COLUMNS:
            series = {}
            for family in parts["families"]:
                cells = [(p["rho"], p["cells"][key]) for p in family["points"] if p["cells"][key]["n"]]
                if len(cells) >= 2:
                    series[family["label"]] = ([r for r, _ in cells], [c["mean"] for _, c in cells],
                                               [(c["ci_high"] - c["ci_low"]) / 2 for _, c in cells])  # fmt: skip
            row.append((f"{grid.MODEL_LABELS.get(model, model)}: Δ {label}", series) if series else None)
        filled = [panel for panel in row if panel]
        panels += [filled[i : i + 4] for i in range(0, len(filled), 4)]
    if not panels:
        return False
    plot_panels.plot_band_panels(panels, path, title="SAM − base against ρ (mean over seeds, 95 % t-interval)",
                                 xlabel="ρ", ylabel="paired difference", log_x=True)  # fmt: skip
    return True
