"""Benchmarks, side by side in one run: python scripts/bench.py [--size full|cpu] [--out bench.json].

Measures, each in its own subprocess (so peak memory is its own), as the
median over `--repeats` timed calls after compilation:

* train step images/s of ResNet18 and VGG16, jaxsam (CPU convolution
  `conv="auto"` and XLA's `conv="native"`) against a PyTorch reference of the
  identical network (scripts/torch_reference.py; skipped with a message when
  torch is not installed);
* SAM step / base step and LookSAM(k=5) step / base step;
* Hessian-vector product time / gradient time, and how many HVPs Lanczos
  needs for λmax to 1e-2 relative accuracy;
* data pipeline images/s (host batching + on-device augmentation) against
  what the train step consumes;
* bfloat16 compute against float32;

with compile time and peak RSS of each. Ratios are taken within the run (the
machine's speed drifts between runs). `--size cpu` uses the `:cpu` width
(1/8) for a quick pass; `--size full` the published networks.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_HINT = "pip install torch==2.13.0  (CPU build; or --index-url https://download.pytorch.org/whl/cpu)"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn, repeats: int, sync) -> tuple[float, float]:
    """(first call seconds, median of `repeats` further calls)."""
    start = time.perf_counter()
    sync(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


# ---------------------------------------------------------------- workers (subprocess side)


def _jax_train(spec: dict) -> dict:
    import jax
    import numpy as np

    from jaxsam import parallel
    from jaxsam.config import base_config
    from jaxsam.models import get_model
    from jaxsam.train import create_train_state, make_optimizer, make_train_step

    c = base_config("full")
    c.sam.name, c.sam.k = spec.get("sam", "none"), 5
    mesh = parallel.data_mesh()
    model = get_model(spec["model"], 10, width=spec["width"], dtype=spec.get("dtype", "float32"), conv=spec["conv"])
    tx, _ = make_optimizer(c, steps_per_epoch=100)
    state = parallel.put_replicated(create_train_state(model, tx, jax.random.key(0)), mesh)
    rng = np.random.RandomState(0)
    batch = spec["batch"]
    images = parallel.put_batch(rng.randint(0, 256, (batch, 32, 32, 3)).astype(np.uint8), mesh)
    labels = parallel.put_batch(rng.randint(0, 10, batch).astype(np.int32), mesh)
    # LookSAM takes its SAM step every k-th update: time whole cycles of k steps,
    # with the SAM and reuse steps compiled separately on CPU as the train loop does.
    looksam = spec.get("sam") == "looksam"
    per_call = 5 if looksam else 1
    if looksam and jax.default_backend() == "cpu":
        sam_step, reuse_step = (make_train_step(model, tx, mesh, sam_step=flag) for flag in (True, False))
        steps = [sam_step] + [reuse_step] * (per_call - 1)
    else:
        steps = [make_train_step(model, tx, mesh)] * per_call
    holder = {"state": state}

    def call():
        for i in range(per_call):
            holder["state"], sums = steps[i](holder["state"], images, labels)
        return sums

    first, median = _timed(call, spec["repeats"], jax.block_until_ready)
    seconds = median / per_call
    return {"seconds_per_step": seconds, "images_per_s": batch / seconds, "compile_s": first - median}


def _torch_train(spec: dict) -> dict:
    import torch

    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from torch_reference import MODELS

    torch.manual_seed(0)
    model = MODELS[spec["model"]](10, spec["width"]).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    batch = spec["batch"]
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))

    def call():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    first, median = _timed(call, spec["repeats"], lambda loss: loss.item())
    return {
        "seconds_per_step": median,
        "images_per_s": batch / median,
        "compile_s": first - median,
        "threads": torch.get_num_threads(),
    }


def _hvp(spec: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxsam.geometry.hessian import hvp
    from jaxsam.models import get_model

    model = get_model(spec["model"], 10, width=spec["width"])
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(spec["batch"], 32, 32, 3).astype(np.float32))
    y = jnp.asarray(rng.randint(0, 10, spec["batch"]))
    variables = jax.jit(lambda k: model.init(k, x[:1], train=False))(jax.random.key(0))
    params = variables["params"]

    def loss(p):
        logits = model.apply({**variables, "params": p}, x, train=False)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

    grad = jax.jit(jax.grad(loss))
    product = jax.jit(lambda p, v: hvp(loss, p, v))
    v = jax.tree.map(jnp.ones_like, params)
    g_first, g = _timed(lambda: grad(params), spec["repeats"], jax.block_until_ready)
    h_first, h = _timed(lambda: product(params, v), spec["repeats"], jax.block_until_ready)
    return {"grad_s": g, "hvp_s": h, "hvp_over_grad": h / g, "compile_s": g_first - g + h_first - h}


def _lanczos(spec: dict) -> dict:
    import jax
    import numpy as np

    from jaxsam import data
    from jaxsam.geometry import hessian
    from jaxsam.geometry.loss import make_loss_fn
    from jaxsam.models import get_model
    from jaxsam.train import load_run

    n, iters = spec["n"], spec["iters"]
    if spec.get("workdir"):
        run = load_run(spec["workdir"])
        model, variables = run.model, {"params": run.state.params, "batch_stats": run.state.batch_stats}
        images, labels, where = run.dataset.train.images[:n], run.dataset.train.labels[:n], spec["workdir"]
    else:
        model = get_model(spec["model"], 10, width=spec["width"])
        variables = jax.jit(lambda k: model.init(k, np.zeros((1, 32, 32, 3), np.float32), train=False))(
            jax.random.key(0)
        )
        train = _examples(n)
        images, labels, where = train.images[:n], train.labels[:n], "initialization"
    loss_fn = make_loss_fn(model, variables, images, labels, batch_size=256)
    start = time.perf_counter()
    result = hessian.top_eigenvalues(loss_fn, variables["params"], jax.random.key(0), iters=iters)
    seconds = time.perf_counter() - start
    final = float(result.eigenvalues[0])
    history = np.asarray(result.history)[:, 0]
    within = np.abs(history - final) <= 1e-2 * abs(final)
    # The first step after which every later estimate stays within 1e-2 of the final one.
    needed = next(int(result.history_iterations[i]) for i in range(len(within)) if within[i:].all())
    return {"lambda_max": final, "hvps_to_1e-2": needed, "iters": iters, "n": n, "at": where, "seconds": seconds}


def _archive() -> str | None:
    path = os.environ.get("JAXSAM_CIFAR10") or os.path.join(ROOT, "..", "shared", "data", "cifar10",
                                                            "cifar-10-binary.tar.gz")  # fmt: skip
    return path if os.path.exists(path) else None


def _examples(n: int):
    """n training examples of the real archive when it is there, else synthetic ones."""
    from jaxsam import data

    if _archive():
        return data.load_dataset("archive", path=_archive(), n_train=n, n_test=1).train
    return data.load_dataset("synthetic", synthetic_size=(n, 1), n_test=1).train


def _data(spec: dict) -> dict:
    import jax

    from jaxsam import data, parallel

    mesh = parallel.data_mesh()
    batch, steps = spec["batch"], spec["steps"]
    train, source = _examples(batch * steps), "archive" if _archive() else "synthetic"
    augment = jax.jit(lambda key, x: data.augment(key, x, first_index=0))

    def epoch():
        out = None
        for i, (images, labels) in enumerate(data.train_batches(train, batch, seed=0, epoch=0)):
            out = augment(jax.random.key(i), parallel.put_batch(images, mesh))
        return out

    first, median = _timed(epoch, spec["repeats"], jax.block_until_ready)
    return {"images_per_s": batch * steps / median, "source": source, "compile_s": first - median}


WORKERS = {"jax_train": _jax_train, "torch_train": _torch_train, "hvp": _hvp, "lanczos": _lanczos, "data": _data}


def _worker(spec: dict) -> None:
    result = WORKERS[spec["kind"]](spec)
    result["peak_rss_mb"] = _peak_rss_mb()
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------- driver (parent side)


def _run(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": tail}


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("full", "cpu"), default="full")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sections", default="train,sam,hvp,lanczos,data,bf16")
    parser.add_argument("--native", action="store_true", help="also time XLA's own convolution (slow on CPU)")
    parser.add_argument("--lanczos_examples", type=int, default=512)
    parser.add_argument("--lanczos_iters", type=int, default=40)
    parser.add_argument("--workdir", default="", help="measure λmax at this run's checkpoint (default: at init)")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--out", default="bench.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(json.loads(args.worker))
        return

    width = 1.0 if args.size == "full" else 0.125
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    torch_ok = _torch_available()
    if not torch_ok:
        print(f"PyTorch not installed: the side-by-side comparison is skipped. To include it: {TORCH_HINT}")
    results: dict = {"size": args.size, "batch": args.batch, "repeats": args.repeats, "width": width, "rows": []}
    rows = results["rows"]

    def record(section: str, name: str, spec: dict) -> dict:
        spec = dict(spec, repeats=args.repeats)
        print(f"[{section}] {name} ...", end=" ", flush=True)
        result = _run(spec, args.timeout)
        rows.append({"section": section, "name": name, "spec": spec, **result})
        shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items()}
        print(shown, flush=True)
        return result

    base = dict(kind="jax_train", width=width, batch=args.batch, conv="auto")
    if "train" in sections:
        for model in ("resnet18", "vgg16"):
            jax_row = record("train", f"{model} jaxsam", dict(base, model=model))
            if args.native:
                native = record("train", f"{model} jaxsam native conv", dict(base, model=model, conv="native"))
                if "images_per_s" in native and "images_per_s" in jax_row:
                    rows[-1]["auto_over_native"] = jax_row["images_per_s"] / native["images_per_s"]
            if torch_ok:
                ref = record("train", f"{model} pytorch", dict(kind="torch_train", model=model, width=width,
                                                                 batch=args.batch))  # fmt: skip
                if "images_per_s" in ref and "images_per_s" in jax_row:
                    rows[-1]["jaxsam_over_pytorch"] = jax_row["images_per_s"] / ref["images_per_s"]
    if "sam" in sections:
        plain = record("sam", "resnet18 base", dict(base, model="resnet18"))
        for variant in ("sam", "looksam"):
            r = record("sam", f"resnet18 {variant}", dict(base, model="resnet18", sam=variant))
            if "seconds_per_step" in r and "seconds_per_step" in plain:
                rows[-1]["over_base"] = r["seconds_per_step"] / plain["seconds_per_step"]
    if "hvp" in sections:
        record("hvp", "resnet18 hvp vs grad", dict(kind="hvp", model="resnet18", width=width, batch=args.batch))
    if "lanczos" in sections:
        record("lanczos", "resnet18 lambda_max", dict(kind="lanczos", model="resnet18", width=width,
                                                      n=args.lanczos_examples, iters=args.lanczos_iters,
                                                      workdir=args.workdir))  # fmt: skip
    if "data" in sections:
        d = record("data", "pipeline", dict(kind="data", batch=args.batch, steps=20))
        consumed = [r["images_per_s"] for r in rows if r["spec"]["kind"] == "jax_train" and "images_per_s" in r]
        if consumed and "images_per_s" in d:
            rows[-1]["over_fastest_step"] = d["images_per_s"] / max(consumed)
    if "bf16" in sections:
        f32 = record("bf16", "resnet18 float32", dict(base, model="resnet18"))
        bf16 = record("bf16", "resnet18 bfloat16", dict(base, model="resnet18", dtype="bfloat16"))
        if "images_per_s" in f32 and "images_per_s" in bf16:
            rows[-1]["over_float32"] = bf16["images_per_s"] / f32["images_per_s"]

    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    _print_table(rows)
    print(f"wrote {args.out}")


def _print_table(rows: list[dict]) -> None:
    print("\n| section | what | images/s | s/step | ratio | compile s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    ratio_keys = ("jaxsam_over_pytorch", "auto_over_native", "over_base", "hvp_over_grad", "over_fastest_step", "over_float32")
    for r in rows:
        if "error" in r:
            print(f"| {r['section']} | {r['name']} | error: {r['error']} | | | | |")
            continue
        ratio = next((f"{k} {r[k]:.2f}" for k in ratio_keys if k in r), "")
        if r["section"] == "lanczos":
            ratio = f"λmax {r['lambda_max']:.4g}: {r['hvps_to_1e-2']} HVPs to 1e-2 ({r['n']} examples, at {r['at']})"
        ips = f"{r['images_per_s']:.1f}" if "images_per_s" in r else ""
        sps = f"{r['seconds_per_step']:.3f}" if "seconds_per_step" in r else (
            f"grad {r['grad_s']:.3f}, hvp {r['hvp_s']:.3f}" if "hvp_s" in r else "")  # fmt: skip
        print(f"| {r['section']} | {r['name']} | {ips} | {sps} | {ratio} | {r.get('compile_s', 0):.1f} | "
              f"{r.get('peak_rss_mb', 0):.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
