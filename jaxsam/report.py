"""The study's report: markdown tables, figures and findings, from the collected rows of `jaxsam.study`.

Everything here is a function of saved numbers (the rows of `study.collect`),
so the same files give the same report. Figures: `jaxsam.report_figures`.
Findings are written from the numbers by fixed rules (stated in the report):
each SAM arm is compared with its base arm on the same network by the
per-seed differences SAM − base (runs of the same seed paired), stated with
their Student-t 95 % interval and called "higher" or "lower" only when the
interval excludes 0, "no difference detected" otherwise
(`jaxsam.stats.paired_difference`; accuracy and gap in percentage points).
A measure "follows" the generalization gap by its Kendall rank correlation τ
with the gap over all finished runs, with a percentile bootstrap interval
(`jaxsam.stats.kendall_tau_ci`; Jiang et al. 2020, "Fantastic
generalization measures", rank measures against the gap the same way).
"""

from __future__ import annotations

import json
import math
from typing import Any

import ml_collections

from jaxsam.measure import recalibrates
from jaxsam.stats import HIGHER, LOWER, NO_DIFFERENCE, kendall_tau_ci, paired_difference
from jaxsam import study as lib  # study imports this module only inside write_report: no cycle

PERCENT = ("test_accuracy", "train_accuracy", "gap")


def _groups(study: ml_collections.ConfigDict, model: str | None = None) -> list[tuple[str, list[str]]]:
    """[(base arm, [base arm, its SAM arms...])] in the order of study.arms (then, for a model, the arms the plan
    adds for it: extra_arms); SAM arms without their base alone."""
    arms = [a.strip() for a in study.arms.split(",") if a.strip()]
    if model is not None:
        arms += [a for a in dict.fromkeys(s.arm for s in lib.plan(study) if s.model == model) if a not in arms]
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
    """Kendall τ of each measure with the generalization gap over the runs that have both (3 or more).

    Args:
      rows: the rows of `study.collect`.

    Returns:
      {measure: {"tau", "ci_low", "ci_high", "n"}}: τ-b, its percentile bootstrap 95 % interval over runs
      (`jaxsam.stats.kendall_tau_ci`, 2000 resamples, seed 0) and the number of runs.
    """
    out = {}
    for key, _, _ in lib.MEASURE_COLUMNS:
        pairs = [(r[key], r["gap"]) for r in rows if "gap" in r and key in r and math.isfinite(r[key])]
        if len(pairs) >= 3:
            result = kendall_tau_ci(*zip(*pairs))
            out[key] = {"tau": result.tau, "ci_low": result.ci_low, "ci_high": result.ci_high, "n": result.n}
    return out


def paired(study: ml_collections.ConfigDict, rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """SAM − base over the seeds both arms have, for every network and (base, SAM arm) pair of the study.

    Args:
      study: the study config (its models, arms and extra arms give the pairs and their order).
      rows: the rows of `study.collect`.

    Returns:
      {model: {"<base>-><sam>": {column: `PairedDifference.to_dict()`}}} for test accuracy, the gap and
      each measure of `study.MEASURE_COLUMNS` with at least one paired seed; accuracy and gap in pp.
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    columns = ["test_accuracy", "gap"] + [key for key, _, _ in lib.MEASURE_COLUMNS]
    for model in _models(study):
        for base, sam in [(base, sam) for base, arms in _groups(study, model) for sam in arms if sam != base]:
            a = {r["seed"]: r for r in rows if (r["model"], r["arm"]) == (model, base)}
            b = {r["seed"]: r for r in rows if (r["model"], r["arm"]) == (model, sam)}
            seeds = sorted(set(a) & set(b))
            cells = {}
            for key in columns:
                scale = 100.0 if key in PERCENT else 1.0  # accuracy and gap in pp
                d = paired_difference([scale * a[s][key] if a[s].get(key) is not None else None for s in seeds],
                                      [scale * b[s][key] if b[s].get(key) is not None else None for s in seeds])
                if d.n:
                    cells[key] = d.to_dict()
            if cells:
                out.setdefault(model, {})[f"{base}->{sam}"] = cells
    return out


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


def _signed(value: Any, spec: str) -> str:
    """format(value, spec) with a typographic minus; "—" for None/NaN."""
    text = "—" if value is None or not math.isfinite(value) else format(value, spec)
    return "−" + text[1:] if text.startswith("-") else text


def _numbers(d: dict[str, Any], key: str) -> tuple[str, str, str]:
    """Mean, CI low, CI high as text: pp to 2 decimals, else to 2 digits of the half-width (the mean to 2 figures)."""
    mean, low, high = d["mean"], d["ci_low"], d["ci_high"]
    spec = mean_spec = ".2f"
    if key not in PERCENT:
        finite = low is not None and high is not None and math.isfinite(high - low) and high > low
        if finite and max(abs(low), abs(high)) < 1e5:
            digits = max(0, 1 - math.floor(math.log10((high - low) / 2)))
            spec = f".{digits}f"
            mean_spec = f".{max(digits, min(digits + 2, 1 - math.floor(math.log10(abs(mean)))))}f" if mean else spec
        else:
            spec = mean_spec = ".3g"
    return "+" * ((mean or 0) > 0) + _signed(mean, mean_spec), _signed(low, spec), _signed(high, spec)


def _signs(d: dict[str, Any]) -> str:
    """How many seeds moved which way, most first: "3/3 lower", "2/3 higher, 1/3 lower"."""
    n = d["n"]
    counts = [(d["negative"], "lower"), (d["positive"], "higher"), (n - d["positive"] - d["negative"], "equal")]
    return ", ".join(f"{k}/{n} {word}" for k, word in sorted((c for c in counts if c[0]), key=lambda c: -c[0]))


def _clause(label: str, d: dict[str, Any], key: str) -> str:
    """One finding worded from the interval, e.g. "λmax lower with SAM: −41, 95 % CI [−60, −22], 3/3 seeds"."""
    mean, low, high = _numbers(d, key)
    unit = " pp" if key in PERCENT else ""
    if d["n"] < 2:
        return f"{label}: no difference detected ({mean}{unit} from one seed, so no interval)"
    ci = f"95 % CI [{low}, {high}]{unit}"
    if d["verdict"] == NO_DIFFERENCE:
        return f"{label}: no difference detected at this scale ({mean}{unit}, {ci}; seeds {_signs(d)})"
    moved = d["negative"] if d["verdict"] == LOWER else d["positive"]
    return f"{label} {d['verdict']} with SAM: {mean}{unit}, {ci}, {moved}/{d['n']} seeds"


def _paired_table(pairs: dict[str, dict[str, Any]]) -> list[str]:
    """One row per (comparison, quantity): mean SAM − base, its 95 % interval, the sign count, the verdict."""
    lines = ["| SAM − base | quantity | mean | 95 % CI | seeds | verdict |", "|---|---|---|---|---|---|"]
    for name, cells in pairs.items():
        base, sam = name.split("->")
        for key, d in cells.items():
            mean, low, high = _numbers(d, key)
            ci = f"[{low}, {high}]" if d["n"] >= 2 else "—"
            quantity = {"test_accuracy": "test accuracy (pp)", "gap": "generalization gap (pp)"}.get(key)
            lines.append(f"| {_label(sam)} − {_label(base)} | {quantity or _measure_label(key)} | {mean} | {ci} | "
                         f"{_signs(d)} | {d['verdict']} |")  # fmt: skip
    return lines


GLANCE = ("test_accuracy", "gap", "worst_case", "average_case", "lambda_max")


def _glance_table(pairs: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """One row per (network, SAM arm vs base): the paired mean SAM − base of the headline quantities with
    their 95 % intervals, bold where the interval excludes 0."""
    heads = {"test_accuracy": "test accuracy (pp)", "gap": "generalization gap (pp)"}
    lines = ["| network | SAM − base | seeds | " + " | ".join(heads.get(k) or _measure_label(k) for k in GLANCE) + " |",
             "|---|---|---|" + "---|" * len(GLANCE)]  # fmt: skip
    for model, comparisons in pairs.items():
        for name, cells in comparisons.items():
            base, sam = name.split("->")
            row = []
            for key in GLANCE:
                d = cells.get(key)
                if d is None:
                    row.append("—")
                    continue
                mean, low, high = _numbers(d, key)
                text = f"{mean} [{low}, {high}]" if d["n"] >= 2 else f"{mean} (one seed)"
                row.append(f"**{text}**" if d["verdict"] in (HIGHER, LOWER) else text)
            n = max(d["n"] for d in cells.values())
            lines.append(f"| {_model_label(model)} | {_label(sam)} − {_label(base)} | {n} | " + " | ".join(row) + " |")
    return lines


def _pair_findings(agg, model: str, base: str, sam: str, cells: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    """Sentences comparing one SAM arm with its base on one model, from the paired intervals; {measure: verdict}."""
    a, b = agg[model][base], agg[model][sam]
    lines = []
    for key, name, unit in (("test_accuracy", "Test accuracy", "%"), ("gap", "Generalization gap", " pp")):
        if key in cells:
            label = f"{name} ({_fmt(a.get(key), key)}{unit} → {_fmt(b.get(key), key)}{unit})"
            lines.append(_clause(label, cells[key], key) + ".")
    directions = {key: cells[key]["verdict"] for key, _, _ in lib.MEASURE_COLUMNS if key in cells}
    parts = [_clause(_measure_label(key), cells[key], key) for key in directions]
    if parts:
        text = "; ".join(parts)
        lines.append(text[0].upper() + text[1:] + ".")
    return lines, directions


def _tally(verdicts: list[str]) -> str:
    """"lower on 1, no difference detected on 1 of 2"."""
    counts = [(verdicts.count(v), v) for v in (HIGHER, LOWER, NO_DIFFERENCE)]
    return ", ".join(f"{v} on {k}" for k, v in counts if k) + f" of {len(verdicts)}"


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
    epochs = int(study.run.train.num_epochs)  # every arm's, but a pair_epochs pair's
    unless = " (unless an arm below says otherwise)" if lib.pair_epochs(study) else ""
    lines = [
        f"- **Data:** {data}; training on {n_train} ({augmentation}); test accuracy on {n_test} test images.",
        f"- **Networks:** {', '.join(_model_label(m) for m in _models(study))} at width {c.model.width:g} "
        f"({'full width' if c.model.width == 1 else 'channel counts scaled'}), {c.model.dtype}.",
        f"- **Training:** {epochs} epochs{unless}, batch {c.train.batch_size}, {c.optimizer.schedule} learning-rate "
        f"schedule, L2 weight decay {c.optimizer.weight_decay:g}; seeds 0–{int(study.seeds) - 1}.",
        "- **Arms:**",
    ]
    specs = lib.plan(study)
    for arm in dict.fromkeys(s.arm for s in specs):
        models = list(dict.fromkeys(s.model for s in specs if s.arm == arm))
        configs = {m: lib.run_config(study, lib.RunSpec(m, arm, 0, 0)) for m in models}
        ac = configs[models[0]]
        o, s = ac.optimizer, ac.sam
        names = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}
        text = f"{names.get(o.name, o.name)} lr {o.learning_rate:g}" + (
            f", momentum {o.momentum:g}" if o.name == "sgd" else f", β = ({o.b1:g}, {o.b2:g})")
        if s.name != "none":
            text += f", {s.name.upper() if s.name != 'looksam' else 'LookSAM'} ρ {s.rho:g}"
        if ac.train.label_smoothing:
            text += f", label smoothing {ac.train.label_smoothing:g}"
        only = len(models) < len(_models(study))
        text += "".join(f", {configs[m].train.num_epochs} epochs" + ("" if only else f" on {_model_label(m)}")
                        for m in models if configs[m].train.num_epochs != epochs)  # fmt: skip
        if only:
            text += f" ({', '.join(_model_label(m) for m in models)} only)"
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
    checks = {"lambda_max_converged": "λmax converged (every residual ‖Hv − λv‖ ≤ 1e-4·λ)",
              "worst_case_converged": "the worst-case ascent levelled off (its last quarter of steps raised it by ≤ 0.1%)",
              "fits": "the network fits its training subset (train accuracy ≥ 98%)"}  # fmt: skip
    told = [f"{text} in {sum(bool(r[key]) for r in rows if key in r)} of {sum(key in r for r in rows)} runs"
            for key, text in checks.items() if any(key in r for r in rows)]  # fmt: skip
    if told:
        lines.append("- **Checks:** " + "; ".join(told) + ".")
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
    models = _models(study)
    pairs = summary.get("paired") or paired(study, rows)
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
    if any(pairs.values()):
        out += ["## At a glance", "",
                "SAM − base over runs of the same seed: mean and Student-t 95 % interval; **bold** where the "
                "interval excludes 0 (per-quantity tables, figures and findings below).", "",
                *_glance_table(pairs), ""]  # fmt: skip
    for model in models:
        if model not in agg:
            continue
        out += [f"## {_model_label(model)}", "",
                *_table(model, agg[model], [a for _, arms in _groups(study, model) for a in arms]), ""]  # fmt: skip
        if pairs.get(model):
            out += [*_paired_table(pairs[model]), ""]
    out += ["First table: mean ± standard deviation over seeds (n − 1 in the denominator; no ± with one seed). "
            "Second table: SAM − base over runs of the same seed, its Student-t 95 % interval "
            "(mean ± t(0.975, n − 1) · sd / √n; none with one seed) and how many seeds moved which way; accuracy and gap in pp. Sharpness "
            "values are increases of the cross-entropy loss (nats); λmax and trace in loss units per squared "
            "parameter step.", ""]  # fmt: skip

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
            "Written from the numbers above by fixed rules: a quantity is higher or lower with SAM only when the "
            "Student-t 95 % interval of the mean SAM − base difference (runs of the same seed paired) excludes 0, "
            "otherwise \"no difference detected\" (always so with one seed): with few seeds the intervals are wide, "
            "and no difference detected is not evidence of no effect.", ""]  # fmt: skip
    disagreements = []
    answers: dict[str, list[tuple[str, dict[str, str]]]] = {}
    for model, comparisons in pairs.items():
        for name, cells in comparisons.items():
            base, sam = name.split("->")
            lines, directions = _pair_findings(agg, model, base, sam, cells)
            n = max(d["n"] for d in cells.values())
            out += [f"**{_model_label(model)}, {_label(base)} vs {_label(sam)}** (SAM − base over {n} paired "
                    f"seed{'s' * (n != 1)}). " + " ".join(lines), ""]  # fmt: skip
            if "test_accuracy" in cells:
                answers.setdefault(f"{_label(base)} → {_label(sam)}", []).append(
                    (cells["test_accuracy"]["verdict"], directions))
            lower = [k for k, d in directions.items() if d == LOWER]
            higher = [k for k, d in directions.items() if d == HIGHER]
            if lower and higher:
                disagreements.append(
                    f"{_model_label(model)}, {_label(sam)}: lower {', '.join(_measure_label(k) for k in lower)}; "
                    f"higher {', '.join(_measure_label(k) for k in higher)}"
                )
    if answers:
        parts = []
        for name, results in answers.items():
            text = f"{name}: test accuracy {_tally([v for v, _ in results])} network(s)"
            for key in ("worst_case", "average_case", "lambda_max"):
                moved = [dirs[key] for _, dirs in results if key in dirs]
                if moved:
                    text += f"; {_measure_label(key)} {_tally(moved)}"
            parts.append(text)
        out += ["**Does SAM help Adam as well as SGD?** By the intervals above, per network: " + ". ".join(parts)
                + ".", ""]  # fmt: skip
    if disagreements:
        out += ["**Where the measures disagree** (SAM moved them in opposite directions, both intervals excluding 0): "
                + "; ".join(disagreements) + ".", ""]  # fmt: skip
    taus = summary.get("kendall_tau", {})
    if taus:
        out += ["**Which measure follows the generalization gap.** Kendall τ between each measure and the gap over "
                "all runs that have both (1: same order, 0: unrelated, −1: reversed), with a percentile bootstrap "
                "95 % interval (2000 resamples of the runs with replacement, seed 0): "
                + "; ".join(f"{_measure_label(k)} {_signed(v['tau'], '+.2f')}, 95 % CI "
                            f"[{_signed(v['ci_low'], '+.2f')}, {_signed(v['ci_high'], '+.2f')}] (n = {v['n']})"
                            for k, v in taus.items())
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
