"""scripts/bench.py's measuring side: what each benchmark process runs.

`python scripts/bench_workers.py --worker SPEC` runs one measurement (HVP,
Lanczos, eigen solvers, data pipeline, loops) and prints one `RESULT {json}`
line; `--serve SPEC` builds one train step (jaxsam or the PyTorch reference,
or a sleeping / spinning test step) and times one call per `TIME` line it is
sent, so that bench.py can make compared steps take turns. Each runs in its
own process: its peak RSS is its own, and the driver never imports JAX.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from typing import Any, Callable, NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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

WORKERS = {"hvp": _hvp, "lanczos": _lanczos, "eigen": _eigen, "data": _data, "loops": _loops}


def _worker(spec: dict) -> None:
    result = WORKERS[spec["kind"]](spec)
    result["peak_rss_mb"] = _peak_rss_mb()
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help="one measurement's JSON spec: prints RESULT {json}")
    parser.add_argument("--serve", help="one train step's JSON spec: READY, then a TIME line per call, DONE")
    args = parser.parse_args()
    if args.worker:
        _worker(json.loads(args.worker))
    elif args.serve:
        _serve(json.loads(args.serve))
    else:
        parser.error("give --worker SPEC or --serve SPEC (scripts/bench.py starts these processes)")


if __name__ == "__main__":
    main()
