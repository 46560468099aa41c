"""Where the measures' loops run: inside one compiled program, or driven from Python.

Every iterative measure is a loop of cheap updates around one expensive
call: a gradient (sharpness ascent) or a Hessian-vector product (Lanczos,
power iteration, Hutchinson, stochastic Lanczos quadrature). On GPU and TPU
the whole loop compiles into one program (`lax.fori_loop` and friends), with
no host round trip per step. On XLA:CPU a convolution's backward pass inside
a `while` loop runs about 10x slower than outside one (docs/DESIGN.md,
`python scripts/bench.py --sections loops`), so there the loop is driven from Python:
each step is one compiled call per microbatch for the gradient or product
(`LossFunction.value_and_grad` / `.hvp`) and one compiled call for the
update. Both modes run the same update functions, and the tests check that
they give the same numbers.

    host_loops()                      # True on the CPU backend, else False
    with loops_on_host(False): ...    # force one mode (tests, benchmarks)

The environment variable JAXSAM_HOST_LOOPS=1 or 0 overrides the default.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from typing import Any, Callable, Iterator

import jax
from jax import lax

_FORCED: list[bool] = []


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


def value_and_grad(loss_fn: Callable[[Any], jax.Array]) -> Callable[[Any], tuple[jax.Array, Any]]:
    """Host-callable `params -> (L, ∇L)`: the loss's microbatch sum if it has one, else one compiled call."""
    if hasattr(loss_fn, "value_and_grad"):
        return loss_fn.value_and_grad
    return jax.jit(jax.value_and_grad(loss_fn))


def value(loss_fn: Callable[[Any], jax.Array]) -> Callable[[Any], jax.Array]:
    """Host-callable `params -> L` (see `value_and_grad`)."""
    if hasattr(loss_fn, "value"):
        return loss_fn.value
    return jax.jit(loss_fn)


def hvp(loss_fn: Callable[[Any], jax.Array]) -> Callable[[Any, Any], Any]:
    """Host-callable `(params, v) -> H v` (see `value_and_grad`)."""
    if hasattr(loss_fn, "hvp"):
        return loss_fn.hvp
    return jax.jit(lambda p, v: jax.jvp(jax.grad(loss_fn), (p,), (v,))[1])


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

    `query` and `update` are cheap and pure; `oracle` is the expensive call.
    Compiled (host=False): one `lax.fori_loop`, traceable, `oracle` traced
    inside. On the host (host=True): a Python loop; `query` and `update` are
    compiled once per function object and `static` value (so pass
    module-level functions to share the compilation between calls), arrays
    they need go in `consts` (arguments, not constants baked into the
    program), settings that must be Python values (a norm's name) in the
    hashable `static`, and `oracle` takes concrete arrays.
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
