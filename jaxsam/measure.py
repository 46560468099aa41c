"""Measuring a trained run: every geometry measure on its checkpoint, saved as geometry.json and figures.

The application's use of the geometry library (`jaxsam.geometry`).
`measure_run(workdir, options)` loads the run (`jaxsam.run.load_run`),
builds the measured loss on fixed subsets of the train and test splits
(`make_loss_fn`: no augmentation, eval-mode BatchNorm, plain cross-entropy,
CIFAR-10 pixels normalized with `data.normalize`),
runs the measures named in `options.measures`, times each one, and writes

    <workdir>/geometry/geometry.json      every result record, its settings and seconds
    <workdir>/geometry/*.png              interpolation, 1-D / 2-D slices, spectral density

An existing geometry.json is kept as geometry.<n>.json. `measure_options(size)`
gives defaults sized for the paper-scale run (GPU) or the `:cpu` / `:smoke` runs.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from jaxsam import data, files
from jaxsam.config import ADAPTIVE_OPTIMIZERS
from jaxsam.geometry import hessian, landscape, recalibration, sharpness
from jaxsam.geometry.loss import make_loss_fn
from jaxsam.geometry.records import to_json

MEASURES = (
    "worst_case",
    "worst_case_adaptive",
    "average_case",
    "first_order",
    "lambda_max",
    "trace",
    "density",
    "preconditioned",
    "interpolation",
    "slice_1d",
    "surface_2d",
    "accuracy",  # last, so the random keys of the others (folded from their index) stay as they were
)

LANDSCAPE_MEASURES = ("interpolation", "slice_1d", "surface_2d")


# Per-size measure options (the rest as for "full").
_SIZED_OPTIONS = {
    # About ten minutes for every measure of a width-1/8 ResNet18 on 2 CPU cores.
    "cpu": dict(splits="train", n_examples=512, accuracy_examples=10000, batch_size=256, ascent_steps=10, samples=16,
                lanczos_iters=20, trace_probes=10, density_order=20, density_probes=1, interpolation_points=17,
                slice_points=21, surface_points=9),
    # Converged measures on 1,024 training images (each run's record says whether they converged).
    # lambda_max and preconditioned by 30 Lanczos steps, as the committed :fit grid was measured (before
    # the restarted solver; every run's residuals are recorded and checked against 1e-4 in its report).
    # Worst-case ascents of 100 steps, APGD's own budget (Croce & Hein 2020): at 20 steps the first
    # :fit grid's ascents levelled off (<= 0.1% gain over their last quarter) in 10 of 22 runs (L2) and
    # 11 of 22 (adaptive), still gaining up to 13% (VGG16 Adam), so they under-stated the sharpest minima.
    "fit": dict(splits="train", n_examples=1024, batch_size=256, ascent_steps=100, samples=32, lanczos_iters=30,
                eigen_method="lanczos", trace_probes=10, density_order=30, density_probes=1, interpolation_points=13,
                slice_points=21, surface_points=9),
    "smoke": dict(splits="train", n_examples=64, batch_size=32, ascent_steps=3, samples=4, top_k=1, lanczos_iters=5,
                  trace_probes=4, density_order=5, density_probes=1, interpolation_points=5, slice_points=5,
                  surface_points=3),
}


def measure_options(size: str = "full") -> ml_collections.ConfigDict:
    """Default settings of `measure_run` for a run of the given config size (full | fit | cpu | smoke)."""
    o = ml_collections.ConfigDict()
    o.measures = ",".join(MEASURES)
    o.splits = "train,test"  # which subsets are measured (each: the first n_examples of the split)
    o.n_examples = 4096
    o.accuracy_examples = 0  # accuracy: loss and accuracy on the first n examples of the split (0: all)
    o.batch_size = 500
    o.bn = "eval"
    o.seed = 0
    o.rho = 0.05  # worst_case (L2 ball) and first_order
    o.rho_adaptive = 0.1  # worst_case_adaptive: L2 ball relative to |w| (Andriushchenko et al. 2023)
    o.ascent_steps = 20
    o.sigma = 0.005  # average_case: per-weight Gaussian standard deviation
    o.samples = 32  # average_case: loss evaluations (antithetic: samples/2 pairs ±δ)
    o.antithetic = True  # average_case: ±δ pairs (the linear term cancels); False: plain Monte Carlo
    o.top_k = 3
    # preconditioned: coordinates with gradient RMS sqrt(v̂) <= floor x the largest are left
    # out (Adam never moved them; e.g. biases feeding BatchNorm); 0 keeps every coordinate.
    o.preconditioned_floor = 1e-4
    # lambda_max and preconditioned: "restarted" (thick-restart Lanczos until every pair has
    # ||Hv - lv|| <= eigen_tol |l|, at most eigen_max_matvecs products: the fewest products)
    # or "lanczos" (lanczos_iters steps, a fixed cost; the :fit study's method).
    o.eigen_method = "restarted"
    o.eigen_tol = 1e-5
    o.eigen_max_matvecs = 300
    o.lanczos_iters = 40
    o.trace_probes = 50
    o.density_order = 60
    o.density_probes = 4
    o.interpolation_points = 25
    o.slice_points = 41
    o.surface_points = 21
    o.span = 1.0  # slices and surfaces: t in [-span, span] along filter-normalized directions
    # Landscape measures (interpolation, slices, surfaces) with BatchNorm statistics
    # recomputed at every point from `calibration_examples` training images.
    o.recalibrate = False
    # Interpolation joins two different networks (init -> final, base -> SAM): one
    # network's running statistics are wrong at the other end (a 4-epoch :cpu SGD+SAM
    # ResNet18 under its SGD partner's statistics: loss 6.2 instead of 1.0), so its
    # curves are recalibrated even when `recalibrate` is off.
    o.interpolation_recalibrate = True
    o.calibration_examples = 2048
    o.update(_SIZED_OPTIONS.get(size, {}))
    return o


# What measures saved before an option existed did (a saved record without the key made them this way),
# and the options a method does not read.
_BEFORE_OPTION = {"eigen_method": "lanczos"}
_UNREAD = {"lanczos": ("eigen_tol", "eigen_max_matvecs")}


def same_options(saved: dict, current: dict) -> bool:
    """Whether measures saved with the options `saved` are the ones the options `current` ask for.

    A key `saved` predates counts as what those measures did (`eigen_method`:
    Lanczos), and options the chosen eigen solver does not read are ignored, so
    a study measured before the restarted solver existed is still measured
    under options that choose Lanczos.
    """
    def used(options: dict) -> dict:
        options = {**_BEFORE_OPTION, **options}
        return {k: v for k, v in options.items() if k not in _UNREAD.get(options["eigen_method"], ())}

    return used(saved) == used(current)


def _eigen_options(o: ml_collections.ConfigDict) -> dict:
    """The solver keywords of lambda_max and preconditioned (options saved before eigen_method: Lanczos)."""
    if o.get("eigen_method", "lanczos") == "lanczos":
        return dict(method="lanczos", iters=o.lanczos_iters)
    return dict(method="restarted", iters=o.eigen_max_matvecs, tol=o.eigen_tol)


def recalibrates(options: ml_collections.ConfigDict, name: str) -> bool:
    """Whether measure `name` recomputes BatchNorm statistics at every point (options saved
    before `interpolation_recalibrate` existed did not)."""
    if name not in LANDSCAPE_MEASURES:
        return False
    return bool(options.recalibrate or (name == "interpolation" and options.get("interpolation_recalibrate", False)))


def _parse_measures(names: str) -> list[str]:
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in MEASURES]
    if unknown or not chosen:
        raise ValueError(f"unknown measure(s) {unknown or names!r}: choose from {', '.join(MEASURES)}")
    return chosen


def _keep_previous(path: str) -> None:
    """Moves an existing file to <name>.<n><ext> so nothing measured before is lost."""
    if os.path.exists(path):
        files.keep_aside(path)


def measure_run(
    workdir: str,
    options: ml_collections.ConfigDict | None = None,
    *,
    compare_to: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measures the latest checkpoint of the run in `workdir`; returns and writes geometry.json.

    Args:
      workdir: a run folder made by `train_and_evaluate` / scripts/train.py.
      options: `measure_options(...)` (default: sized for the run's config size).
      compare_to: another run folder of the same network: adds the 1-D
        interpolation from this run's minimum to that one's (e.g. SGD -> SGD+SAM).
      progress: a tqdm bar over the measures.
      log: where one line per finished measure goes.

    Returns:
      The dict written to geometry.json.
    """
    from jaxsam import plots
    from jaxsam.run import load_run

    run = load_run(workdir)
    options = options or measure_options(run.config.size)
    chosen = _parse_measures(options.measures)
    splits = [s.strip() for s in options.splits.split(",") if s.strip()]
    for split in splits:
        if split not in ("train", "test"):
            raise ValueError(f"unknown split {split!r} in options.splits: use train and/or test")
    other = load_run(compare_to) if compare_to else None
    if other is not None and other.config.model.to_dict() != run.config.model.to_dict():
        raise ValueError(f"{compare_to} trains a different network than {workdir}: interpolation needs the same one")

    params = run.state.params
    variables = {"params": params, "batch_stats": run.state.batch_stats}
    is_adam = run.config.optimizer.name in ADAPTIVE_OPTIMIZERS
    out_dir = os.path.join(workdir, "geometry")
    os.makedirs(out_dir, exist_ok=True)
    key = jax.random.key(options.seed)

    results: dict[str, Any] = {
        "workdir": workdir,
        "compare_to": compare_to,
        "step": int(run.state.step),
        "options": options.to_dict(),
        "config": {"model": run.config.model.to_dict(), "optimizer": run.config.optimizer.to_dict(),
                   "sam": run.config.sam.to_dict()},
        "splits": {},
    }  # fmt: skip
    figures: dict[str, str] = {}
    tasks = [(split, name) for split in splits for name in chosen]
    bar = tqdm(tasks, disable=not progress, desc="measures", unit="measure")
    loss_fns = {}
    for split, name in bar:
        if name == "preconditioned" and not is_adam:
            continue
        bar.set_postfix_str(f"{split}: {name}")
        if split not in loss_fns:
            source = getattr(run.dataset, split)
            n = min(options.n_examples, len(source))
            loss_fns[split] = make_loss_fn(
                run.model, variables, source.images[:n], source.labels[:n], preprocess=data.normalize,
                batch_size=options.batch_size, bn=options.bn, subset=f"{split}[:{n}]",
            )  # fmt: skip
        loss_fn = loss_fns[split]
        if recalibrates(options, name):
            loss_fn = _recalibrated_loss_fn(run, split, variables, options)
        k = jax.random.fold_in(key, MEASURES.index(name))
        start = time.time()
        if name == "accuracy":
            result = _accuracy(run, split, variables, options)
        else:
            result = _measure(name, loss_fn, params, run, other, options, k)
        seconds = time.time() - start
        record = dict(to_json(result), seconds=seconds)
        results["splits"].setdefault(split, {})[name] = record
        figure = _figure(plots, name, split, record, out_dir, run, other)
        if figure:
            figures[f"{split}/{name}"] = str(figure)
        log(f"{split} {name}: {_headline(name, record)} ({seconds:.1f} s)")
    bar.close()
    results["figures"] = figures
    path = os.path.join(out_dir, "geometry.json")
    _keep_previous(path)
    files.write_json(path, results, sort_keys=False)
    return results


def _accuracy(run, split, variables, o) -> dict[str, Any]:
    """Loss and accuracy of the network on the first `o.accuracy_examples` of the split (0: all of it)."""
    source = getattr(run.dataset, split)
    n = min(o.accuracy_examples or len(source), len(source))
    loss_fn = make_loss_fn(run.model, variables, source.images[:n], source.labels[:n], preprocess=data.normalize,
                           batch_size=o.batch_size, bn=o.bn, subset=f"{split}[:{n}]")  # fmt: skip
    loss_sum, correct = _sums(loss_fn, variables["params"])
    return {"loss": float(loss_sum) / n, "accuracy": float(correct) / n, "info": loss_fn.info}


@jax.jit
def _sums(loss_fn, params):
    # (Σ loss, Σ correct): one forward pass per microbatch in a scan (forward passes in loops are fast on
    # every backend); divided by n in Python, in double precision.
    return loss_fn.sums(params)


def _recalibrated_loss_fn(run, split, variables, o):
    """The split's measured loss with BatchNorm statistics recomputed for each parameter point."""
    source = getattr(run.dataset, split)
    n = min(o.n_examples, len(source))
    calib = min(o.calibration_examples, len(run.dataset.train))
    return recalibration.make_recalibrated_loss_fn(
        run.model, variables, source.images[:n], source.labels[:n], run.dataset.train.images[:calib],
        batch_size=o.batch_size, subset=f"{split}[:{n}]", calib_subset=f"train[:{calib}]", preprocess=data.normalize,
    )  # fmt: skip


def _measure(name, loss_fn, params, run, other, o, key):
    if name == "worst_case":
        return sharpness.worst_case_sharpness(loss_fn, params, o.rho, key, steps=o.ascent_steps)
    if name == "worst_case_adaptive":
        return sharpness.worst_case_sharpness(loss_fn, params, o.rho_adaptive, key, adaptive=True,
                                              steps=o.ascent_steps)  # fmt: skip
    if name == "average_case":
        return sharpness.average_case_sharpness(loss_fn, params, o.sigma, key, n=o.samples, antithetic=o.antithetic)
    if name == "first_order":
        return sharpness.first_order_sharpness(loss_fn, params, o.rho)
    if name == "lambda_max":
        return hessian.top_eigenvalues(loss_fn, params, key, k=o.top_k, **_eigen_options(o))
    if name == "trace":
        return hessian.hessian_trace(loss_fn, params, key, n=o.trace_probes)
    if name == "density":
        return hessian.spectral_density(loss_fn, params, key, order=o.density_order, n_probes=o.density_probes)
    if name == "preconditioned":
        c = run.config.optimizer
        lr = run.learning_rate()
        result = hessian.preconditioned_top_eigenvalue(
            loss_fn, params, run.state.opt_state, key, learning_rate=lr or None, **_eigen_options(o),
            eps=c.eps, b1=c.b1, b2=c.b2, floor=o.preconditioned_floor,
        )  # fmt: skip
        # The thresholds at the last step's η are huge after a cosine decay to
        # ~0; the ones at the peak η are what training's stability was set by.
        return dict(
            to_json(result),
            peak_learning_rate=c.learning_rate,
            gd_threshold_at_peak=2 / c.learning_rate,
            adam_threshold_at_peak=(2 + 2 * c.b1) / ((1 - c.b1) * c.learning_rate),
        )
    if name == "interpolation":
        curves = {"init -> final": landscape.interpolate(loss_fn, run.initial_state.params, params,
                                                          num=o.interpolation_points, t_range=(-0.25, 1.25))}  # fmt: skip
        if other is not None:
            this, that = _label(run), _label(other)
            if this == that:  # e.g. two seeds of one config: name them by folder
                this, that = os.path.basename(run.workdir.rstrip("/")), os.path.basename(other.workdir.rstrip("/"))
            curves[f"{this} -> {that}"] = landscape.interpolate(
                loss_fn, params, other.state.params, num=o.interpolation_points, t_range=(-0.25, 1.25)
            )
        return curves
    if name == "slice_1d":
        direction = landscape.random_direction(key, params)
        return landscape.surface_1d(loss_fn, params, direction, num=o.slice_points, span=(-o.span, o.span))
    if name == "surface_2d":
        k1, k2 = jax.random.split(key)
        d1, d2 = landscape.random_direction(k1, params), landscape.random_direction(k2, params)
        n = o.surface_points
        return landscape.surface_2d(loss_fn, params, d1, d2, num=(n, n), span=((-o.span, o.span),) * 2)
    raise AssertionError(name)


def _floats(values) -> np.ndarray:
    """JSON numbers (None for non-finite) as a float array with NaN."""
    return np.array(values, dtype=float)


def _headline(name: str, record: dict) -> str:
    """A short human summary of one result for the log line."""
    if name == "accuracy":
        return f"accuracy {100 * record['accuracy']:.2f}%, loss {record['loss']:.4g} on {record['info']['subset']}"
    if name in ("worst_case", "worst_case_adaptive", "average_case", "first_order"):
        err = record.get("standard_error")
        return f"{record['value']:.4g}" + (f" ± {err:.2g}" if err else "")
    if name == "lambda_max":
        return "top eigenvalues " + ", ".join(f"{v:.4g}" for v in record["eigenvalues"])
    if name == "trace":
        return f"{record['trace']:.4g} ± {record['standard_error']:.2g}"
    if name == "preconditioned":
        return f"{record['eigenvalue']:.4g}, {record.get('excluded', 0)} unmoved coordinates left out (Adam's threshold (2+2b1)/((1-b1)lr) at the peak lr: {record['adam_threshold_at_peak']:.4g})"
    if name == "density":
        return f"{len(record['grid'])} grid points"
    if name == "interpolation":
        return ", ".join(f"{k}: max loss {np.nanmax(_floats(v['loss'])):.3g}" for k, v in record.items()
                         if isinstance(v, dict))  # fmt: skip
    if name in ("slice_1d", "surface_2d"):
        losses = _floats(record["loss"])
        return f"loss range {np.nanmin(losses):.3g} .. {np.nanmax(losses):.3g}"
    return ""


def _label(run) -> str:
    """"resnet18 adam + sam": model, optimizer and SAM variant of a run."""
    sam = run.config.sam.name
    return f"{run.config.model.name} {run.config.optimizer.name}" + (f" + {sam}" if sam != "none" else "")


def _figure(plots, name, split, record, out_dir, run, other) -> str | None:
    label = _label(run)
    path = os.path.join(out_dir, f"{split}_{name}.png")
    if name == "interpolation":
        curves = [(k, v) for k, v in record.items() if isinstance(v, dict)]
        return plots.plot_curve(curves, path, title=f"{label}: linear interpolation ({split})", xlabel="t")
    if name == "slice_1d":
        return plots.plot_curve([(label, record)], path, title=f"{label}: random filter-normalized slice ({split})",
                                xlabel="step along the direction")  # fmt: skip
    if name == "surface_2d":
        return plots.plot_surface(record, path, title=f"{label}: loss surface ({split})")
    if name == "density":
        return plots.plot_spectral_density([(label, record)], path, title=f"{label}: Hessian spectral density ({split})")
    return None
