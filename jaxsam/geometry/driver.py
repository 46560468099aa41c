"""The executor: where a measure's loop runs — inside one compiled program, or driven from Python.

Every iterative measure is a loop of cheap updates around one expensive
oracle call of the loss (`loss.LossFunction`): its value, its value and
gradient (sharpness ascent), a Hessian-vector product (Lanczos, power
iteration, Hutchinson, stochastic Lanczos quadrature), or value and accuracy
(landscape grids). A measure describes its loop once, as a `Loop` of pure
module-level functions, and `run` executes it in one of two ways:

* compiled (GPU and TPU): the whole loop is one `lax.fori_loop` /
  `lax.while_loop` in one program, the oracle traced inside it (a
  `lax.scan` over microbatches);
* host-driven (the CPU backend): a Python loop, each query and update one
  compiled call, each oracle one compiled call per microbatch summed on
  the host. On XLA:CPU a convolution's backward pass inside a `while` loop
  runs about 10x slower than outside one (docs/DESIGN.md, `python
  scripts/bench.py --sections loops`).

Both run the same functions in the same order, and the tests check that they
give the same numbers. Every compiled function is module level and takes the
loss object (a pytree whose leaves are the data) as an argument, so programs
are cached by shapes: a second call on other data or parameters of the same
shapes compiles nothing, and no example is a constant of any program.

    host_loops()                      # True on the CPU backend, else False
    with loops_on_host(False): ...    # force one mode (tests, benchmarks)
    run(loop, loss_fn, params, inputs, steps=20, static=("l2",))
    value(loss_fn, params); value_and_grad(loss_fn, params); hvp(loss_fn, params, v)

The environment variable JAXSAM_HOST_LOOPS=1 or 0 overrides the default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import weakref
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
from jax import lax

from jaxsam.geometry import loss as loss_lib

_FORCED: list[bool] = []
ORACLES = ("value", "value_and_grad", "hvp", "value_and_accuracy")


def host_loops() -> bool:
    """Whether measures drive their loops from Python (see module docstring)."""
    if _FORCED:
        return _FORCED[-1]
    setting = os.environ.get("JAXSAM_HOST_LOOPS", "")
    if setting not in ("", "0", "1"):
        raise ValueError(f"JAXSAM_HOST_LOOPS={setting!r}: set it to 1 (loops on the host), 0 (compiled) or unset it")
    if setting:
        return setting == "1"
    return jax.default_backend() == "cpu"


@contextlib.contextmanager
def loops_on_host(flag: bool) -> Iterator[None]:
    """Within the block, `host_loops()` returns `flag`."""
    _FORCED.append(bool(flag))
    try:
        yield
    finally:
        _FORCED.pop()


@dataclasses.dataclass(frozen=True)
class Loop:
    """One measure's iteration: `steps` times query -> oracle -> update, between init and finish.

    Every function is pure and should be defined at module level (the
    compiled programs are cached on them); `static` is a hashable tuple of
    Python settings, `inputs` a pytree of arrays (arguments, never constants).

    Attributes:
      oracle: one of ORACLES: "value" and "value_and_grad" at a point,
        "hvp" of the Hessian at params times a vector, "value_and_accuracy" at a point.
      init: (params, inputs, static) -> carry; with `start`, (params, inputs,
        static, aux0, answer0) -> carry.
      query: (i, carry, params, inputs, static) -> (arg, aux): the oracle's
        argument and whatever the update needs besides its answer.
      update: (i, carry, aux, answer, params, inputs, static) -> carry.
      finish: (carry, params, inputs, static) -> outputs (a pytree of arrays).
      start: optional (params, inputs, static) -> (arg, aux): one oracle call
        before the loop, whose answer `init` receives.
      done: optional (carry, inputs, static) -> bool: stop before the next step.
      block: 0: `arg` is one point (or vector); b >= 1: b of them stacked on
        a leading axis, answered row by row.
      vmap: compiled mode only: a block's rows vmapped together (faster on
        accelerators, memory grows with b) rather than one after another.
    """

    oracle: str
    init: Callable
    query: Callable
    update: Callable
    finish: Callable
    start: Callable | None = None
    done: Callable | None = None
    block: int = 0
    vmap: bool = False

    def __post_init__(self):
        if self.oracle not in ORACLES:
            raise ValueError(f"unknown oracle {self.oracle!r}: one of {ORACLES}")


# --------------------------------------------------------------------------- the oracle, traced


def _traced(kind: str, loss: loss_lib.LossFunction, params: Any, arg: Any) -> Any:
    if kind == "value":
        return loss.value(arg)
    if kind == "value_and_grad":
        return loss.value_and_grad(arg)
    if kind == "hvp":
        return loss.hvp(params, arg)
    return loss.value_and_accuracy(arg)


def _traced_block(loop: Loop, loss, params, arg):
    if not loop.block:
        return _traced(loop.oracle, loss, params, arg)
    return lax.map(lambda a: _traced(loop.oracle, loss, params, a), arg, batch_size=loop.block if loop.vmap else None)


# --------------------------------------------------------------------------- the oracle, host-driven


@jax.jit
def _micro_value(loss, point, i):
    return loss.microbatch_sums(point, i)[0]


@jax.jit
def _micro_value_and_accuracy(loss, point, i):
    return loss.microbatch_sums(point, i)


@jax.jit
def _micro_value_and_grad(loss, point, i):
    return jax.value_and_grad(lambda p: loss.microbatch_sums(p, i)[0])(point)


@jax.jit
def _micro_hvp(loss, params, v, i):
    # Forward-over-reverse: the jvp of the microbatch gradient.
    return jax.jvp(jax.grad(lambda p: loss.microbatch_sums(p, i)[0]), (params,), (v,))[1]


@functools.partial(jax.jit, static_argnums=0)
def _whole(kind, loss, params, arg):
    return _traced(kind, loss, params, arg)


@jax.jit
def _add(a, b):
    return jax.tree.map(jnp.add, a, b)


@jax.jit
def _divide(tree, count):
    return loss_lib._divide(tree, count)


def _host(kind: str, loss: loss_lib.LossFunction, params: Any, arg: Any) -> Any:
    """The oracle with concrete arrays: one compiled call per microbatch, summed in order, / N.

    A loss whose kernel is not summable (state recomputed from the
    parameters, or no data) is one compiled call of the traced oracle.
    """
    if not loss.summable:
        return _whole(kind, loss, params, arg)
    total = None
    for i in range(loss.num_batches):
        if kind == "hvp":
            part = _micro_hvp(loss, params, arg, i)
        else:
            micro = {"value": _micro_value, "value_and_grad": _micro_value_and_grad,
                     "value_and_accuracy": _micro_value_and_accuracy}[kind]  # fmt: skip
            part = micro(loss, arg, i)
        total = part if total is None else _add(total, part)
    return _divide(total, loss.count)


@jax.jit
def _row(tree, r):
    return jax.tree.map(lambda a: a[r], tree)


def _chunk(loss, j):
    # Sliced in a compiled call, rebuilt here: a loss returned by a compiled
    # function would carry the description (`info`) of the first one traced.
    return loss.with_data(*_row(loss.data, j))


@jax.jit
def _stack(*trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _host_block(loop: Loop, loss, params, arg):
    if not loop.block:
        return _host(loop.oracle, loss, params, arg)
    return _stack(*[_host(loop.oracle, loss, params, _row(arg, r)) for r in range(loop.block)])


# --------------------------------------------------------------------------- running a loop


def run_traced(loop: Loop, loss_fn: Any, params: Any, inputs: Any = (), *, steps: int, static: tuple = ()) -> Any:
    """`run`'s compiled loop, traced into the caller's program (use inside your own `jax.jit`)."""
    return _run_traced(loop, int(steps), tuple(static), loss_lib.as_loss(loss_fn), params, inputs)


def _run_traced(loop: Loop, steps: int, static: tuple, loss, params, inputs):
    """The whole loop, traceable."""
    if loop.start is not None:
        arg, aux = loop.start(params, inputs, static)
        carry = loop.init(params, inputs, static, aux, _traced_block(loop, loss, params, arg))
    else:
        carry = loop.init(params, inputs, static)

    def step(i, carry):
        arg, aux = loop.query(i, carry, params, inputs, static)
        return loop.update(i, carry, aux, _traced_block(loop, loss, params, arg), params, inputs, static)

    if loop.done is None:
        carry = lax.fori_loop(0, steps, step, carry)
    else:
        def cond(state):
            i, carry = state
            return (i < steps) & ~loop.done(carry, inputs, static)

        _, carry = lax.while_loop(cond, lambda state: (state[0] + 1, step(*state)), (jnp.zeros((), jnp.int32), carry))
    return loop.finish(carry, params, inputs, static)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _run_compiled(loop, steps, static, each_loss, loss, params, inputs, each):
    if each is None and not each_loss:
        return _run_traced(loop, steps, static, loss, params, inputs)

    def one(xs):
        data, part = xs
        merged = inputs if part is None else {**inputs, **part}
        return _run_traced(loop, steps, static, loss.with_data(*data) if each_loss else loss, params, merged)

    # Over the chunks' data only: the model state is shared by every chunk.
    return lax.map(one, (loss.data if each_loss else None, each))


def _run_host(loop: Loop, steps: int, static: tuple, loss, params, inputs):
    if loop.start is not None:
        arg, aux = compiled(loop.start, 2)(params, inputs, static)
        carry = compiled(loop.init, 2)(params, inputs, static, aux, _host_block(loop, loss, params, arg))
    else:
        carry = compiled(loop.init, 2)(params, inputs, static)
    query, update = compiled(loop.query, 4), compiled(loop.update, 6)
    done = None if loop.done is None else compiled(loop.done, 2)
    for i in range(steps):
        if done is not None and bool(done(carry, inputs, static)):
            break
        arg, aux = query(i, carry, params, inputs, static)
        carry = update(i, carry, aux, _host_block(loop, loss, params, arg), params, inputs, static)
    return compiled(loop.finish, 3)(carry, params, inputs, static)


def run(
    loop: Loop,
    loss_fn: Any,
    params: Any,
    inputs: Any = (),
    *,
    steps: int,
    static: tuple = (),
    each: Any = None,
    each_loss: bool = False,
) -> Any:
    """Runs `loop` on the oracle `loss_fn` at `params`, compiled or host-driven (`host_loops()`).

    Args:
      loop: the measure's `Loop`.
      loss_fn: a `LossFunction` or any `params -> scalar` (wrapped by `loss.as_loss`).
      params: the point (a pytree).
      inputs: arrays the loop's functions read (a dict when `each` is given).
      steps: the number of iterations (at most, with `loop.done`).
      static: hashable Python settings passed to every function.
      each: a dict of arrays with a leading axis: the loop runs once per
        row, with `{**inputs, **row}` as its inputs (e.g. one Lanczos run per probe).
      each_loss: the loss's leaves have a leading axis (`LossFunction.chunked`):
        the loop runs once per chunk, on that chunk's loss.

    Returns:
      `loop.finish`'s outputs, stacked on a leading axis when run per row or chunk.
    """
    loss = loss_lib.as_loss(loss_fn)
    if not host_loops():
        return _run_compiled(loop, int(steps), tuple(static), bool(each_loss), loss, params, inputs, each)
    if each is None and not each_loss:
        return _run_host(loop, int(steps), tuple(static), loss, params, inputs)
    count = (loss.count if each_loss else jax.tree.leaves(each)[0]).shape[0]
    outputs = []
    for j in range(count):
        chunk = _chunk(loss, j) if each_loss else loss
        merged = inputs if each is None else {**inputs, **_row(each, j)}
        outputs.append(_run_host(loop, int(steps), tuple(static), chunk, params, merged))
    return _stack(*outputs)


# --------------------------------------------------------------------------- one-off oracle calls


@functools.partial(jax.jit, static_argnums=(0, 1))
def _evaluate_compiled(kind, each_loss, loss, params, arg):
    if each_loss:
        return lax.map(lambda data: _traced(kind, loss.with_data(*data), params, arg), loss.data)
    return _traced(kind, loss, params, arg)


def evaluate(kind: str, loss_fn: Any, params: Any, arg: Any = None, *, each_loss: bool = False) -> Any:
    """One oracle call, compiled or host-driven as `run`; `arg` is the point (default params) or hvp's vector."""
    if kind not in ORACLES:
        raise ValueError(f"unknown oracle {kind!r}: one of {ORACLES}")
    loss = loss_lib.as_loss(loss_fn)
    arg = params if arg is None else arg
    if not host_loops():
        return _evaluate_compiled(kind, bool(each_loss), loss, params, arg)
    if not each_loss:
        return _host(kind, loss, params, arg)
    return _stack(*[_host(kind, _chunk(loss, j), params, arg) for j in range(loss.count.shape[0])])


def value(loss_fn: Any, params: Any) -> jax.Array:
    """L(params) (see `evaluate`)."""
    return evaluate("value", loss_fn, params)


def value_and_grad(loss_fn: Any, params: Any) -> tuple[jax.Array, Any]:
    """(L(params), ∇L(params)) (see `evaluate`)."""
    return evaluate("value_and_grad", loss_fn, params)


def value_and_accuracy(loss_fn: Any, params: Any) -> tuple[jax.Array, jax.Array]:
    """(L(params), accuracy) from one pass (see `evaluate`)."""
    return evaluate("value_and_accuracy", loss_fn, params)


def hvp(loss_fn: Any, params: Any, v: Any) -> Any:
    """H(params)·v (see `evaluate`)."""
    return evaluate("hvp", loss_fn, params, v)


# --------------------------------------------------------------------------- small compiled pieces


def fori_loop(
    steps: int,
    query: Callable[..., Any],
    oracle: Callable[[Any], Any],
    update: Callable[..., Any],
    carry: Any,
    consts: Any = (),
    static: tuple = (),
    *,
    host: bool,
) -> Any:
    """For i in range(steps): q = query(i, carry, consts, static); carry = update(i, carry, q, oracle(q), consts, static).

    For loops around an arbitrary operator (`lanczos.lanczos` on a matvec);
    the measures use `run`. Compiled (host=False): one `lax.fori_loop`,
    traceable. On the host (host=True): a Python loop of the `compiled`
    query and update, `oracle` on concrete arrays.
    """
    if not host:
        def body(i, c):
            q = query(i, c, consts, static)
            return update(i, c, q, oracle(q), consts, static)

        return lax.fori_loop(0, steps, body, carry)
    query_c, update_c = compiled(query, 3), compiled(update, 5)
    for i in range(steps):
        q = query_c(i, carry, consts, static)
        carry = update_c(i, carry, q, oracle(q), consts, static)
    return carry


_COMPILED: "weakref.WeakKeyDictionary[Callable, dict]" = weakref.WeakKeyDictionary()


def compiled(fn: Callable, *static_argnums: int) -> Callable:
    """jax.jit(fn, static_argnums=...), one per function object (cached), so module-level steps compile once."""
    per_fn = _COMPILED.setdefault(fn, {})
    if static_argnums not in per_fn:
        per_fn[static_argnums] = jax.jit(fn, static_argnums=static_argnums)
    return per_fn[static_argnums]
