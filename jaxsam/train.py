"""Training: the train state, the per-device train and eval steps, and the loop.

`train_and_evaluate(config, workdir)` trains one network on CIFAR-10 with the
optimizer and SAM variant of `config` on every device, evaluates on the test
(and validation) split after each epoch, writes `config.json` and
`metrics.jsonl`, saves orbax checkpoints, and resumes from the latest one when
the workdir has any: the resumed run ends with the same parameters as an
uninterrupted one, because each epoch's batch order comes from (seed, epoch)
and each step's augmentation key from (seed, step, device).

The SAM step (Foret et al. 2021) is `jaxsam.sam_transform` (or another member
of `jaxsam.sam`) chained before the base optimizer; BatchNorm statistics come
from the clean forward pass only, except for Momentum-SAM, whose one pass is
at the perturbed point.
"""

from __future__ import annotations

import itertools
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
from jaxsam import workdir as workdir_lib
from jaxsam.checkpoint import Checkpoints
from jaxsam.metrics import StepSums
from jaxsam.workdir import MetricsLog, load_data, read_config, write_or_check_config  # noqa: F401 (also train's API)
from jaxsam.models import get_model

OPTIMIZERS = ("adam", "adamw", "sgd")
NAN_POLICIES = ("stop", "skip")
SAM_VARIANTS = ("asam", "fsam", "gsam", "looksam", "msam", "none", "sam", "vasso")
NO_STEP = 2**31 - 1  # "no non-finite step" in the sums' first_nonfinite
TRACK_STARTS = "track_starts.npz"  # the tracker's warm-start vectors after the last tracked epoch


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
    """The SAM transform of `config.sam`; "none" is ρ = 0, which is the base optimizer exactly.

    "msam" (Momentum-SAM) perturbs along the momentum of the base optimizer's own
    decay (SGD's momentum, Adam's b1); the train step takes its one gradient at
    `sam.gradient_point`.
    """
    s = config.sam
    axis_name = parallel.DATA_AXIS if s.per_device else None
    common = dict(axis_name=axis_name, mask=sam.kernels_only_mask if s.mask == "kernels" else None)
    rho = sam_rho(config, lr)
    if s.name == "none":
        return sam.sam_transform(rho, axis_name=axis_name)
    if s.name == "sam":
        return sam.sam_transform(rho, **common)
    if s.name == "asam":
        return sam.sam_transform(rho, adaptive=True, eta=s.eta, adaptive_leaves=s.adaptive_leaves, **common)
    if s.name == "gsam":
        return sam.gsam_transform(rho, s.alpha, **common)
    if s.name == "fsam":
        return sam.friendly_sam_transform(rho, s.sigma, s.lmbda, **common)
    if s.name == "vasso":
        return sam.vasso_transform(rho, s.theta, **common)
    if s.name == "msam":
        opt = config.optimizer
        return sam.momentum_sam_transform(rho, opt.momentum if opt.name == "sgd" else opt.b1, **common)
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
    `grad_fn`; gradients and statistics are averaged over devices. With
    Momentum-SAM the step's one gradient (and the loss, accuracy and statistics
    of that pass) is taken at `sam.gradient_point(opt_state, params)`, the
    perturbed point, and `grad_fn` is never called: one forward and backward
    pass per step. `sums`
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

        # The parameters themselves except for Momentum-SAM, whose single gradient is taken at w + ε.
        point = sam.gradient_point(state.opt_state, state.params)
        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_and_aux, has_aux=True)(point)

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
# The loop's parts.


class TrainingDiverged(ValueError):
    """A step's loss, gradient or update was NaN/Inf under train.nan_policy="stop"."""


def _reported(config, metrics: dict[str, Any], checkpoints: Checkpoints, workdir: str) -> dict[str, Any]:
    """The NaN policy, in one place: raises `TrainingDiverged` for a window or epoch with a non-finite step
    under "stop"; else returns the metrics to log (skipped_steps only under "skip")."""
    if config.train.nan_policy == "stop" and metrics["skipped_steps"]:
        checkpoints.wait()  # a checkpoint still being written is kept whole
        kept = checkpoints.latest_step()
        saved = f"the last good checkpoint (step {kept}) is kept" if kept is not None else "no checkpoint was written yet"
        sam_hint = f" or sam.rho (now {config.sam.rho:g})" if config.sam.name != "none" else ""
        raise TrainingDiverged(
            f"training diverged at step {metrics['first_nonfinite']}: the loss or gradient became NaN/Inf; lower "
            f"optimizer.learning_rate (now {config.optimizer.learning_rate:g}){sam_hint}, or set "
            f"--config.train.nan_policy=skip to skip such steps; {saved} in {workdir}"
        )
    dropped = ("steps", "first_nonfinite") + (("skipped_steps",) if config.train.nan_policy == "stop" else ())
    return {k: v for k, v in metrics.items() if k not in dropped}


def _compiled_train_step(config, model, tx, mesh) -> Callable:
    """`(state, images, labels, step) -> (state, sums)` over every device, `step` the count of steps done."""
    step_options = dict(
        label_smoothing=config.train.label_smoothing,
        per_device_sam=config.sam.per_device,
        crop_padding=config.data.crop_padding,
        skip_nonfinite=config.train.nan_policy == "skip",
    )
    from jaxsam.geometry import driver  # where loops run is decided in one place (JAXSAM_HOST_LOOPS overrides)

    if config.sam.name == "looksam" and config.sam.k > 1 and driver.host_loops():
        # XLA:CPU runs gradients inside lax.cond ~10x slower (docs/DESIGN.md): compile
        # LookSAM's SAM step and its reuse step separately and pick one per step here;
        # `step` equals state.step and LookSAM's count, without a device-to-host read.
        steps = {
            flag: parallel.compiled_in_step(make_train_step(model, tx, mesh, sam_step=flag, **step_options), "train")
            for flag in (True, False)
        }
        return lambda state, images, labels, step: steps[step % config.sam.k == 0](state, images, labels)
    compiled = parallel.compiled_in_step(make_train_step(model, tx, mesh, **step_options), "train")
    return lambda state, images, labels, step: compiled(state, images, labels)


def _evaluate_splits(eval_step, state, dataset: data.Dataset, config, mesh) -> dict[str, float]:
    """test_* (and validation_*) loss and accuracy of `state`."""
    record = {f"test_{k}": v for k, v in
              evaluate(eval_step, state, dataset.test, config.train.eval_batch_size, mesh).items()}  # fmt: skip
    if dataset.validation is not None:
        validation = evaluate(eval_step, state, dataset.validation, config.train.eval_batch_size, mesh)
        record.update({f"validation_{k}": v for k, v in validation.items()})
    return record


def _checkpoint_due(config, epoch: int, finished: bool) -> bool:
    """Save after epoch `epoch` (0-based): a stopped epoch, every checkpoint_every_epochs, and the last."""
    every, last = config.train.checkpoint_every_epochs, config.train.num_epochs
    return not finished or (epoch + 1) % every == 0 or epoch + 1 == last


def _progress_bar(config, epoch: int, first: int, steps_per_epoch: int, primary: bool):
    return tqdm(total=steps_per_epoch, initial=first, disable=not (config.train.progress and primary),
                desc=f"epoch {epoch + 1}/{config.train.num_epochs}", unit="step", leave=True)  # fmt: skip


def _postfix(metrics: dict[str, Any], images_per_sec: float, **more: str) -> dict[str, str]:
    return dict(loss=f"{metrics.get('loss', float('nan')):.3f}", acc=f"{metrics.get('accuracy', float('nan')):.3f}",
                img_s=f"{images_per_sec:.0f}", **more)  # fmt: skip


# ---------------------------------------------------------------------------
# The loop.


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    allow_config_change: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Trains `config` in `workdir` and returns the last epoch's record.

    A workdir with checkpoints is resumed from the latest one; one made by a
    different config is refused unless `allow_config_change`. Every check of
    the config and the data comes before the workdir is touched. `log`, if
    given, receives one line naming the data used (source, file, split sizes).

    Example:
      >>> record = train_and_evaluate(config_of("configs/sgd_sam.py:smoke"), "/tmp/run")
      >>> record["test_accuracy"]
    """
    validate.check_config(config)
    mesh = parallel.data_mesh()
    parallel.check_divisible(config.train.batch_size, mesh, "train.batch_size")
    parallel.check_divisible(config.train.eval_batch_size, mesh, "train.eval_batch_size")
    dataset = workdir_lib.load_data(config)
    if log is not None and parallel.is_primary():
        log(f"data: {dataset.description}")
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
    rho_at = (lambda step: float(rho(step))) if callable(rho) else (lambda step: float(rho))

    workdir_lib.make_workdir(workdir)
    primary = parallel.is_primary()  # process 0 writes the run's files; orbax coordinates checkpoints itself
    workdir_lib.write_or_check_config(config, workdir, allow_change=allow_config_change, write=primary)
    if primary:
        workdir_lib.write_data_used(workdir, dataset)
    checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints)
    state = create_train_state(model, tx, jax.random.key(config.seed))
    restored = checkpoints.restore_latest_good(state)  # unreadable newer checkpoints are reported and moved aside
    state = parallel.put_replicated(state if restored is None else restored, mesh)
    step = int(state.step)
    log = workdir_lib.MetricsLog(
        os.path.join(workdir, "metrics.jsonl"), step, enabled=primary,
        tensorboard=os.path.join(workdir, "tensorboard") if config.train.tensorboard else None,
    )  # fmt: skip
    train_step = _compiled_train_step(config, model, tx, mesh)
    eval_step = parallel.compiled_in_step(make_eval_step(model, mesh), "eval")
    tracker = None
    if config.track.every_epochs > 0:
        from jaxsam.track import make_tracker

        tracker = make_tracker(config.track, model, dataset.train.images, dataset.train.labels, config.optimizer)
        tracker.load(os.path.join(workdir, TRACK_STARTS), step // steps_per_epoch)  # warm after a resume
    batch_size, num_epochs = config.train.batch_size, config.train.num_epochs
    # train.max_steps stops early (e.g. to check that a paper-scale config starts);
    # the schedule still spans num_epochs, so the stopped run is a resumable prefix.
    stop_step = min(num_epochs * steps_per_epoch, config.train.max_steps or num_epochs * steps_per_epoch)
    record: dict[str, Any] = {}
    try:
        for epoch in range(step // steps_per_epoch, num_epochs):
            if step >= stop_step:
                break
            epoch_start = window_start = time.time()
            epoch_sums, window = StepSums(), StepSums()
            first = step - epoch * steps_per_epoch
            bar = _progress_bar(config, epoch, first, steps_per_epoch, primary)
            batches = data.train_batches(dataset.train, batch_size, seed=config.seed, epoch=epoch, start_step=first)
            for images, labels in itertools.islice(batches, max(0, stop_step - step)):
                state, sums = train_step(state, *parallel.put_batch((images, labels), mesh), step)
                epoch_sums.add(sums)
                window.add(sums)
                step += 1
                bar.update(1)
                if step % config.train.log_every_steps == 0:
                    images_per_sec = window.steps * batch_size / (time.time() - window_start)
                    m = _reported(config, window.summary(), checkpoints, workdir)  # the window's one host sync
                    window, window_start = StepSums(), time.time()
                    log.write({"step": step, "epoch": epoch + 1, **{f"train_{k}": v for k, v in m.items()},
                               "lr": float(lr_schedule(step - 1)), "rho": rho_at(step - 1),
                               "images_per_sec": images_per_sec})  # fmt: skip
                    bar.set_postfix(_postfix(m, images_per_sec))
            train_time = time.time() - epoch_start
            finished = step == (epoch + 1) * steps_per_epoch
            record = {"step": step, "epoch": epoch + 1, "epoch_done": finished,
                      "lr": float(lr_schedule(max(step - 1, 0)))}  # fmt: skip
            if epoch_sums:
                m = _reported(config, epoch_sums.summary(), checkpoints, workdir)  # before evaluating or saving
                record.update({f"train_{k}": v for k, v in m.items()})
                record["train_images_per_sec"] = epoch_sums.steps * batch_size / train_time
            record.update(_evaluate_splits(eval_step, state, dataset, config, mesh))
            if tracker is not None and finished and (epoch + 1) % config.track.every_epochs == 0:
                record.update(tracker(state, jax.random.fold_in(jax.random.key(config.seed + 1), epoch),
                                      record["lr"]))  # fmt: skip
                if primary:
                    tracker.save(os.path.join(workdir, TRACK_STARTS), epoch + 1)
            record["epoch_seconds"] = time.time() - epoch_start
            log.write(record)
            bar.set_postfix(_postfix({k[6:]: v for k, v in record.items() if k.startswith("train_")},
                                     record.get("train_images_per_sec", 0),
                                     test_acc=f"{record['test_accuracy']:.3f}"))  # fmt: skip
            bar.close()
            if _checkpoint_due(config, epoch, finished):
                checkpoints.save(step, jax.device_get(state))
        checkpoints.wait()
    finally:
        checkpoints.close()
        log.close()
    if not record:  # nothing left to train (a finished run started again): report where it stands
        record = {"step": step, "epoch": -(-step // steps_per_epoch), "epoch_done": step % steps_per_epoch == 0}
        record.update({k: v for k, v in _evaluate_splits(eval_step, state, dataset, config, mesh).items()
                       if k.startswith("test_")})  # fmt: skip
    return record
