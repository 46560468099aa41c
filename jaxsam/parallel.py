"""All devices, per-device code: a 1-D `data` mesh and `jax.shard_map`.

The user's design asks for pmap. In current JAX `pmap` is in maintenance mode
and is implemented on `jax.shard_map`, so the train step here is written per
device, exactly as for pmap (local batch, `lax.pmean` over the "data" axis),
and mapped over a 1-D mesh of every device with `jax.shard_map`. Parameters
and optimizer state are replicated; batches are split along their first axis.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def data_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh named "data" over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def check_divisible(batch_size: int, mesh: Mesh, field: str) -> None:
    """Raises a one-line ValueError unless `batch_size` splits evenly over the mesh."""
    n = mesh.devices.size
    if batch_size % n:
        lower = max(n, batch_size - batch_size % n)
        raise ValueError(
            f"{field}={batch_size} does not split over the {n} devices: use a multiple of {n} "
            f"(e.g. --config.{field}={lower})"
        )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def per_device(fn: Callable, mesh: Mesh, *, in_specs: Any, out_specs: Any) -> Callable:
    """`jax.shard_map(fn)` over the data mesh; `fn` sees one device's shard, as under pmap.

    Replication of outputs is checked by the caller's `pmean`s, not inferred
    (`check_vma=False`), since optax states carry scalars shard_map cannot prove replicated.
    """
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def put_batch(batch: Any, mesh: Mesh) -> Any:
    """Host arrays -> device arrays split along axis 0 over the mesh."""
    return jax.device_put(batch, batch_sharded(mesh))


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    return jax.device_put(tree, replicated(mesh))


DEFAULT_COMPILATION_CACHE = "~/.cache/jaxsam/xla"


def use_compilation_cache(path: str = DEFAULT_COMPILATION_CACHE) -> str | None:
    """Keeps compiled XLA programs on disk (JAX's persistent compilation cache); returns the folder used.

    Every run of a study compiles the same train step, evaluation and measures
    again (each run builds its functions anew); with the cache the later runs
    load them. Measured on this project's 2-core CPU: a two-arm smoke study took
    181 s with an empty cache and 50 s with a warm one (272 s without the cache).
    An existing JAX_COMPILATION_CACHE_DIR wins; an empty `path` turns it off.
    """
    import os

    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    if not path:
        return None
    folder = os.path.expanduser(path)
    os.makedirs(folder, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", folder)
    return folder
