"""The oneDNN FFI convolution against XLA's, layer by layer and in the whole train step (issue 21, prototype).

    python scripts/conv_prototype.py layers [--models resnet18,vgg16] [--widths 1,0.125] [--out layers.json]
    python scripts/conv_prototype.py step [--widths 0.125,1] [--modes auto,onednn,hybrid] [--out step.json]

`layers`: every distinct convolution of the networks (shapes read from the
models themselves, batch `--batch`), timed for XLA's `lax.conv_general_dilated`
("xla"), jaxsam's `cpu_conv.conv_general_dilated` ("cpu_conv", what
`conv="auto"` runs) and `onednn_conv.conv_nhwc` ("onednn"): the forward alone,
and forward plus backward (value_and_grad of the sum of squares of the output
with respect to input and kernel), each jitted. The calls of the three take
turns, round after round, and each time is the median of the rounds.

`step`: the train step of scripts/bench.py (`conv="xla"`, `--model`) with the
convolutions as built ("auto"), all on oneDNN ("onednn"), or on oneDNN except
where cpu_conv writes matrix products, 1x1 kernels and maps of at most 2x2
("hybrid"); the steps take turns in one process. Reports images/s and cores
busy (CPU-seconds / wall-seconds) per step.

Threads: oneDNN (onednn-cpu-gomp) runs on OpenMP; set OMP_NUM_THREADS /
OMP_WAIT_POLICY in the environment of the whole run to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from jaxsam.models import cpu_conv, get_model, onednn_conv  # noqa: E402

NHWC = ("NHWC", "HWIO", "NHWC")


def layer_shapes(name: str, width: float, batch: int) -> list[dict]:
    """Distinct convolutions of one network's forward pass: shapes, strides, pads and how often each occurs."""
    seen: dict = {}
    real = cpu_conv.conv_general_dilated

    def record(lhs, rhs, window_strides, padding, *args, **kwargs):
        pads = cpu_conv._explicit_pads(padding, lhs.shape, rhs.shape, tuple(window_strides))
        key = (tuple(lhs.shape), tuple(rhs.shape), tuple(int(s) for s in window_strides), pads)
        seen[key] = seen.get(key, 0) + 1
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, *args, **kwargs)

    cpu_conv.conv_general_dilated = record
    try:
        model = get_model(name, width=width, conv="auto")
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((batch, 32, 32, 3)), train=False))
    finally:
        cpu_conv.conv_general_dilated = real
    return [dict(x=list(k[0]), w=list(k[1]), strides=list(k[2]), pads=[list(p) for p in k[3]], count=n)
            for k, n in seen.items()]  # fmt: skip


def _impls(strides, pads):
    return {
        "xla": lambda x, w: lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=NHWC),
        "cpu_conv": lambda x, w: cpu_conv.conv_general_dilated(x, w, strides, pads, dimension_numbers=NHWC),
        "onednn": lambda x, w: onednn_conv.conv_nhwc(x, w, strides, pads),
    }


def _take_turns(fns: dict, args, repeats: int, budget: float) -> dict:
    """{name: median seconds} over rounds in which every fn runs once; fewer rounds when slow (>= 3)."""
    first = {}
    for name, fn in fns.items():  # compile + one warm call each
        jax.block_until_ready(fn(*args))
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        first[name] = time.perf_counter() - start
    rounds = max(3, min(repeats, int(budget / max(sum(first.values()), 1e-9))))
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()} | {"rounds": rounds}


def bench_layers(args) -> dict:
    rows = []
    for name in args.models.split(","):
        for width in (float(v) for v in args.widths.split(",")):
            for layer in layer_shapes(name, width, args.batch):
                strides, pads = tuple(layer["strides"]), tuple(tuple(p) for p in layer["pads"])
                rng = np.random.RandomState(0)
                x = jnp.asarray(rng.randn(*layer["x"]), jnp.float32)
                w = jnp.asarray(rng.randn(*layer["w"]) * 0.05, jnp.float32)
                impls = _impls(strides, pads)
                fwd = {k: jax.jit(f) for k, f in impls.items()}
                both = {k: jax.jit(jax.value_and_grad(lambda x, w, f=f: jnp.sum(f(x, w) ** 2), (0, 1)))
                        for k, f in impls.items()}  # fmt: skip
                t_fwd = _take_turns(fwd, (x, w), args.repeats, args.budget)
                t_both = _take_turns(both, (x, w), args.repeats, args.budget)
                row = dict(model=name, width=width, **layer, fwd_ms={k: 1e3 * v for k, v in t_fwd.items() if k != "rounds"},
                           fwd_bwd_ms={k: 1e3 * v for k, v in t_both.items() if k != "rounds"},
                           rounds=[t_fwd["rounds"], t_both["rounds"]])  # fmt: skip
                rows.append(row)
                _print_row(row)
    rank = sorted(rows, key=lambda r: r["fwd_bwd_ms"]["onednn"] / r["fwd_bwd_ms"]["xla"])
    slowest = [dict(model=r["model"], width=r["width"], x=r["x"], w=r["w"], strides=r["strides"],
                    xla_over_onednn=r["fwd_bwd_ms"]["xla"] / r["fwd_bwd_ms"]["onednn"],
                    cpu_conv_over_onednn=r["fwd_bwd_ms"]["cpu_conv"] / r["fwd_bwd_ms"]["onednn"]) for r in rank[:3]]  # fmt: skip
    totals = {}
    for r in rows:
        t = totals.setdefault(f"{r['model']}@{r['width']:g}", {"fwd_ms": {}, "fwd_bwd_ms": {}})
        for part in ("fwd_ms", "fwd_bwd_ms"):
            for k, v in r[part].items():
                t[part][k] = t[part].get(k, 0.0) + v * r["count"]
    print("\nall convolutions of one step (ms, weighted by count):")
    for key, t in totals.items():
        print(f"  {key:16s} fwd " + " ".join(f"{k}={v:.0f}" for k, v in t["fwd_ms"].items())
              + " | fwd+bwd " + " ".join(f"{k}={v:.0f}" for k, v in t["fwd_bwd_ms"].items()))  # fmt: skip
    print("\nlayers where XLA is slowest relative to oneDNN (fwd+bwd):")
    for s in slowest:
        print(f"  {s['model']}@{s['width']:g} x={s['x']} w={s['w']} s={s['strides']}: "
              f"xla/onednn {s['xla_over_onednn']:.2f}x, cpu_conv/onednn {s['cpu_conv_over_onednn']:.2f}x")  # fmt: skip
    return dict(rows=rows, totals=totals, slowest=slowest)


def _print_row(r: dict) -> None:
    f, b = r["fwd_ms"], r["fwd_bwd_ms"]
    print(f"{r['model']:8s} w={r['width']:<5g} x={'x'.join(map(str, r['x'][1:])):9s} k={r['w'][0]}x{r['w'][0]} "
          f"{r['w'][2]:>3d}->{r['w'][3]:<3d} s{r['strides'][0]} n={r['count']} | fwd ms xla {f['xla']:7.1f} "
          f"cpu_conv {f['cpu_conv']:7.1f} onednn {f['onednn']:7.1f} | fwd+bwd ms xla {b['xla']:7.1f} "
          f"cpu_conv {b['cpu_conv']:7.1f} onednn {b['onednn']:7.1f} | onednn/xla {b['onednn'] / b['xla']:.2f} "
          f"onednn/cpu_conv {b['onednn'] / b['cpu_conv']:.2f}", flush=True)  # fmt: skip


def bench_step(args) -> dict:
    import bench  # scripts/bench.py: the same train step it times

    real = cpu_conv.conv_general_dilated
    mode = {"now": "auto"}

    def switch(lhs, rhs, *a, **k):
        use = mode["now"] == "onednn" or (
            mode["now"] == "hybrid" and rhs.shape[:2] != (1, 1) and lhs.shape[1] * lhs.shape[2] > cpu_conv.SMALL_MAP)
        return onednn_conv.conv_general_dilated(lhs, rhs, *a, **k) if use else real(lhs, rhs, *a, **k)

    cpu_conv.conv_general_dilated = switch
    results = []
    for width in (float(v) for v in args.widths.split(",")):
        steps = {}
        for m in args.modes.split(","):
            mode["now"] = m  # read while the step is traced, at its first call
            step = bench._jax_train(dict(model=args.model, width=width, conv="xla", batch=args.batch))
            start = time.perf_counter()
            step.sync(step.call())
            steps[m] = (step, time.perf_counter() - start)
        times = {m: [] for m in steps}
        cores = {m: [] for m in steps}
        in_onednn = {m: [] for m in steps}
        for _ in range(args.repeats):
            for m, (step, _) in steps.items():
                b0 = onednn_conv.busy_seconds()
                r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                step.sync(step.call())
                t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
                times[m].append(t1 - t0)
                cores[m].append((r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) / (t1 - t0))
                in_onednn[m].append((onednn_conv.busy_seconds() - b0) / (t1 - t0))
        row = dict(model=args.model, width=width, batch=args.batch, repeats=args.repeats,
                   env={k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
                                            "JAXSAM_ONEDNN_THREADING")},
                   first_call_s={m: s[1] for m, s in steps.items()},
                   images_per_s={m: args.batch / statistics.median(t) for m, t in times.items()},
                   cores_busy={m: statistics.median(c) for m, c in cores.items()},
                   # seconds inside oneDNN calls (summed over the threads that made them) per step second
                   onednn_share={m: statistics.median(c) for m, c in in_onednn.items()},
                   process_threads=len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else None)  # fmt: skip
        results.append(row)
        print(f"{args.model} width {width:g} batch {args.batch} (median of {args.repeats}; env {row['env']}; "
              f"{row['process_threads']} threads in the process):")
        for m in steps:
            print(f"  {m:7s} {row['images_per_s'][m]:7.1f} img/s  cores busy {row['cores_busy'][m]:.2f}  "
                  f"in oneDNN {row['onednn_share'][m]:.2f}  "
                  f"first call {row['first_call_s'][m]:.1f} s", flush=True)  # fmt: skip
    cpu_conv.conv_general_dilated = real
    return dict(steps=results)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["layers", "step"])
    p.add_argument("--models", default="resnet18,vgg16")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--widths", default="1,0.125")
    p.add_argument("--modes", default="auto,onednn,hybrid")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--budget", type=float, default=8.0, help="seconds of timed rounds per layer and mode, about")
    p.add_argument("--out", default="")
    args = p.parse_args()
    if not onednn_conv.AVAILABLE:
        sys.exit(onednn_conv.NOTICE)
    result = bench_layers(args) if args.what == "layers" else bench_step(args)
    result["meta"] = dict(argv=sys.argv, jax=jax.__version__, date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                          cpus=os.cpu_count(), onednn_cache=onednn_conv.cache_size())  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
