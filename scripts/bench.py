"""Benchmarks, side by side in one run: python scripts/bench.py [--size full|cpu] [--out bench.json].

Measures, after compilation, as medians over `--repeats` timed calls:

* train step images/s of ResNet18 and VGG16, jaxsam (`model.conv="auto"`,
  or each of `--convs`, e.g. `--convs xla,onednn`: the oneDNN extension off
  and on; `native`: XLA's own convolution) against a PyTorch reference of the
  identical network (scripts/torch_reference.py; skipped with a message when
  torch is not installed);
* every SAM-family step / base step: SAM, ASAM, GSAM, F-SAM, VaSSO (two
  gradients a step), LookSAM(k=5) (1 + 1/5) and Momentum-SAM (one gradient,
  at the point the transform names);
* Hessian-vector product time / gradient time, and how many HVPs Lanczos
  needs for λmax to 1e-2 relative accuracy (`--lanczos_examples`, default
  4,096; at a trained run's checkpoint with --workdir);
* data pipeline images/s (host batching + on-device augmentation) against
  what the fastest train step consumes;
* bfloat16 compute against float32;
* one gradient inside `fori_loop`/`scan` against outside (XLA:CPU's weakness
  that jaxsam/geometry/driver.py works around);

with compile time and peak RSS of each, and for the compared steps the cores
their threads kept busy (the worker's CPU-seconds / wall-seconds over the timed
calls). `--train_batches 64,128` times the train section at each batch size. Every measurement runs in its own
process, so its peak memory is its own. Steps that are compared (jaxsam vs
PyTorch, SAM vs base, bf16 vs f32) run in warm processes that take turns, one
call each per round, so both sides of a ratio see the same stretches of this
drifting machine; the other ratios alternate their calls within one process.
`--size cpu` uses the `:cpu` width (1/8) for a quick pass; `--size full` the
published networks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import queue
import tempfile
import threading
import time


TORCH_HINT = "pip install torch==2.13.0  (CPU build; or --index-url https://download.pytorch.org/whl/cpu)"
# The worker processes run scripts/bench_workers.py.
WORKERS_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_workers.py")

SECTIONS = ("train", "sam", "hvp", "lanczos", "data", "bf16", "loops")
CONVS = ("auto", "xla", "native", "onednn")  # jaxsam.models.layers.CONV_IMPLS (not imported: this process runs no JAX)
# The `sam` section's rows: (config sam.name, label); the targets: ≤ 2.1x for the two-gradient
# members, ≤ 1.3x for LookSAM(5), ≤ 1.1x for Momentum-SAM.
SAM_MEMBERS = (("sam", "SAM"), ("asam", "ASAM"), ("gsam", "GSAM"), ("fsam", "F-SAM"), ("vasso", "VaSSO"),
               ("looksam", "LookSAM(5)"), ("msam", "Momentum-SAM"))


# ---------------------------------------------------------------- driver (parent side)


def _run(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, WORKERS_SCRIPT, "--worker", json.dumps(spec)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": tail}


class _Server:
    """A `--serve` worker process and a thread that queues its protocol lines (READY/TIME/DONE)."""

    def __init__(self, spec: dict):
        self.stderr = tempfile.TemporaryFile(mode="w+")
        cmd = [sys.executable, WORKERS_SCRIPT, "--serve", json.dumps(spec)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(("READY ", "TIME ", "DONE ")):
                self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def expect(self, word: str, deadline: float) -> str:
        try:
            line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise RuntimeError(f"timed out waiting for {word}") from None
        if line is None or not line.startswith(word + " "):
            self.stderr.seek(0)
            tail = (self.stderr.read().strip().splitlines() or ["worker exited without output"])[-1]
            raise RuntimeError(tail)
        return line[len(word) + 1:]

    def send(self, text: str) -> None:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.stderr.close()


def _interleaved(specs: list[dict], rounds: int, timeout: float, pause: float = 0.2) -> list[dict]:
    """Times the steps of `specs` in turn, one call each per round, each in its own warm process.

    Each worker compiles and runs one call first; then round after round every
    worker times one call while the others wait idle (`pause` seconds between
    calls let the previous one's thread pool go quiet). A ratio of two medians
    so measured compares the same stretches of a drifting machine. Returns one
    dict per spec: seconds_per_step, images_per_s, compile_s, peak_rss_mb, round_s,
    cores_busy (the worker's CPU-seconds over its wall-seconds in the timed calls: how
    many cores its threads kept busy) (or "error").
    """
    deadline = time.monotonic() + timeout
    servers, out = [], [dict() for _ in specs]
    try:
        for spec, result in zip(specs, out):
            server = _Server(spec)
            servers.append(server)
            try:
                result["first_s"] = json.loads(server.expect("READY", deadline))["first_s"]
            except RuntimeError as e:
                result["error"] = str(e)
        live = [(server, result) for server, result in zip(servers, out) if "error" not in result]
        for _ in range(rounds):
            for server, result in live:
                time.sleep(pause)
                server.send("step")
                wall, cpu = map(float, server.expect("TIME", deadline).split())
                result.setdefault("round_s", []).append(wall)
                result.setdefault("round_cpu_s", []).append(cpu)
        for server, result in live:
            server.send("done")
            result.update(json.loads(server.expect("DONE", deadline)))
    except RuntimeError as e:
        for result in out:
            result.setdefault("error", str(e))
    finally:
        for server in servers:
            server.close()
    for result in out:
        if "round_s" in result and "error" not in result:
            median = statistics.median(result["round_s"])
            result["seconds_per_step"] = median / result["steps"]
            result["images_per_s"] = result["batch"] / result["seconds_per_step"]
            result["compile_s"] = result.pop("first_s") - median
            result["cores_busy"] = sum(result["round_cpu_s"]) / sum(result["round_s"])
    return out


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
    parser.add_argument("--train_batches", default="",
                        help="comma-separated batch sizes for the train section (default: --batch), e.g. 64,128")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls (rounds) per measurement")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of: {','.join(SECTIONS)}")
    parser.add_argument("--convs", default="auto",
                        help="comma-separated model.conv values the train section times, e.g. xla,onednn "
                             "(the oneDNN extension off and on; onednn needs the cpu-fast extra) or auto,native")  # fmt: skip
    parser.add_argument("--lanczos_examples", type=int, default=4096)
    parser.add_argument("--lanczos_iters", type=int, default=40)
    parser.add_argument("--eigen_examples", type=int, default=512,
                        help="examples of the Hessian whose top-3 eigenpairs eigen.top_eigenpairs and eigsh solve")
    parser.add_argument("--workdir", default="", help="measure λmax at this run's checkpoint (default: at init)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per measurement")
    parser.add_argument("--out", default="bench.json")
    args = parser.parse_args()
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    try:
        train_batches = [int(b) for b in args.train_batches.split(",") if b.strip()] or [args.batch]
    except ValueError:
        parser.error(f"--train_batches={args.train_batches!r}: give comma-separated integers, e.g. 64,128")
    if unknown or args.repeats < 1 or min([args.batch, *train_batches]) < 1:
        parser.error(f"unknown sections {unknown}: use some of {','.join(SECTIONS)}" if unknown
                     else "--repeats, --batch and --train_batches must be at least 1")  # fmt: skip
    if os.path.exists(args.out) and not os.path.isfile(args.out):
        parser.error(f"--out {args.out} is not a file: give a file path for the JSON results")
    bad_convs = sorted({c.strip() for c in args.convs.split(",") if c.strip()} - set(CONVS))
    if bad_convs or not args.convs.strip():
        parser.error(f"--convs={args.convs!r}: use some of {','.join(CONVS)}, e.g. --convs xla,onednn")

    width = 1.0 if args.size == "full" else 0.125
    torch_ok = _torch_available()
    if not torch_ok:
        print(f"PyTorch not installed: the side-by-side comparison is skipped. To include it: {TORCH_HINT}")
    results: dict = {"size": args.size, "batch": args.batch, "repeats": args.repeats, "width": width, "rows": []}
    rows = results["rows"]

    def show(section: str, name: str, spec: dict, result: dict) -> dict:
        rows.append({"section": section, "name": name, "spec": spec, **result})
        shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items()
                 if k not in ("round_s", "round_cpu_s")}
        print(f"[{section}] {name}: {shown}", flush=True)
        return rows[-1]

    def record(section: str, name: str, spec: dict) -> dict:
        spec = dict(spec, repeats=args.repeats)
        print(f"[{section}] {name} ...", flush=True)
        return show(section, name, spec, _run(spec, args.timeout))

    def record_interleaved(section: str, named_specs: list[tuple[str, dict]]) -> list[dict]:
        print(f"[{section}] {', '.join(n for n, _ in named_specs)}: taking turns, {args.repeats} rounds ...", flush=True)
        results = _interleaved([s for _, s in named_specs], args.repeats, args.timeout)
        return [show(section, n, s, r) for (n, s), r in zip(named_specs, results)]

    def ratio(row: dict, key: str, over: dict, field: str = "images_per_s", invert: bool = False) -> None:
        if field in row and field in over:
            row[key] = over[field] / row[field] if invert else row[field] / over[field]

    base = dict(kind="jax_train", width=width, batch=args.batch, conv="auto")
    if "train" in sections:
        convs = [c.strip() for c in args.convs.split(",") if c.strip()]
        for model, batch in ((m, b) for m in ("resnet18", "vgg16") for b in train_batches):
            at = dict(base, model=model, batch=batch)
            group = [(f"{model} jaxsam {conv} conv b{batch}", dict(at, conv=conv)) for conv in convs]
            if torch_ok:
                group.append((f"{model} pytorch b{batch}", dict(kind="torch_train", model=model, width=width,
                                                                batch=batch)))  # fmt: skip
            done = record_interleaved("train", group)
            torch_row = next((r for r in done if r["spec"]["kind"] == "torch_train"), None)
            for row in done:
                if row["spec"]["kind"] != "jax_train":
                    continue
                if torch_row is not None:
                    ratio(row, "over_pytorch", torch_row)
                if row is not done[0]:
                    ratio(row, f"over_{done[0]['spec']['conv']}", done[0])
    if "sam" in sections:
        plain, *variants = record_interleaved("sam", [("resnet18 base", dict(base, model="resnet18"))] + [
            (f"resnet18 {label}", dict(base, model="resnet18", sam=v)) for v, label in SAM_MEMBERS])  # fmt: skip
        for row in variants:
            ratio(row, "over_base", plain, field="seconds_per_step")
    if "hvp" in sections:
        record("hvp", "resnet18 hvp vs grad", dict(kind="hvp", model="resnet18", width=width, batch=args.batch))
    if "lanczos" in sections:
        record("lanczos", "resnet18 lambda_max", dict(kind="lanczos", model="resnet18", width=width,
                                                      n=args.lanczos_examples, iters=args.lanczos_iters,
                                                      workdir=args.workdir))  # fmt: skip
        eigen = dict(kind="eigen", model="resnet18", width=width, n=args.eigen_examples, k=3, workdir=args.workdir)
        for dtype, tol in (("float32", 1e-6), ("float32", 1e-5), ("float64", 1e-6)):
            record("lanczos", f"resnet18 top-3, {dtype} HVPs, to {tol:g}: eigen vs eigsh",
                   dict(eigen, dtype=dtype, tol=tol, reference=tol == 1e-6 and dtype == "float32"))  # fmt: skip
    if "data" in sections:
        d = record("data", "pipeline", dict(kind="data", batch=args.batch, steps=20))
        consumed = [r["images_per_s"] for r in rows if r["spec"]["kind"] == "jax_train" and "images_per_s" in r]
        if consumed and "images_per_s" in d:
            d["over_fastest_step"] = d["images_per_s"] / max(consumed)
    if "bf16" in sections:
        f32, bf16 = record_interleaved("bf16", [("resnet18 float32", dict(base, model="resnet18")),
                                                ("resnet18 bfloat16", dict(base, model="resnet18", dtype="bfloat16"))])
        ratio(bf16, "over_float32", f32)
    if "loops" in sections:
        record("loops", "resnet18 gradient in loops", dict(kind="loops", width=width, batch=args.batch))

    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    _print_table(rows)
    print(f"wrote {args.out}")


def _print_table(rows: list[dict]) -> None:
    print("\n| section | what | images/s | s/step | ratio | cores busy | compile s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    ratio_keys = ("over_pytorch", *(f"over_{c}" for c in CONVS), "over_base", "hvp_over_grad", "over_fastest_step",
                  "over_float32", "fori_loop_per_grad")  # fmt: skip
    for r in rows:
        if "error" in r:
            print(f"| {r['section']} | {r['name']} | error: {r['error']} | | | | | |")
            continue
        ratio = ", ".join(f"{k} {r[k]:.2f}" for k in ratio_keys if k in r)
        if r["section"] == "loops":
            ratio = (f"per gradient: fori_loop {r['fori_loop_per_grad']:.1f}x, scan {r['scan_per_grad']:.1f}x, "
                     f"unrolled scan {r['unrolled_scan_per_grad']:.1f}x")  # fmt: skip
        if r["section"] == "lanczos" and "eigsh_hvps" in r:
            stop = "converged" if r["eigen_converged"] else "stalled" if r["eigen_stalled"] else "not converged"
            ratio = (f"top-{r['k']} to {r['tol']:g}: eigen {r['eigen_hvps']} HVPs {r['eigen_s']:.0f} s ({stop}, "
                     f"true residual {r['eigen_residual_explicit']:.1e}), eigsh {r['eigsh_hvps']} HVPs "
                     f"{r['eigsh_s']:.0f} s (true residual {r['eigsh_residual_explicit']:.1e})")
            if "current_hvps" in r:
                ratio += (f", top_eigenvalues {r['current_hvps']} HVPs {r['current_s']:.0f} s "
                          f"({r['current_residual']:.1e})")
            ratio += f"; {r['n']} examples at {r['at']}"
        elif r["section"] == "lanczos":
            ratio = f"λmax {r['lambda_max']:.4g}: {r['hvps_to_1e-2']} HVPs to 1e-2 ({r['n']} examples, at {r['at']})"
        ips = f"{r['images_per_s']:.1f}" if "images_per_s" in r else ""
        sps = f"{r['seconds_per_step']:.3f}" if "seconds_per_step" in r else (
            f"grad {r['grad_s']:.3f}, hvp {r['hvp_s']:.3f}" if "hvp_s" in r else "")  # fmt: skip
        cores = f"{r['cores_busy']:.2f}" if "cores_busy" in r else ""
        print(f"| {r['section']} | {r['name']} | {ips} | {sps} | {ratio} | {cores} | {r.get('compile_s', 0):.1f} | "
              f"{r.get('peak_rss_mb', 0):.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
