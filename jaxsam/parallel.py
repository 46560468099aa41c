"""All devices, per-device code: a 1-D `data` mesh and `jax.shard_map`.

The user's design asks for pmap. In current JAX `pmap` is in maintenance mode
and is implemented on `jax.shard_map`, so the train step here is written per
device, exactly as for pmap (local batch, `lax.pmean` over the "data" axis),
and mapped over a 1-D mesh of every device with `jax.shard_map`. Parameters
and optimizer state are replicated; batches are split along their first axis.

Several processes (hosts, or one process per GPU) run the same program through
JAX's own distributed runtime (`start_distributed`, before anything touches a
device): the mesh spans every process's devices, each process builds the same
global batch from the same seed and hands only its own devices' rows to JAX
(`put_batch`), and files (config.json, metrics.jsonl) are written by process 0
(`is_primary`); orbax coordinates the checkpoint so it is written once.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def start_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
) -> bool:
    """Starts `jax.distributed` when asked: any of the three settings given, or `auto`.

    `auto` lets JAX read them from the cluster (SLURM, Open MPI, Kubernetes,
    or the JAX_COORDINATOR_ADDRESS variable); settings given here win. Under
    SLURM that detection also narrows each process to the GPU of its local
    rank (one process per GPU). Without `auto` all three settings are needed
    and cluster detection is off, so a process keeps every device it sees (one
    process per node). Must run before the first JAX computation. Returns
    whether it started. On CPU the processes reduce over gloo (JAX's default).
    """
    given = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if not auto and not any(given):
        return False
    if not auto and not all(given):
        raise ValueError(
            "a multi-process run needs all of --coordinator_address, --num_processes and --process_id "
            "(or --distributed to read them from SLURM / Open MPI)"
        )
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, cluster_detection_method=None if auto else "deactivate")  # fmt: skip
    return True


_barriers = itertools.count()


def compiled_in_step(fn: Callable, name: str) -> Callable:
    """`fn` (jitted), whose first call in a multi-process run compiles, then waits for every process.

    The processes compile a program at different speeds, and CPU collectives
    (gloo) give up on a peer that reaches a collective more than 30 s after the
    others (measured: a train step's first call failed with "Gloo context
    initialization failed: DEADLINE_EXCEEDED" while a second process was still
    compiling). So the first call compiles ahead of time, meets the other
    processes at a barrier of the distributed runtime (which waits for minutes,
    not seconds), and only then runs. A single process gets `fn` unchanged.
    """
    if jax.process_count() == 1:
        return fn
    ready = False

    def call(*args):
        nonlocal ready
        if not ready:
            fn.lower(*args).compile()  # the call below finds it in JAX's compilation caches
            barrier(f"{name}-{next(_barriers)}")
            ready = True
        return fn(*args)

    return call


def barrier(name: str, timeout_s: int = 1800) -> None:
    """Waits until every process reaches `name` (the distributed runtime's barrier, no collective)."""
    from jax._src import distributed  # the coordination-service client; JAX has no public barrier without collectives

    distributed.global_state.client.wait_at_barrier(f"jaxsam-{name}", timeout_s * 1000)


def is_primary() -> bool:
    """Process 0: the one that writes a run's files."""
    return jax.process_index() == 0


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


def _global_array(x: Any, sharding: NamedSharding) -> jax.Array:
    """The global array `x` (the same on every process) from this process's rows of it only."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def put_batch(batch: Any, mesh: Mesh) -> Any:
    """Host arrays -> device arrays split along axis 0 over the mesh.

    With several processes each one holds the whole global batch (the same seed
    gives the same batches everywhere) and transfers only its devices' rows.
    """
    if jax.process_count() == 1:
        return jax.device_put(batch, batch_sharded(mesh))
    return jax.tree.map(lambda x: _global_array(x, batch_sharded(mesh)), batch)


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    if jax.process_count() == 1:
        return jax.device_put(tree, replicated(mesh))
    return jax.tree.map(lambda x: _global_array(x, replicated(mesh)), tree)


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
