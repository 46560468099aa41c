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
import resource
import statistics
import subprocess
import sys
import queue
import tempfile
import threading
import time
from typing import Any, Callable, NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_HINT = "pip install torch==2.13.0  (CPU build; or --index-url https://download.pytorch.org/whl/cpu)"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn, repeats: int, sync) -> tuple[float, float]:
    """(first call seconds, median of `repeats` further calls)."""
    return _alternating([fn], repeats, sync)[0]


def _alternating(fns: list, repeats: int, sync) -> list[tuple[float, float]]:
    """(first call seconds, median of `repeats` further calls) of each fn, the calls taken in turn.

    Taking turns puts each function's calls in the same stretches of time, so
    ratios between them survive the machine's drift.
    """
    first, times = [], [[] for _ in fns]
    for fn in fns:
        start = time.perf_counter()
        sync(fn())
        first.append(time.perf_counter() - start)
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            start = time.perf_counter()
            sync(fn())
            t.append(time.perf_counter() - start)
    return [(f, statistics.median(t)) for f, t in zip(first, times)]


# ---------------------------------------------------------------- workers (subprocess side)


class Step(NamedTuple):
    """What a served worker times: `sync(call())` runs `steps` train steps of `batch` images."""

    call: Callable[[], Any]
    sync: Callable[[Any], Any]
    steps: int
    batch: int
    extra: dict


def _jax_train(spec: dict) -> Step:
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

    return Step(call, jax.block_until_ready, per_call, batch, {"backend": jax.default_backend()})


def _torch_train(spec: dict) -> Step:
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

    return Step(call, lambda loss: loss.item(), 1, batch, {"threads": torch.get_num_threads(), "torch": torch.__version__})


def _sleep(spec: dict) -> Step:
    """A step that sleeps `seconds`: checks the interleaving protocol itself (tests/test_bench.py)."""
    return Step(lambda: time.sleep(spec["seconds"]), lambda _: None, 1, 1, {})


def _spin(spec: dict) -> Step:
    """A step that keeps one core busy for `seconds`: checks the core count (tests/test_bench.py)."""

    def call():
        end = time.perf_counter() + spec["seconds"]
        while time.perf_counter() < end:
            pass

    return Step(call, lambda _: None, 1, 1, {})


STEPS = {"jax_train": _jax_train, "torch_train": _torch_train, "sleep": _sleep, "spin": _spin}


def _serve(spec: dict) -> None:
    """Worker side of `_interleaved`: set up, run one call (compilation), then one timed call per "step" line."""
    step = STEPS[spec["kind"]](spec)
    start = time.perf_counter()
    step.sync(step.call())
    print("READY " + json.dumps({"first_s": time.perf_counter() - start}), flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        start, cpu = time.perf_counter(), time.process_time()  # process_time: every thread of this process
        step.sync(step.call())
        print(f"TIME {time.perf_counter() - start} {time.process_time() - cpu}", flush=True)
    print("DONE " + json.dumps({"steps": step.steps, "batch": step.batch, "peak_rss_mb": _peak_rss_mb(),
                                **step.extra}), flush=True)  # fmt: skip


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
    (g_first, g), (h_first, h) = _alternating([lambda: grad(params), lambda: product(params, v)], spec["repeats"],
                                              jax.block_until_ready)  # fmt: skip
    return {"grad_s": g, "hvp_s": h, "hvp_over_grad": h / g, "compile_s": g_first - g + h_first - h}


def _lanczos(spec: dict) -> dict:
    import jax
    import numpy as np

    from jaxsam import data
    from jaxsam.geometry import hessian
    from jaxsam.geometry.loss import make_loss_fn
    from jaxsam.models import get_model
    from jaxsam.run import load_run

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
    loss_fn = make_loss_fn(model, variables, images, labels, batch_size=256, preprocess=data.normalize)
    start = time.perf_counter()
    result = hessian.top_eigenvalues(loss_fn, variables["params"], jax.random.key(0), iters=iters)
    seconds = time.perf_counter() - start
    final = float(result.eigenvalues[0])
    history = np.asarray(result.history)[:, 0]
    within = np.abs(history - final) <= 1e-2 * abs(final)
    # The first step after which every later estimate stays within 1e-2 of the final one.
    needed = next(int(result.history_iterations[i]) for i in range(len(within)) if within[i:].all())
    return {"lambda_max": final, "hvps_to_1e-2": needed, "iters": iters, "n": n, "at": where, "seconds": seconds}


def _eigen_compare(matvec: Callable, dim: int, dtype: Any, k: int, tol: float, seed: int = 0) -> dict:
    """HVPs and seconds of `eigen.top_eigenpairs` and of scipy's `eigsh` (ARPACK) on the same host `matvec`.

    Both solve for the top-k (largest algebraic) pairs to relative residual
    `tol` from the same start vector. `eigsh` runs in float64 on the operator
    (inputs cast to `dtype`), its products counted by the LinearOperator;
    afterwards k explicit products of each solver's vectors (not counted)
    give the true relative residuals max_i ‖Hx_i − θ_i x_i‖/|θ_i|.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    import scipy.sparse.linalg as sla

    from jaxsam.geometry import eigen

    def true_residual(values, vectors):
        values, vectors = np.asarray(values, np.float64), np.asarray(vectors, np.float64)
        products = np.stack([np.asarray(matvec(jnp.asarray(x, dtype)), np.float64) for x in vectors])
        return float(np.max(np.linalg.norm(products - values[:, None] * vectors, axis=1) / np.abs(values)))

    v0 = np.random.RandomState(seed).uniform(-1, 1, dim).astype(dtype)
    # Compile the solver's steps first on a free operator of the same shapes (diag(1..dim): no
    # breakdown, a restart by 45 products): the seconds below are those of the solve.
    start = time.perf_counter()
    ramp = jnp.arange(1, dim + 1, dtype=dtype)
    jax.block_until_ready(eigen.top_eigenpairs(lambda x: ramp * x, jnp.asarray(v0), k, tol=tol, host=True,
                                               max_matvecs=45))  # fmt: skip
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    res = eigen.top_eigenpairs(matvec, jnp.asarray(v0), k, tol=tol, host=True)
    jax.block_until_ready(res)
    ours_s = time.perf_counter() - start
    count = [0]

    def counted(x):
        count[0] += 1
        return np.asarray(matvec(jnp.asarray(x, dtype)), np.float64)

    op = sla.LinearOperator((dim, dim), matvec=counted, dtype=np.float64)
    start = time.perf_counter()
    values, vectors = sla.eigsh(op, k=k, which="LA", tol=tol, v0=v0.astype(np.float64))
    eigsh_s = time.perf_counter() - start
    order = np.argsort(values)[::-1]
    values, vectors = values[order], vectors[:, order].T
    return {"k": k, "tol": tol, "dim": dim, "eigen_hvps": int(res.matvecs), "eigen_s": ours_s, "compile_s": compile_s,
            "eigen_restarts": int(res.restarts), "eigen_converged": bool(res.converged),
            "eigen_stalled": bool(res.stalled),
            "eigen_residual": float(np.max(np.asarray(res.residuals))),
            "eigen_residual_explicit": true_residual(res.eigenvalues, res.eigenvectors),
            "eigen_values": [float(v) for v in np.asarray(res.eigenvalues)],
            "eigsh_hvps": count[0], "eigsh_s": eigsh_s, "eigsh_residual_explicit": true_residual(values, vectors),
            "eigsh_values": [float(v) for v in values]}  # fmt: skip


def _eigen(spec: dict) -> dict:
    """Top-k Hessian eigenpairs to `tol` at a run's checkpoint: eigen.top_eigenpairs vs eigsh (vs top_eigenvalues).

    spec["dtype"] "float32": the measured network as trained (its products are
    linear only to about 2e-6 relative, the float32 softmax at confident
    examples). "float64": the network in float64 (x64), the cross-entropy of
    its logits in float64 (the logits still pass the model's float32 cast):
    products linear to about 1e-8, so 1e-6 is within reach of both solvers.
    """
    import jax

    if spec.get("dtype") == "float64":
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.flatten_util import ravel_pytree

    from jaxsam import data
    from jaxsam.geometry import driver, hessian
    from jaxsam.geometry.loss import make_loss_fn
    from jaxsam.models import get_model
    from jaxsam.run import load_run

    n, k, tol, dtype = spec["n"], spec["k"], spec["tol"], jnp.dtype(spec.get("dtype", "float32"))
    if spec.get("workdir"):
        if _archive():  # a run whose data.json is missing reads the archive named by the environment
            os.environ.setdefault(data.ENV_VAR, _archive())
        run = load_run(spec["workdir"])
        c = run.config.model
        classes = run.model.num_classes
        model = run.model if dtype == jnp.float32 else get_model(c.name, classes, width=c.width, dtype=dtype,
                                                                  conv=c.conv)  # fmt: skip
        variables = {"params": run.state.params, "batch_stats": run.state.batch_stats}
        images, labels, where = run.dataset.train.images[:n], run.dataset.train.labels[:n], spec["workdir"]
    else:
        model = get_model(spec["model"], 10, width=spec["width"], dtype=dtype)
        variables = jax.jit(lambda key: model.init(key, np.zeros((1, 32, 32, 3), np.float32), train=False))(
            jax.random.key(0)
        )
        train = _examples(n)
        images, labels, where = train.images[:n], train.labels[:n], "initialization"
    variables = jax.tree.map(lambda a: jnp.asarray(a, dtype), variables)

    def cross_entropy(logits, y):
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(dtype), y)

    try:  # the loss takes its preprocessing (uint8 pixels -> normalized) and per-example loss as arguments
        loss_fn = make_loss_fn(model, variables, images, labels, batch_size=256, loss=cross_entropy,
                               preprocess=lambda x: data.normalize(x).astype(dtype))  # fmt: skip
    except TypeError:  # older make_loss_fn: normalizes uint8 itself, float32 cross-entropy
        if dtype != jnp.float32:
            raise
        loss_fn = make_loss_fn(model, variables, images, labels, batch_size=256)
    params = variables["params"]
    flat, unravel = ravel_pytree(params)
    to_flat, to_tree = jax.jit(lambda t: ravel_pytree(t)[0]), jax.jit(unravel)
    # Host-callable H·v: microbatch sums driven from the host on CPU (driver's either signature).
    product = (lambda p, v: driver.hvp(loss_fn, p, v)) if hasattr(driver, "evaluate") else driver.hvp(loss_fn)

    def matvec(x):
        return to_flat(product(params, to_tree(x))).astype(x.dtype)

    jax.block_until_ready(matvec(flat))  # compile the product first: timings are of solves
    result = _eigen_compare(matvec, int(flat.shape[0]), dtype, k, tol)
    result.update(n=n, at=where, dtype=str(dtype))
    if not spec.get("reference"):
        return result
    start = time.perf_counter()
    try:  # the reference: its failure should not cost the comparison above
        current = hessian.top_eigenvalues(loss_fn, params, jax.random.key(0), k=k, tol=tol)
    except Exception as e:  # noqa: BLE001
        result.update(current_error=repr(e))
        return result
    values = np.asarray(current.eigenvalues)
    # Its `iterations` are the Lanczos steps; k more products give its residuals.
    result.update(current_hvps=int(current.iterations) + k, current_s=time.perf_counter() - start,
                  current_converged=bool(current.converged),
                  current_residual=float(np.max(np.asarray(current.residuals) / np.abs(values))),
                  current_values=[float(v) for v in values])  # fmt: skip
    return result


def _loops(spec: dict) -> dict:
    """One gradient outside any loop against the same gradient inside `fori_loop` and `scan` (XLA:CPU's weakness)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxsam.models import get_model

    batch = spec["batch"]
    model = get_model("resnet18", 10, width=spec["width"])
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(2 * batch, 32, 32, 3).astype(np.float32))
    y = jnp.asarray(rng.randint(0, 10, 2 * batch))
    variables = jax.jit(lambda k: model.init(k, x[:2], train=False))(jax.random.key(0))
    params, stats = variables["params"], variables["batch_stats"]

    def loss(p, xb, yb):
        logits = model.apply({"params": p, "batch_stats": stats}, xb, train=False)
        return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], 1))

    grad = jax.grad(lambda p: loss(p, x[:batch], y[:batch]))
    zeros = jax.tree.map(jnp.zeros_like, params)
    looped = jax.jit(lambda p: jax.lax.fori_loop(0, 2, lambda i, acc: jax.tree.map(jnp.add, acc, grad(p)), zeros))
    xs, ys = x.reshape(2, batch, 32, 32, 3), y.reshape(2, batch)

    def scanned(p, unroll):
        return jax.lax.scan(lambda c, b: (c + loss(p, *b), None), 0.0, (xs, ys), unroll=unroll)[0]

    fns = [jax.jit(grad), looped, jax.jit(jax.grad(lambda p: scanned(p, 1))), jax.jit(jax.grad(lambda p: scanned(p, True)))]
    (_, one), (_, two), (_, rolled), (_, unrolled) = _alternating(
        [lambda f=f: f(params) for f in fns], spec["repeats"], jax.block_until_ready
    )
    return {"grad_s": one, "fori_loop_per_grad": two / (2 * one), "scan_per_grad": rolled / (2 * one),
            "unrolled_scan_per_grad": unrolled / (2 * one)}  # fmt: skip


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


SECTIONS = ("train", "sam", "hvp", "lanczos", "data", "bf16", "loops")
CONVS = ("auto", "xla", "native", "onednn")  # jaxsam.models.layers.CONV_IMPLS (not imported: this process runs no JAX)
# The `sam` section's rows: (config sam.name, label); the targets: ≤ 2.1x for the two-gradient
# members, ≤ 1.3x for LookSAM(5), ≤ 1.1x for Momentum-SAM.
SAM_MEMBERS = (("sam", "SAM"), ("asam", "ASAM"), ("gsam", "GSAM"), ("fsam", "F-SAM"), ("vasso", "VaSSO"),
               ("looksam", "LookSAM(5)"), ("msam", "Momentum-SAM"))
WORKERS = {"hvp": _hvp, "lanczos": _lanczos, "eigen": _eigen, "data": _data, "loops": _loops}


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


class _Server:
    """A `--serve` worker process and a thread that queues its protocol lines (READY/TIME/DONE)."""

    def __init__(self, spec: dict):
        self.stderr = tempfile.TemporaryFile(mode="w+")
        cmd = [sys.executable, os.path.abspath(__file__), "--serve", json.dumps(spec)]
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
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(json.loads(args.worker))
        return
    if args.serve:
        _serve(json.loads(args.serve))
        return
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
