"""Gradients inside XLA loops vs outside: python scripts/bench_loops.py [--width 0.125] [--batch 128].

Times, for ResNet18 at the given width, one gradient of a batch outside any
loop against the same gradient taken twice inside `lax.fori_loop`, and the
gradient of a microbatch loss summed with `lax.scan` (rolled and unrolled).
On XLA:CPU the looped versions are about 10x slower per gradient (see
docs/DESIGN.md); it will move into scripts/bench.py.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxsam.models import get_model


def _seconds(fn, *args) -> float:
    jax.block_until_ready(fn(*args))  # compile
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=0.125)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    model = get_model("resnet18", 10, width=args.width)
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(2 * args.batch, 32, 32, 3).astype(np.float32))
    y = jnp.asarray(rng.randint(0, 10, 2 * args.batch))
    variables = jax.jit(lambda k: model.init(k, x[:2], train=False))(jax.random.key(0))
    params, stats = variables["params"], variables["batch_stats"]

    def loss(p, xb, yb):
        logits = model.apply({"params": p, "batch_stats": stats}, xb, train=False)
        return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], 1))

    grad = jax.grad(lambda p: loss(p, x[: args.batch], y[: args.batch]))
    zeros = jax.tree.map(jnp.zeros_like, params)
    looped = jax.jit(lambda p: jax.lax.fori_loop(0, 2, lambda i, acc: jax.tree.map(jnp.add, acc, grad(p)), zeros))
    xs, ys = x.reshape(2, args.batch, 32, 32, 3), y.reshape(2, args.batch)

    def scanned(p, unroll):
        return jax.lax.scan(lambda c, b: (c + loss(p, *b), None), 0.0, (xs, ys), unroll=unroll)[0]

    one = _seconds(jax.jit(grad), params)
    two_looped = _seconds(looped, params)
    scan_rolled = _seconds(jax.jit(jax.grad(lambda p: scanned(p, 1))), params)
    scan_unrolled = _seconds(jax.jit(jax.grad(lambda p: scanned(p, True))), params)
    print(f"backend {jax.default_backend()}, resnet18 width {args.width}, batch {args.batch}")
    print(f"one gradient:                       {one:7.2f} s")
    print(f"two gradients in fori_loop:         {two_looped:7.2f} s  ({two_looped / (2 * one):.1f}x per gradient)")
    print(f"gradient of a 2-microbatch scan:    {scan_rolled:7.2f} s  ({scan_rolled / (2 * one):.1f}x)")
    print(f"  the same scan unrolled:           {scan_unrolled:7.2f} s  ({scan_unrolled / (2 * one):.1f}x)")


if __name__ == "__main__":
    main()
