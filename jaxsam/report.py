"""The study's report: markdown tables, figures and findings, from the collected rows of `jaxsam.study`.

Everything here is a function of saved numbers (the rows of `study.collect`),
so the same files give the same report. Figures go through `jaxsam.plots`.
Findings are written from the numbers by fixed rules (stated in the report):
a difference between two arms counts as larger than the seed spread when it
exceeds the larger of the two arms' standard deviations over seeds, and a
measure "follows" the generalization gap by its Kendall rank correlation τ
with the gap over all finished runs (Jiang et al. 2020, "Fantastic
generalization measures", rank measures against the gap the same way).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import ml_collections
import numpy as np
from scipy import stats

from jaxsam import plots
from jaxsam.geometry.measure import recalibrates
from jaxsam import study as lib  # study imports this module only inside write_report: no cycle

MARKERS = {"resnet18": "o", "vgg16": "s"}
PERCENT = ("test_accuracy", "train_accuracy", "gap")


def _groups(study: ml_collections.ConfigDict) -> list[tuple[str, list[str]]]:
    """[(base arm, [base arm, its SAM arms...])] in the order of study.arms; SAM arms without their base alone."""
    arms = [a.strip() for a in study.arms.split(",") if a.strip()]
    groups: dict[str, list[str]] = {}
    for arm in arms:
        key = lib.ARMS[arm].base if lib.ARMS[arm].base in arms else arm
        groups.setdefault(key, []).append(arm)
    return list(groups.items())


def _models(study) -> list[str]:
    return [m.strip() for m in study.models.split(",") if m.strip()]


def _label(arm: str) -> str:
    return lib.ARMS[arm].label


def _model_label(model: str) -> str:
    return lib.MODEL_LABELS.get(model, model)


def _measure_label(key: str) -> str:
    return {k: label for k, label, _ in lib.MEASURE_COLUMNS}[key]


def _finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def kendall_taus(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Kendall τ of each measure with the generalization gap over the runs that have both."""
    out = {}
    for key, _, _ in lib.MEASURE_COLUMNS:
        pairs = [(r[key], r["gap"]) for r in rows if "gap" in r and key in r and math.isfinite(r[key])]
        if len(pairs) >= 3:
            tau = stats.kendalltau(*zip(*pairs)).statistic
            out[key] = {"tau": float(tau), "n": len(pairs)}
    return out


# ---------------------------------------------------------------------------
# Figures.


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
                row.append((f"{_model_label(model)}, {_label(base)}", series) if series else None)
            panels.append(row)
        if any(p for row in panels for p in row):
            name = "test_accuracy" if key == "test_accuracy" else key.replace("track_", "tracked_")
            seeds = "mean ± std over seeds" if int(study.seeds) > 1 else "one seed"
            save(name, lambda path, panels=panels, ylabel=ylabel: plots.plot_band_panels(
                panels, path, title=f"{ylabel[0].upper() + ylabel[1:]} after each epoch ({seeds})",
                xlabel="epoch", ylabel=ylabel))  # fmt: skip

    # Each measure against the generalization gap.
    arms_in_rows = [a for _, arms in groups for a in arms]
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
        save("sharpness_vs_gap", lambda path: plots.plot_scatter_panels(
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
        save("interpolation", lambda path: plots.plot_curve_panels(
            panels, path, title="Training loss on the straight line from the base minimum to the SAM minimum",
            xlabel="t"))  # fmt: skip

    # 2-D surfaces (first seed) and spectral densities, one figure per model.
    for model in models:
        first = {r["arm"]: r for r in rows if r["model"] == model and r["seed_index"] == 0}
        panels = [[(_label(a), first[a]["surface_2d"]) if a in first and "surface_2d" in first[a] else None
                   for a in arms] for _, arms in groups]  # fmt: skip
        if any(p for row in panels for p in row):
            save(f"surface_{model}", lambda path, panels=panels, model=model: plots.plot_surface_panels(
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
            save(f"density_{model}", lambda path, grid=grid, model=model: plots.plot_density_panels(
                grid, path, title=f"{_model_label(model)}: Hessian spectral density (stochastic Lanczos quadrature)"))  # fmt: skip
    return made


# ---------------------------------------------------------------------------
# Markdown.


def _fmt(cell: dict[str, Any] | None, key: str) -> str:
    if not cell or not math.isfinite(cell["mean"]):
        return "—"
    if key in PERCENT:
        mean, std, digits = 100 * cell["mean"], 100 * cell["std"], 2
        text = f"{mean:.{digits}f}"
        return text + (f" ± {std:.{digits}f}" if math.isfinite(std) else "")
    text = f"{cell['mean']:.3g}"
    return text + (f" ± {cell['std']:.2g}" if math.isfinite(cell["std"]) else "")


def _table(model: str, agg: dict[str, dict[str, Any]], arms: list[str]) -> list[str]:
    columns = [("test_accuracy", "test acc. (%)"), ("train_accuracy", "train acc. (%)"), ("gap", "gap (pp)")]
    columns += [(key, label) for key, label, _ in lib.MEASURE_COLUMNS if any(key in agg.get(a, {}) for a in arms)]
    lines = ["| arm | seeds | " + " | ".join(label for _, label in columns) + " |",
             "|---|---|" + "---|" * len(columns)]  # fmt: skip
    for arm in arms:
        if arm not in agg:
            continue
        n = agg[arm]["test_accuracy"]["n"]
        lines.append(f"| {_label(arm)} | {n} | " + " | ".join(_fmt(agg[arm].get(k), k) for k, _ in columns) + " |")
    return lines


def _paired(rows, model, arm_a, arm_b, key) -> tuple[int, int]:
    """(seeds where arm_b's value is below arm_a's, seeds with both)."""
    a = {r["seed"]: r.get(key) for r in rows if (r["model"], r["arm"]) == (model, arm_a)}
    b = {r["seed"]: r.get(key) for r in rows if (r["model"], r["arm"]) == (model, arm_b)}
    both = [s for s in a if s in b and a[s] is not None and b[s] is not None
            and math.isfinite(a[s]) and math.isfinite(b[s])]  # fmt: skip
    return sum(b[s] < a[s] for s in both), len(both)


def _spread_word(delta: float, cell_a, cell_b) -> str:
    spread = max(cell_a["std"], cell_b["std"])
    if not math.isfinite(spread):
        return "one seed, so no spread to compare with"
    return "larger than the seed spread" if abs(delta) > spread else "within the seed spread"


def _pair_findings(rows, agg, model: str, base: str, sam: str) -> tuple[list[str], dict[str, str]]:
    """Sentences comparing one SAM arm with its base on one model; and {measure: lower|higher}."""
    a, b = agg[model][base], agg[model][sam]
    lines = []
    delta = 100 * (b["test_accuracy"]["mean"] - a["test_accuracy"]["mean"])
    higher, n = _paired(rows, model, sam, base, "test_accuracy")  # seeds where base < sam
    lines.append(
        f"Test accuracy {_fmt(a['test_accuracy'], 'test_accuracy')}% → {_fmt(b['test_accuracy'], 'test_accuracy')}% "
        f"({delta:+.2f} pp; higher with SAM in {higher} of {n} seeds; {_spread_word(delta / 100, a['test_accuracy'], b['test_accuracy'])})."
    )  # fmt: skip
    if "gap" in a and "gap" in b:
        gap_delta = 100 * (b["gap"]["mean"] - a["gap"]["mean"])
        lines.append(f"Generalization gap {_fmt(a['gap'], 'gap')} → {_fmt(b['gap'], 'gap')} pp ({gap_delta:+.2f} pp).")
    directions = {}
    parts = []
    for key, label, _ in lib.MEASURE_COLUMNS:
        if key not in a or key not in b or not (math.isfinite(a[key]["mean"]) and math.isfinite(b[key]["mean"])):
            continue
        lower, n = _paired(rows, model, base, sam, key)
        ratio = b[key]["mean"] / a[key]["mean"] if a[key]["mean"] else float("nan")
        direction = "lower" if b[key]["mean"] < a[key]["mean"] else "higher"
        directions[key] = direction
        change = f"{100 * (ratio - 1):+.0f}%" if math.isfinite(ratio) else "n/a"
        parts.append(f"{label} {direction} ({_fmt(a[key], key)} → {_fmt(b[key], key)}, {change}; "
                     f"lower in {lower} of {n} seeds)")  # fmt: skip
    if parts:
        lines.append("With SAM: " + "; ".join(parts) + ".")
    return lines, directions


def _setting(study: ml_collections.ConfigDict, rows: list[dict[str, Any]]) -> list[str]:
    spec = lib.plan(study)[0]
    c = lib.run_config(study, spec)
    if c.data.source == "synthetic":
        data = "synthetic class-coloured images (a smoke test of the pipeline, not CIFAR-10)"
        n_train, n_test = f"{c.data.synthetic_train:,} images", f"{c.data.synthetic_test:,}"
    else:
        data = "CIFAR-10"
        n_train = (f"the first {c.data.n_train:,} images of the training split" if c.data.n_train
                   else "all 50,000 training images")  # fmt: skip
        n_test = f"the first {c.data.n_test:,}" if c.data.n_test else "all 10,000"
    augmentation = (f"random {c.data.crop_padding}-pixel-padded crops and horizontal flips" if c.data.crop_padding
                    else "horizontal flips only")  # fmt: skip
    lines = [
        f"- **Data:** {data}; training on {n_train} ({augmentation}); test accuracy on {n_test} test images.",
        f"- **Networks:** {', '.join(_model_label(m) for m in _models(study))} at width {c.model.width:g} "
        f"({'full width' if c.model.width == 1 else 'channel counts scaled'}), {c.model.dtype}.",
        f"- **Training:** {c.train.num_epochs} epochs, batch {c.train.batch_size}, {c.optimizer.schedule} learning-rate "
        f"schedule, L2 weight decay {c.optimizer.weight_decay:g}; seeds 0–{int(study.seeds) - 1}.",
        "- **Arms:**",
    ]
    for arm in [a.strip() for a in study.arms.split(",") if a.strip()]:
        ac = lib.run_config(study, lib.RunSpec(spec.model, arm, 0, 0))
        o, s = ac.optimizer, ac.sam
        names = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}
        text = f"{names.get(o.name, o.name)} lr {o.learning_rate:g}" + (
            f", momentum {o.momentum:g}" if o.name == "sgd" else f", β = ({o.b1:g}, {o.b2:g})")
        if s.name != "none":
            text += f", {s.name.upper() if s.name != 'looksam' else 'LookSAM'} ρ {s.rho:g}"
        if ac.train.label_smoothing:
            text += f", label smoothing {ac.train.label_smoothing:g}"
        lines.append(f"  - {_label(arm)} (`{arm}`): {text}")
    m = study.measure
    first_seeds = "first seed only" if int(study.figure_seeds) == 1 else f"first {study.figure_seeds} seeds"
    chosen = set(m.measures.split(",")) | set(study.figure_measures.split(","))
    subset = next((r.get("measure_subset") for r in rows if r.get("measure_subset")), None)
    train_subset = next((r.get("train_subset") for r in rows if r.get("train_subset")), None)
    described = {
        "worst_case": f"worst-case sharpness max over ‖ε‖₂ ≤ {m.rho:g} of L(w+ε) − L(w) ({m.ascent_steps} projected "
                      "ascent steps, so a lower bound)",
        "worst_case_adaptive": f"adaptive worst-case sharpness (‖ε/|w|‖₂ ≤ {m.rho_adaptive:g}; Kwon et al. 2021, "
                               "Andriushchenko et al. 2023)",
        "average_case": f"average-case sharpness E L(w+ε) − L(w), ε ~ N(0, {m.sigma:g}² I) ({m.samples} draws"
                        + (", antithetic ±ε pairs" if m.get("antithetic", False) else "") + ")",
        "first_order": f"ρ‖∇L‖ with ρ = {m.rho:g} (what the original study logged as sharpness)",
        "lambda_max": f"λmax, the top Hessian eigenvalue ({m.lanczos_iters} Lanczos steps)",
        "trace": f"the Hessian trace (Hutchinson, {m.trace_probes} probes)",
        "preconditioned": "for Adam arms, λmax of the Hessian preconditioned by Adam's second-moment estimate "
                          "(Cohen et al. 2022)" + (f", in the subspace Adam moved (coordinates with gradient RMS "
                          f"≤ {m.preconditioned_floor:g} × the largest left out)" if m.get("preconditioned_floor", 0)
                                                   else ""),
        "interpolation": f"the loss along the line from each base minimum to its SAM minimum ({m.interpolation_points} points"
                         + (f"; BatchNorm statistics recomputed at every point from {m.calibration_examples} training "
                            "images" if recalibrates(m, "interpolation")
                            else "; the base network's BatchNorm statistics at every point") + ")",
        "density": f"the Hessian spectral density (stochastic Lanczos quadrature, {m.density_order} steps; "
                   f"{first_seeds})",
        "surface_2d": f"a 2-D loss surface along two random filter-normalized directions ({m.surface_points}² points; "
                      f"{first_seeds})",
    }  # fmt: skip
    parts = [text for key, text in described.items() if key in chosen]
    lines += [
        f"- **Measured on each final checkpoint:** the training loss on `{subset or 'train[:' + str(m.n_examples) + ']'}` "
        "(no augmentation, BatchNorm running statistics, plain cross-entropy): " + "; ".join(parts) + ".",
        f"- **Train accuracy and the gap:** accuracy on "
        f"`{train_subset or 'train[:' + str(m.accuracy_examples or 'all') + ']'}` with the final network in eval "
        "mode; gap = train accuracy − test accuracy, in percentage points (pp).",
    ]
    if c.track.every_epochs:
        tracked = {"lambda_max": "λmax", "worst_case": "worst-case sharpness", "average_case": "average-case sharpness",
                   "first_order": "ρ‖∇L‖"}  # fmt: skip
        every = "after every epoch" if c.track.every_epochs == 1 else f"every {c.track.every_epochs} epochs"
        lines.append(
            f"- **Tracked during training** ({every}, on the first {c.track.n_examples} "
            f"training images): {', '.join(tracked[k] for k in c.track.measures.split(','))} with {c.track.lanczos_iters} Lanczos steps "
            f"and {c.track.ascent_steps} ascent steps (cheaper, so lower, than the final measures)."
        )
    return lines


def markdown(study, command: str, rows, summary, figures: dict[str, str], planned) -> str:
    """The report text."""
    agg = summary["aggregate"]
    models, groups = _models(study), _groups(study)
    out = [
        "# jaxsam study: SGD and Adam, with and without SAM, on CIFAR-10",
        "",
        f"Produced by `{command}` (size `{study.size}`): {len(rows)} of {len(planned)} planned runs have finished"
        + (", the others are missing from every table and figure." if len(rows) < len(planned) else "."),
        "Remake this report from the saved files with the same command plus `--report_only`.",
        "",
        "## Setting",
        "",
        *_setting(study, rows),
        "",
    ]
    for model in models:
        if model not in agg:
            continue
        out += [f"## {_model_label(model)}", "",
                *_table(model, agg[model], [a for _, arms in groups for a in arms]), ""]  # fmt: skip
    out += ["Mean ± standard deviation over seeds (n − 1 in the denominator; no ± with one seed). "
            "Sharpness values are increases of the cross-entropy loss (nats); λmax and trace in loss units per "
            "squared parameter step.", ""]  # fmt: skip

    if figures:
        out += ["## Figures", ""]
        captions = {
            "test_accuracy": "Test accuracy after each epoch, base vs SAM, per network and optimizer.",
            "tracked_worst_case": "Worst-case sharpness tracked during training.",
            "tracked_lambda_max": "λmax tracked during training.",
            "tracked_first_order": "ρ‖∇L‖ (the original study's proxy) tracked during training.",
            "tracked_average_case": "Average-case sharpness tracked during training.",
            "sharpness_vs_gap": "Each measure against the generalization gap; filled markers: no SAM, hollow: SAM.",
            "interpolation": "Loss on the straight line between the base and the SAM minimum (same seed).",
        }
        for name, path in figures.items():
            caption = captions.get(name) or (
                f"2-D loss surface around each minimum ({_model_label(name.split('_', 1)[1])}), shared contour levels."
                if name.startswith("surface_") else
                f"Hessian spectral density ({_model_label(name.split('_', 1)[1])}), base vs SAM."
            )  # fmt: skip
            out += [f"![{name}]({path})", "", f"*{caption}*", ""]

    out += ["## Findings", "",
            "Written from the numbers above by fixed rules: a difference counts as larger than the seed spread when it "
            "exceeds the larger of the two arms' standard deviations (a rough guide, not a significance test); "
            "\"lower in k of n seeds\" pairs runs of the same seed.", ""]  # fmt: skip
    disagreements = []
    answers: dict[str, list[float]] = {}
    for model in models:
        for base, arms in groups:
            for sam in arms:
                if sam == base or model not in agg or base not in agg[model] or sam not in agg[model]:
                    continue
                lines, directions = _pair_findings(rows, agg, model, base, sam)
                out += [f"**{_model_label(model)}, {_label(base)} vs {_label(sam)}.** " + " ".join(lines), ""]
                answers.setdefault(f"{_label(base)} → {_label(sam)}", []).append(
                    (agg[model][sam]["test_accuracy"]["mean"] - agg[model][base]["test_accuracy"]["mean"], directions))
                lower = [k for k, d in directions.items() if d == "lower"]
                higher = [k for k, d in directions.items() if d == "higher"]
                if lower and higher:
                    disagreements.append(
                        f"{_model_label(model)}, {_label(sam)}: lower {', '.join(_measure_label(k) for k in lower)}; "
                        f"higher {', '.join(_measure_label(k) for k in higher)}"
                    )
    if answers:
        parts = []
        for name, results in answers.items():
            deltas = [d for d, _ in results]
            text = (f"{name}: test accuracy {100 * np.mean(deltas):+.2f} pp on average over {len(results)} "
                    f"network(s), higher on {sum(d > 0 for d in deltas)}")  # fmt: skip
            for key in ("worst_case", "average_case", "lambda_max"):
                moved = [dirs[key] for _, dirs in results if key in dirs]
                if moved:
                    text += f"; {_measure_label(key)} lower on {moved.count('lower')} of {len(moved)}"
            parts.append(text)
        out += ["**Does SAM help Adam as well as SGD?** " + ". ".join(parts) + ".", ""]
    if disagreements:
        out += ["**Where the measures disagree** (SAM moved them in opposite directions): "
                + "; ".join(disagreements) + ".", ""]  # fmt: skip
    taus = summary.get("kendall_tau", {})
    if taus:
        out += ["**Which measure follows the generalization gap.** Kendall τ between each measure and the gap over "
                "all runs that have both (1: same order, 0: unrelated, −1: reversed): "
                + "; ".join(f"{_measure_label(k)} {v['tau']:+.2f} (n = {v['n']})" for k, v in taus.items())
                + ".", ""]  # fmt: skip
    gaps = _finite(r.get("gap") for r in rows)
    if gaps:
        spread = max(gaps) - min(gaps)
        out += [f"**Scale.** The generalization gap ranges from {100 * min(gaps):.2f} to {100 * max(gaps):.2f} pp "
                f"over the runs (spread {100 * spread:.2f} pp)."]  # fmt: skip
        if max(abs(g) for g in gaps) < 0.05:
            out[-1] += (" The networks are far from fitting their training data, so this size measures early training, "
                        "not the converged minima the question is about; the rank correlations above rest on gaps "
                        "that barely differ. The paper-scale study (`python scripts/study.py --config configs/study.py`) "
                        "is what answers the question.")  # fmt: skip
        out.append("")
    out += ["## Config", "", "The study config (`configs/study.py`, after the command's overrides):", "", "```json",
            json.dumps(study.to_dict(), indent=1, sort_keys=True), "```", ""]  # fmt: skip
    return "\n".join(out)
