"""Training: the train state, the per-device train and eval steps, and the loop.

`train_and_evaluate(config, workdir)` trains one network on CIFAR-10 with the
optimizer and SAM variant of `config` on every device, evaluates on the test
(and validation) split after each epoch, writes `config.json` and
`metrics.jsonl`, saves orbax checkpoints, and resumes from the latest one when
the workdir has any: the resumed run ends with the same parameters as an
uninterrupted one, because each epoch's batch order comes from (seed, epoch)
and each step's augmentation key from (seed, step, device).

The SAM step (Foret et al. 2021) is `jaxsam.sam_transform` chained before the
base optimizer; BatchNorm statistics come from the clean forward pass only.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from jaxsam import data, parallel, sam, validate
from jaxsam.checkpoint import Checkpoints
from jaxsam.config import base_config
from jaxsam.models import get_model

OPTIMIZERS = ("adam", "adamw", "sgd")
NAN_POLICIES = ("stop", "skip")
SAM_VARIANTS = ("asam", "gsam", "looksam", "none", "sam")
# Fields that may differ when a run is resumed (they change no number it computes).
# Fields that change the parameters' shapes: a run's checkpoints cannot be resumed under others.
_NETWORK_FIELDS = ("model.name", "model.width")
# Fields a run may resume with other values: how it reports, and where the same data is found.
_RESUMABLE_FIELDS = ("train.progress", "train.log_every_steps", "train.max_steps", "train.nan_policy",
                     "data.path", "data.url", "data.sha256")  # fmt: skip


NO_STEP = 2**31 - 1  # "no non-finite step" in the sums' first_nonfinite


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and a checkpoint holds."""

    step: jax.Array  # int32, optimizer steps taken
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array  # uint32 key data of the run's base key


# ---------------------------------------------------------------------------
# Optimizer.


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
    """Cosine decay to 0 over the whole run (after an optional linear warm-up), or constant."""
    opt = config.optimizer
    total = max(1, config.train.num_epochs * steps_per_epoch)
    warmup = int(round(opt.warmup_epochs * steps_per_epoch))
    if opt.schedule == "constant":
        return optax.constant_schedule(opt.learning_rate)
    if warmup > 0:
        return optax.warmup_cosine_decay_schedule(0.0, opt.learning_rate, warmup, total, end_value=0.0)
    return optax.cosine_decay_schedule(opt.learning_rate, total)


def base_optimizer(config: ml_collections.ConfigDict, lr: optax.Schedule) -> optax.GradientTransformation:
    """SGD / Adam with L2 weight decay added to the gradient (PyTorch's convention), or AdamW."""
    opt = config.optimizer
    if opt.name == "sgd":
        core = optax.sgd(lr, momentum=opt.momentum or None, nesterov=opt.nesterov)
    elif opt.name == "adam":
        core = optax.adam(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps)
    else:  # "adamw" (make_optimizer checks the names: jaxsam.validate)
        return optax.adamw(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay)
    if opt.weight_decay:
        return optax.chain(optax.add_decayed_weights(opt.weight_decay), core)
    return core


def sam_rho(config: ml_collections.ConfigDict, lr: optax.Schedule):
    """ρ of `config.sam`: 0 for "none"; for GSAM a schedule following the learning
    rate from rho down to rho_min (Zhuang et al. 2022); otherwise the constant rho."""
    s = config.sam
    if s.name == "none":
        return 0.0
    if s.name == "gsam" and s.rho_min != s.rho:
        return sam.rho_following_lr(lr, s.rho, s.rho_min, lr_max=config.optimizer.learning_rate)
    return s.rho


def sam_optimizer_part(config: ml_collections.ConfigDict, lr: optax.Schedule) -> optax.GradientTransformationExtraArgs:
    """The SAM transform of `config.sam`; "none" is ρ = 0, which is the base optimizer exactly."""
    s = config.sam
    axis_name = parallel.DATA_AXIS if s.per_device else None
    common = dict(axis_name=axis_name, mask=sam.kernels_only_mask if s.mask == "kernels" else None)
    rho = sam_rho(config, lr)
    if s.name == "none":
        return sam.sam_transform(rho, axis_name=axis_name)
    if s.name == "sam":
        return sam.sam_transform(rho, **common)
    if s.name == "asam":
        return sam.sam_transform(rho, adaptive=True, eta=s.eta, **common)
    if s.name == "gsam":
        return sam.gsam_transform(rho, s.alpha, **common)
    return sam.looksam_transform(rho, s.k, s.alpha, **common)  # "looksam" (names checked by make_optimizer)


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int):
    """(tx, lr_schedule): the SAM part chained before the base optimizer (`config` checked first)."""
    validate.check_config(config)
    lr = learning_rate_schedule(config, steps_per_epoch)
    return optax.chain(sam_optimizer_part(config, lr), base_optimizer(config, lr)), lr


# ---------------------------------------------------------------------------
# Steps.


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy with optional label smoothing."""
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def create_train_state(model, tx, key: jax.Array, image_shape=(1, 32, 32, 3)) -> TrainState:
    """Initial state (jitted: eager Flax init dispatches op by op)."""
    init_key, run_key = jax.random.split(key)
    variables = jax.jit(lambda k: model.init(k, jnp.zeros(image_shape, jnp.float32), train=False))(init_key)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros([], jnp.int32),
        params=params,
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(params),
        rng=jax.random.key_data(run_key),
    )


def per_device_train_step(
    model,
    tx,
    *,
    label_smoothing: float = 0.0,
    per_device_sam: bool = True,
    crop_padding: int = data.PAD,
    sam_step: Optional[bool] = None,
    skip_nonfinite: bool = False,
) -> Callable:
    """The train step as one device sees it: `(state, images_uint8, labels) -> (state, sums)`.

    Must run under a mapping that names the "data" axis (`make_train_step`'s
    shard_map, or `jax.vmap(axis_name="data")` to emulate devices on one).
    Each device augments its shard (example keys from the global batch
    position, so augmentation does not depend on the device count), takes the
    clean gradient (BatchNorm in training mode, its new statistics kept), and
    lets the optimizer chain — SAM first — take the perturbed gradient through
    `grad_fn`; gradients and statistics are averaged over devices. `sums`
    holds device-summed loss, correct and count, the mean per-device
    minibatch gradient norm, and `nonfinite` (1 when the loss, a device's
    gradient or the update is NaN/Inf) with `first_nonfinite` (that step's
    number, 1-based, else a large sentinel). With `skip_nonfinite` such a step
    leaves parameters, statistics and optimizer state unchanged (the step count
    still advances, as the batch was used) and adds nothing to the sums.
    """
    axis = parallel.DATA_AXIS

    def step(state: TrainState, images, labels):
        n = labels.shape[0]
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        inputs = data.augment(step_key, images, first_index=jax.lax.axis_index(axis) * n, padding=crop_padding)

        def loss_and_aux(params):
            variables = {"params": params, "batch_stats": state.batch_stats}
            logits, new_vars = model.apply(variables, inputs, train=True, mutable=["batch_stats"])
            return jnp.mean(cross_entropy(logits, labels, label_smoothing)), (logits, new_vars["batch_stats"])

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_and_aux, has_aux=True)(state.params)

        def grad_at(params):
            # The perturbed pass: same batch, its BatchNorm statistics discarded.
            g = jax.grad(lambda p: loss_and_aux(p)[0])(params)
            return g if per_device_sam else jax.lax.pmean(g, axis)

        if not per_device_sam:
            grads = jax.lax.pmean(grads, axis)
        # sam_step (LookSAM only): which branch this compiled step takes (None: decided inside).
        extra = {} if sam_step is None else {"sam_step": sam_step}
        updates, opt_state = tx.update(grads, state.opt_state, state.params, grad_fn=grad_at, **extra)
        new_state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats=jax.lax.pmean(batch_stats, axis),
            opt_state=opt_state,
        )
        grad_norm = optax.tree.norm(grads)
        # Finite on every device: a NaN anywhere makes the psum NaN, so all devices agree.
        finite = jnp.isfinite(jax.lax.psum(loss + grad_norm, axis) + optax.tree.norm(updates))
        kept = finite if skip_nonfinite else jnp.array(True)
        if skip_nonfinite:
            new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state,
                                     state.replace(step=state.step + 1))  # fmt: skip
        sums = {
            "loss": jax.lax.psum(jnp.where(kept, loss * n, 0.0), axis),
            "correct": jax.lax.psum(jnp.where(kept, jnp.sum(jnp.argmax(logits, -1) == labels), 0), axis),
            "count": jax.lax.psum(jnp.where(kept, n, 0), axis),
            "grad_norm": jax.lax.pmean(jnp.where(kept, grad_norm, 0.0), axis),
            "nonfinite": (~finite).astype(jnp.int32),
            "first_nonfinite": jnp.where(finite, NO_STEP, state.step + 1),
        }
        return new_state, sums

    return step


def make_train_step(
    model,
    tx,
    mesh,
    *,
    label_smoothing: float = 0.0,
    per_device_sam: bool = True,
    crop_padding: int = data.PAD,
    sam_step: Optional[bool] = None,
    skip_nonfinite: bool = False,
) -> Callable:
    """Jitted `(state, images_uint8, labels) -> (state, sums)` over every device of `mesh`.

    `per_device_train_step` mapped with `jax.shard_map` (pmap's programming
    model): replicated state, batch split over the "data" axis, state buffers donated.
    """
    axis = parallel.DATA_AXIS
    step = per_device_train_step(
        model, tx, label_smoothing=label_smoothing, per_device_sam=per_device_sam, crop_padding=crop_padding,
        sam_step=sam_step, skip_nonfinite=skip_nonfinite,
    )  # fmt: skip
    mapped = parallel.per_device(step, mesh, in_specs=(P(), P(axis), P(axis)), out_specs=(P(), P()))
    return jax.jit(mapped, donate_argnums=(0,))


def make_eval_step(model, mesh) -> Callable:
    """Jitted `(state, images_uint8, labels, mask) -> sums` of loss, correct and count (eval-mode BatchNorm)."""
    axis = parallel.DATA_AXIS

    def step(state: TrainState, images, labels, mask):
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        logits = model.apply(variables, data.normalize(images), train=False)
        sums = {
            "loss": jnp.sum(mask * cross_entropy(logits, labels)),
            "correct": jnp.sum(mask * (jnp.argmax(logits, -1) == labels)),
            "count": jnp.sum(mask),
        }
        return jax.lax.psum(sums, axis)

    mapped = parallel.per_device(step, mesh, in_specs=(P(), P(axis), P(axis), P(axis)), out_specs=P())
    return jax.jit(mapped)


def evaluate(eval_step: Callable, state: TrainState, split: data.Split, batch_size: int, mesh) -> dict[str, float]:
    """Mean loss and accuracy over the whole split."""
    total = None
    for images, labels, mask in data.eval_batches(split, batch_size):
        sums = eval_step(state, *parallel.put_batch((images, labels, mask), mesh))
        total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    total = jax.device_get(total)
    return {"loss": float(total["loss"] / total["count"]), "accuracy": float(total["correct"] / total["count"])}


# ---------------------------------------------------------------------------
# Workdir files.


def _flat(config: ml_collections.ConfigDict) -> dict[str, Any]:
    out = {}

    def walk(prefix, node):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, (dict, ml_collections.ConfigDict)):
                walk(name + ".", value)
            else:
                out[name] = value

    walk("", json.loads(config.to_json_best_effort()))
    return out


def write_or_check_config(
    config: ml_collections.ConfigDict, workdir: str, *, allow_change: bool = False, write: bool = True
) -> None:
    """Writes config.json, or checks that an existing one describes the same run.

    With `allow_change`, a differing config.json is kept as config.<n>.json and
    the new one written, so the history of the run's settings is not lost.
    With `write=False` (every process but the first of a multi-process run) it only checks.
    """
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = _flat(ml_collections.ConfigDict(json.load(f)))
        current = _flat(config)
        defaults = _flat(base_config(current.get("size")))
        # A field the saved run predates counts as its default (older workdirs stay resumable).
        differs = sorted(
            k
            for k in set(saved) | set(current)
            if k not in _RESUMABLE_FIELDS and saved.get(k, defaults.get(k)) != current.get(k)
        )
        if not differs:
            return
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differs[:4])
        network = [k for k in differs if k in _NETWORK_FIELDS]
        checkpoints = os.path.join(workdir, "checkpoints")
        if allow_change and network and os.path.isdir(checkpoints) and os.listdir(checkpoints):
            raise ValueError(
                f"{workdir} holds checkpoints of another network ({', '.join(network)} differ): "
                f"--allow_config_change cannot change the network; use a new --workdir"
            )
        if not allow_change:
            raise ValueError(
                f"{workdir} holds a run with a different config ({shown}): use a new --workdir, "
                f"or --allow_config_change to resume it with the new settings"
            )
        if not write:
            return
        n = 1
        while os.path.exists(os.path.join(workdir, f"config.{n}.json")):
            n += 1
        os.replace(path, os.path.join(workdir, f"config.{n}.json"))
    if not write:
        return
    _write_text(path, config.to_json_best_effort(indent=2, sort_keys=True))


def _write_text(path: str, text: str) -> None:
    """Writes `path` whole or not at all (a temporary file, then a rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def make_workdir(workdir: str) -> None:
    """Creates the run folder and checks that files can be written in it (one-line ValueError if not)."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise ValueError(f"cannot write to workdir {workdir} ({err.strerror}): choose a writable --workdir") from None


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run was made with (its config.json), fields it predates filled with their defaults."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"{workdir} has no config.json: pass the folder of a run made by scripts/train.py")
    with open(path) as f:
        saved = _flat(ml_collections.ConfigDict(json.load(f)))
    config = base_config(saved.get("size"))
    unknown = sorted(set(saved) - set(_flat(config)))
    if unknown:
        raise ValueError(f"{path} has fields this jaxsam does not know ({', '.join(unknown[:4])}): update jaxsam")
    config.update_from_flattened_dict(saved)
    return config


@flax.struct.dataclass
class Run:
    """A trained run loaded from its workdir (`load_run`)."""

    config: ml_collections.ConfigDict = flax.struct.field(pytree_node=False)
    model: Any = flax.struct.field(pytree_node=False)
    dataset: data.Dataset = flax.struct.field(pytree_node=False)
    steps_per_epoch: int = flax.struct.field(pytree_node=False)
    state: TrainState
    initial_state: TrainState
    workdir: str = flax.struct.field(pytree_node=False, default="")

    def learning_rate(self) -> float:
        """The learning rate of the run's last step (what its final update used)."""
        return float(learning_rate_schedule(self.config, self.steps_per_epoch)(max(int(self.state.step) - 1, 0)))


def load_run(workdir: str, *, step: int | None = None) -> Run:
    """Loads a run's config, data, network and checkpointed state (the latest, or `step`).

    `initial_state` is the run's state at step 0 (same seed), for init -> final interpolation.
    """
    config = read_config(workdir)
    dataset = load_data(config, workdir)
    model = get_model(config.model.name, dataset.num_classes, width=config.model.width, dtype=config.model.dtype,
                      conv=config.model.conv)
    steps_per_epoch = data.steps_per_epoch(len(dataset.train), config.train.batch_size)
    tx, _ = make_optimizer(config, steps_per_epoch)
    initial = create_train_state(model, tx, jax.random.key(config.seed))
    checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"))
    try:
        available = checkpoints.all_steps()
        if not available:
            raise ValueError(f"{workdir} has no checkpoint yet: train it first (scripts/train.py)")
        if step is not None and step not in available:
            raise ValueError(f"{workdir} has no checkpoint at step {step} (it has {sorted(available)})")
        state = checkpoints.restore(initial, step if step is not None else max(available))
    finally:
        checkpoints.close()
    return Run(
        config=config,
        model=model,
        dataset=dataset,
        steps_per_epoch=steps_per_epoch,
        state=state,
        initial_state=initial,
        workdir=workdir,
    )


class MetricsLog:
    """`metrics.jsonl`: one JSON object per logged step or epoch."""

    def __init__(self, path: str, resume_step: int, enabled: bool = True):
        self.path = path if enabled else None  # disabled: every process but the first of a multi-process run
        if enabled and os.path.exists(path):
            # Drop records past the checkpoint we resume from: those steps run again.
            with open(path) as f:
                kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, path)

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _accumulate(total, sums):
    """Running sums of the step's `sums` (the first non-finite step is a minimum, not a sum)."""
    if total is None:
        return sums
    added = jax.tree.map(jnp.add, total, sums)
    added["first_nonfinite"] = jnp.minimum(total["first_nonfinite"], sums["first_nonfinite"])
    return added


def _sum_metrics(sums) -> dict[str, float]:
    sums = jax.device_get(sums)
    count = max(float(sums["count"]), 1.0)
    skipped = int(sums["nonfinite"])
    return {
        "loss": float(sums["loss"]) / count,
        "accuracy": float(sums["correct"]) / count,
        "grad_norm": float(sums["grad_norm"]) / max(float(sums["steps"]) - skipped, 1.0),
        "steps": int(sums["steps"]),
        "skipped_steps": skipped,
        "first_nonfinite": int(sums["first_nonfinite"]),
    }


class TrainingDiverged(ValueError):
    """A step's loss, gradient or update was NaN/Inf under train.nan_policy="stop"."""


def _diverged(config, metrics: dict[str, Any], checkpoints: Checkpoints, workdir: str) -> TrainingDiverged:
    """The error to raise; finishes any checkpoint still being written first, so it is kept whole."""
    checkpoints.wait()
    kept = checkpoints.latest_step()
    checkpoints.close()
    saved = f"the last good checkpoint (step {kept}) is kept" if kept is not None else "no checkpoint was written yet"
    sam = f" or sam.rho (now {config.sam.rho:g})" if config.sam.name != "none" else ""
    return TrainingDiverged(
        f"training diverged at step {metrics['first_nonfinite']}: the loss or gradient became NaN/Inf; lower "
        f"optimizer.learning_rate (now {config.optimizer.learning_rate:g}){sam}, or set "
        f"--config.train.nan_policy=skip to skip such steps; {saved} in {workdir}"
    )


DATA_USED = "data.json"  # in a workdir: the source and file a run's data came from


def load_data(config: ml_collections.ConfigDict, workdir: str | None = None) -> data.Dataset:
    """The run's dataset; with `workdir`, a run whose config says source=auto reads the file its data.json names."""
    d = config.data
    path = d.path or None
    used = os.path.join(workdir, DATA_USED) if workdir else ""
    if d.source == "auto" and path is None and used and os.path.exists(used) and not os.environ.get(data.ENV_VAR):
        with open(used) as f:
            recorded = json.load(f)
        if recorded.get("source") == "archive" and recorded.get("path") and os.path.exists(recorded["path"]):
            path = recorded["path"]
    return data.load_dataset(
        d.source,
        path=path,
        **{k: d[k] for k in ("url", "sha256") if d.get(k)},
        progress=bool(config.train.progress),
        n_train=d.n_train or None,
        n_validation=d.n_validation,
        n_test=d.n_test or None,
        seed=config.seed,
        synthetic_size=(d.synthetic_train, d.synthetic_test),
    )


# ---------------------------------------------------------------------------
# The loop.


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False
) -> dict[str, Any]:
    """Trains `config` in `workdir` and returns the last epoch's record.

    A workdir with checkpoints is resumed from the latest one; one made by a
    different config is refused unless `allow_config_change`.
    """
    validate.check_config(config)  # before the data, the devices and the workdir
    mesh = parallel.data_mesh()
    parallel.check_divisible(config.train.batch_size, mesh, "train.batch_size")
    parallel.check_divisible(config.train.eval_batch_size, mesh, "train.eval_batch_size")
    dataset = load_data(config)
    steps_per_epoch = data.steps_per_epoch(len(dataset.train), config.train.batch_size)
    if steps_per_epoch == 0:
        raise ValueError(
            f"train.batch_size={config.train.batch_size} exceeds the {len(dataset.train)} training examples: "
            f"lower it or raise data.n_train"
        )
    model = get_model(config.model.name, dataset.num_classes, width=config.model.width, dtype=config.model.dtype,
                      conv=config.model.conv)
    tx, lr_schedule = make_optimizer(config, steps_per_epoch)
    rho = sam_rho(config, lr_schedule)
    rho_value = (lambda step: float(rho(step))) if callable(rho) else (lambda step: float(rho))

    make_workdir(workdir)
    primary = parallel.is_primary()  # process 0 writes the run's files; orbax coordinates checkpoints itself
    write_or_check_config(config, workdir, allow_change=allow_config_change, write=primary)
    if primary:  # which data the run read (config.json keeps what was asked for: source=auto, no path)
        _write_text(os.path.join(workdir, DATA_USED), json.dumps({"source": dataset.source, "path": dataset.path}))
    checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints)
    state = create_train_state(model, tx, jax.random.key(config.seed))
    # The newest checkpoint that reads; unreadable newer ones are reported and moved aside.
    restored = checkpoints.restore_latest_good(state)
    state = parallel.put_replicated(state if restored is None else restored, mesh)
    start_step = int(state.step)
    log = MetricsLog(os.path.join(workdir, "metrics.jsonl"), start_step, enabled=primary)

    step_options = dict(
        label_smoothing=config.train.label_smoothing,
        per_device_sam=config.sam.per_device,
        crop_padding=config.data.crop_padding,
        skip_nonfinite=config.train.nan_policy == "skip",
    )
    stop_on_nonfinite = config.train.nan_policy == "stop"
    if config.sam.name == "looksam" and config.sam.k > 1 and jax.default_backend() == "cpu":
        # XLA:CPU runs gradients inside lax.cond ~10x slower (docs/DESIGN.md): compile
        # LookSAM's SAM step and its reuse step separately and pick one per step here.
        sam_steps = {
            flag: parallel.compiled_in_step(make_train_step(model, tx, mesh, sam_step=flag, **step_options), "train")
            for flag in (True, False)
        }

        def train_step(state, images, labels):
            # `step` (the loop's count of steps done) equals state.step and LookSAM's
            # count, without a device-to-host read that would stall the pipeline.
            return sam_steps[step % config.sam.k == 0](state, images, labels)

    else:
        train_step = parallel.compiled_in_step(make_train_step(model, tx, mesh, **step_options), "train")
    eval_step = parallel.compiled_in_step(make_eval_step(model, mesh), "eval")
    tracker = None
    if config.track.every_epochs > 0:
        from jaxsam.geometry.track import make_tracker

        tracker = make_tracker(config.track, model, dataset.train.images, dataset.train.labels)
    num_epochs = config.train.num_epochs
    batch_size = config.train.batch_size
    total_steps = num_epochs * steps_per_epoch
    # train.max_steps stops early (e.g. to check that a paper-scale config starts);
    # the schedule still spans num_epochs, so the stopped run is a resumable prefix.
    stop_step = min(total_steps, config.train.max_steps) if config.train.max_steps else total_steps
    record: dict[str, Any] = {}
    step = start_step
    for epoch in range(start_step // steps_per_epoch, num_epochs):
        if step >= stop_step:
            break
        epoch_start = time.time()
        epoch_sums = window = None
        first = step - epoch * steps_per_epoch
        bar = tqdm(
            total=steps_per_epoch,
            initial=first,
            disable=not (config.train.progress and primary),
            desc=f"epoch {epoch + 1}/{num_epochs}",
            unit="step",
            leave=True,
        )
        window_start = time.time()
        batches = data.train_batches(dataset.train, batch_size, seed=config.seed, epoch=epoch, start_step=first)
        for images, labels in itertools.islice(batches, max(0, stop_step - step)):
            state, sums = train_step(state, *parallel.put_batch((images, labels), mesh))
            sums = dict(sums, steps=1)
            epoch_sums = _accumulate(epoch_sums, sums)
            window = _accumulate(window, sums)
            step += 1
            bar.update(1)
            if step % config.train.log_every_steps == 0:
                m = _sum_metrics(window)  # the one host sync of the window
                if stop_on_nonfinite and m["skipped_steps"]:
                    bar.close()
                    raise _diverged(config, m, checkpoints, workdir)
                del m["first_nonfinite"]
                if stop_on_nonfinite:
                    del m["skipped_steps"]
                images_per_sec = m.pop("steps") * batch_size / (time.time() - window_start)
                window, window_start = None, time.time()
                log.write({"step": step, "epoch": epoch + 1, **{f"train_{k}": v for k, v in m.items()},
                           "lr": float(lr_schedule(step - 1)), "rho": rho_value(step - 1),
                           "images_per_sec": images_per_sec})
                bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['accuracy']:.3f}", img_s=f"{images_per_sec:.0f}")
        train_time = time.time() - epoch_start
        finished = step == (epoch + 1) * steps_per_epoch
        record = {"step": step, "epoch": epoch + 1, "epoch_done": finished, "lr": float(lr_schedule(max(step - 1, 0)))}
        if epoch_sums is not None:
            m = _sum_metrics(epoch_sums)
            if stop_on_nonfinite and m["skipped_steps"]:  # before evaluating or saving the broken state
                bar.close()
                raise _diverged(config, m, checkpoints, workdir)
            del m["first_nonfinite"]
            if stop_on_nonfinite:
                del m["skipped_steps"]
            record.update({f"train_{k}": v for k, v in m.items() if k != "steps"})
            record["train_images_per_sec"] = m["steps"] * batch_size / train_time
        test = evaluate(eval_step, state, dataset.test, config.train.eval_batch_size, mesh)
        record.update({f"test_{k}": v for k, v in test.items()})
        if dataset.validation is not None:
            val = evaluate(eval_step, state, dataset.validation, config.train.eval_batch_size, mesh)
            record.update({f"validation_{k}": v for k, v in val.items()})
        if tracker is not None and finished and (epoch + 1) % config.track.every_epochs == 0:
            key = jax.random.fold_in(jax.random.key(config.seed + 1), epoch)
            record.update(tracker(state.params, state.batch_stats, key))
        record["epoch_seconds"] = time.time() - epoch_start
        log.write(record)
        bar.set_postfix(
            loss=f"{record.get('train_loss', float('nan')):.3f}",
            acc=f"{record.get('train_accuracy', float('nan')):.3f}",
            img_s=f"{record.get('train_images_per_sec', 0):.0f}",
            test_acc=f"{record['test_accuracy']:.3f}",
        )
        bar.close()
        if not finished or (epoch + 1) % config.train.checkpoint_every_epochs == 0 or epoch + 1 == num_epochs:
            checkpoints.save(step, jax.device_get(state))
    checkpoints.wait()
    checkpoints.close()
    if not record:  # nothing left to train (a finished run started again): report where it stands
        record = {"step": step, "epoch": -(-step // steps_per_epoch), "epoch_done": step % steps_per_epoch == 0}
        test = evaluate(eval_step, state, dataset.test, config.train.eval_batch_size, mesh)
        record.update({f"test_{k}": v for k, v in test.items()})
    return record

