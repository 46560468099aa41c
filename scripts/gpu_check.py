"""What one accelerator does with jaxsam, measured in one command: python scripts/gpu_check.py --out DIR [--tiny].

Writes DIR/gpu_check.json after every section, so a run stopped by a time
limit keeps what it measured:

* `train`: train-step images/s and model FLOP utilization (the compiled
  step's FLOPs from XLA's cost analysis, over the chip's dense peak) for
  ResNet18 and VGG16, float32 and bfloat16, batch 128 and 512;
* `ratios`: SAM / base step time (ResNet18, float32, batch 128), and
  Hessian-vector product / gradient time on the geometry's loss;
* `geometry`: a measure (top eigenvalue) called twice on other data of the
  same shapes, with the programs compiled by each call (the second: none);
* `cifar10`: a 5-epoch full-width ResNet18 SGD run on the real CIFAR-10
  (JAXSAM_CIFAR10 or ../shared/data/cifar10/cifar-10-binary.tar.gz), its
  test accuracy and epoch times.

`--tiny` runs every section at CPU size (width 1/16, batch 16, synthetic data
for the run) in about a minute; the tests run it. `scripts/gpu_check.sh DIR`
is the one command for a GPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_ARCHIVE = os.path.join(ROOT, "..", "shared", "data", "cifar10", "cifar-10-binary.tar.gz")
# Dense peaks (no sparsity) by the vendor's datasheets, FLOP/s. float32 convolutions and matrix
# products run on TF32 tensor cores under JAX's default precision on Ampere and later.
PEAKS = {
    "NVIDIA H200": {"bfloat16": 989e12, "float32": 494e12},
    "NVIDIA H100 80GB HBM3": {"bfloat16": 989e12, "float32": 494e12},
    "NVIDIA A100-SXM4-80GB": {"bfloat16": 312e12, "float32": 156e12},
}


def _timed_steps(step, state, images, labels, repeats: int) -> tuple[float, object]:
    """Seconds per call of `step` after two warm-up calls (the first compiles)."""
    import jax

    for _ in range(2):
        state, sums = step(state, images, labels)
    jax.block_until_ready(sums)
    start = time.perf_counter()
    for _ in range(repeats):
        state, sums = step(state, images, labels)
    jax.block_until_ready(sums)
    return (time.perf_counter() - start) / repeats, state


def _train_step(model_name: str, width: float, dtype: str, batch: int, sam: str = "none"):
    """A jitted train step over every device, its state and a random uint8 batch."""
    import jax
    import numpy as np

    from jaxsam import parallel
    from jaxsam.config import base_config
    from jaxsam.models import get_model
    from jaxsam.train import create_train_state, make_optimizer, make_train_step

    c = base_config("full")
    c.sam.name = sam
    mesh = parallel.data_mesh()
    model = get_model(model_name, 10, width=width, dtype=dtype)
    tx, _ = make_optimizer(c, steps_per_epoch=390)
    state = parallel.put_replicated(create_train_state(model, tx, jax.random.key(0)), mesh)
    rng = np.random.default_rng(0)
    images = parallel.put_batch(rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8), mesh)
    labels = parallel.put_batch(rng.integers(0, 10, batch).astype(np.int32), mesh)
    return make_train_step(model, tx, mesh), state, images, labels


def _compiled(step, state, images, labels):
    """The step compiled once, and its FLOPs by XLA's cost analysis (None where the backend gives none)."""
    compiled = step.lower(state, images, labels).compile()
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 (a backend without cost analysis)
        cost = None
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return compiled, (float(cost["flops"]) if cost and "flops" in cost else None)


def section_train(args) -> list[dict]:
    import jax

    rows = []
    kind = jax.devices()[0].device_kind
    for model, dtype in args.combinations:
        for batch in args.batches:
            step, state, images, labels = _train_step(model, args.width, dtype, batch)
            step, flops = _compiled(step, state, images, labels)
            seconds, _ = _timed_steps(step, state, images, labels, args.repeats)
            peak = PEAKS.get(kind, {}).get(dtype)
            rows.append({
                "model": model, "dtype": dtype, "batch": batch, "step_seconds": seconds,
                "images_per_sec": batch / seconds, "step_flops": flops,
                "mfu": flops / seconds / (peak * jax.device_count()) if flops and peak else None,
            })  # fmt: skip
            print(f"train {model} {dtype} batch {batch}: {batch / seconds:,.0f} img/s", flush=True)
    return rows


def section_ratios(args) -> dict:
    import jax
    import numpy as np

    from jaxsam import data
    from jaxsam.geometry import make_loss_fn
    from jaxsam.models import get_model

    batch = args.batches[0]
    base, state = _timed_steps(*_train_step("resnet18", args.width, "float32", batch), args.repeats)
    sam = _timed_steps(*_train_step("resnet18", args.width, "float32", batch, sam="sam"), args.repeats)[0]
    model = get_model("resnet18", 10, width=args.width)
    rng = np.random.default_rng(1)
    n = args.geometry_examples
    images, labels = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int32)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    loss_fn = make_loss_fn(model, variables, images, labels, preprocess=data.normalize, batch_size=min(n, 512))
    grad = jax.jit(lambda loss, p: loss.value_and_grad(p))
    hvp = jax.jit(lambda loss, p, v: loss.hvp(p, v))
    params = state.params
    t_grad = _timed_call(lambda: grad(loss_fn, params), args.repeats)
    t_hvp = _timed_call(lambda: hvp(loss_fn, params, params), args.repeats)
    return {"sam_over_base": sam / base, "base_step_seconds": base, "sam_step_seconds": sam,
            "hvp_over_gradient": t_hvp / t_grad, "gradient_seconds": t_grad, "hvp_seconds": t_hvp,
            "geometry_examples": n}  # fmt: skip


def _timed_call(fn, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn())
    jax.block_until_ready(fn())
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats


def section_geometry(args) -> dict:
    import jax
    import numpy as np

    from jaxsam import data
    from jaxsam.geometry import make_loss_fn, top_eigenvalues
    from jaxsam.models import get_model

    model = get_model("resnet18", 10, width=args.width)
    variables = model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32), train=False)
    compiled: list[str] = []

    def listener(event, *_, **__):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    calls = []
    try:
        for seed in (1, 2):  # other data, same shapes
            rng = np.random.default_rng(seed)
            n = args.geometry_examples
            images, labels = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int32)
            loss_fn = make_loss_fn(model, variables, images, labels, preprocess=data.normalize, batch_size=min(n, 512))
            before, start = len(compiled), time.perf_counter()
            result = top_eigenvalues(loss_fn, variables["params"], jax.random.key(seed), k=1)
            calls.append({"seconds": time.perf_counter() - start, "compiled_programs": len(compiled) - before,
                          "lambda_max": float(np.asarray(result.eigenvalues)[0])})  # fmt: skip
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return {"measure": "top_eigenvalues k=1", "calls": calls, "second_call_compiles_nothing": calls[1]["compiled_programs"] == 0}


def section_cifar10(args) -> dict:
    from jaxsam.config import base_config
    from jaxsam.files import read_jsonl
    from jaxsam.train import train_and_evaluate

    workdir = os.path.join(args.out, "cifar10_run")
    if args.tiny:
        config = base_config("smoke")
        config.train.num_epochs = 1
    else:
        archive = os.environ.get("JAXSAM_CIFAR10") or SHARED_ARCHIVE
        if not os.path.exists(archive):
            return {"skipped": f"no CIFAR-10 archive at {archive}: set JAXSAM_CIFAR10 (carry the file to this machine)"}
        config = base_config("full")
        config.data.source, config.data.path = "archive", archive
        config.train.num_epochs = 5
    config.train.progress = False
    start = time.perf_counter()
    record = train_and_evaluate(config, workdir)
    epochs = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "epoch_done" in r]
    return {"model": config.model.name, "width": config.model.width, "epochs": len(epochs),
            "test_accuracy": record["test_accuracy"], "train_accuracy": record.get("train_accuracy"),
            "epoch_seconds": [r["epoch_seconds"] for r in epochs],
            "train_images_per_sec": [r["train_images_per_sec"] for r in epochs],
            "wall_seconds": time.perf_counter() - start}  # fmt: skip


SECTIONS = {"train": section_train, "ratios": section_ratios, "geometry": section_geometry, "cifar10": section_cifar10}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json (and the 5-epoch run)")
    parser.add_argument("--tiny", action="store_true", help="CPU size: width 1/16, batch 16, synthetic data")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {','.join(SECTIONS)}")
    parser.add_argument("--budget_s", type=float, default=None,
                        help="sections not started by then are skipped (default 400 s; none with --tiny)")
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        print(f"error: unknown section {unknown[0]!r}: choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    if args.budget_s is None:
        args.budget_s = float("inf") if args.tiny else 400.0
    # --tiny: each network and each dtype once (the CPU compiles a ResNet step in tens of seconds).
    args.combinations = ([("resnet18", "float32"), ("vgg16", "bfloat16")] if args.tiny else
                         [(m, d) for m in ("resnet18", "vgg16") for d in ("float32", "bfloat16")])  # fmt: skip
    args.width = 0.0625 if args.tiny else 1.0
    args.batches = (16,) if args.tiny else (128, 512)
    args.repeats = 2 if args.tiny else 20
    args.geometry_examples = 64 if args.tiny else 4096
    os.makedirs(args.out, exist_ok=True)

    import jax

    from jaxsam.files import write_json

    devices = jax.devices()
    result = {"jax": jax.__version__, "backend": jax.default_backend(), "devices": len(devices),
              "device_kind": devices[0].device_kind, "host": platform.node(), "tiny": args.tiny,
              "peak_flops": PEAKS.get(devices[0].device_kind)}  # fmt: skip
    start = time.perf_counter()
    path = os.path.join(args.out, "gpu_check.json")
    failed = False
    for name in chosen:
        if time.perf_counter() - start > args.budget_s:
            result[name] = {"skipped": f"over the {args.budget_s:.0f} s budget"}
        else:
            section_start = time.perf_counter()
            try:
                result[name] = SECTIONS[name](args)
            except Exception as err:  # noqa: BLE001 (one section's failure must not lose the others)
                failed = True
                result[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:]}
            if isinstance(result[name], dict):
                result[name]["section_seconds"] = time.perf_counter() - section_start
        write_json(path, result)
        print(f"{name}: done at {time.perf_counter() - start:.0f} s", flush=True)
    print(json.dumps({k: v for k, v in result.items() if k not in SECTIONS}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
