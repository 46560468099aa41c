"""Training end to end on synthetic data: loss falls, files are written, resume is exact."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import chex
import jax
import numpy as np
import pytest

from conftest import tiny_train_config

from jaxsam.checkpoint import Checkpoints
from jaxsam.train import make_optimizer, train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


tiny_config = tiny_train_config


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _final_params(workdir, config):
    ckpt = Checkpoints(os.path.join(workdir, "checkpoints"))
    step = ckpt.latest_step()
    raw = ckpt.restore(_abstract_state(config), step)
    ckpt.close()
    return step, raw


def _abstract_state(config):
    from jaxsam.models import get_model
    from jaxsam.train import create_train_state

    model = get_model(config.model.name, 10, width=config.model.width)
    tx, _ = make_optimizer(config, 4)
    return jax.eval_shape(lambda: create_train_state(model, tx, jax.random.key(config.seed)))


@pytest.fixture(scope="module")
def sam_run(tmp_path_factory):
    """Two epochs of ResNet18 (width 1/16) + SGD + SAM on synthetic data."""
    workdir = str(tmp_path_factory.mktemp("run") / "sgd_sam")
    config = tiny_config(**{"sam.name": "sam", "train.num_epochs": 4})
    record = train_and_evaluate(config, workdir)
    return config, workdir, record


@pytest.mark.xdist_group("sam_run")
def test_training_writes_its_files_and_learns(sam_run):
    config, workdir, record = sam_run
    assert sorted(os.listdir(workdir)) == ["checkpoints", "config.json", "data.json", "metrics.jsonl"]
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["sam"]["name"] == "sam"
    records = _records(workdir)
    epochs = [r for r in records if r.get("epoch_done")]
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4]
    assert [r["step"] for r in epochs] == [4, 8, 12, 16]  # 128 examples / batch 32
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    # Synthetic classes are separable: the test accuracy beats chance (0.1) (64 test images: 0.2 is 2.5 sigma above chance).
    assert record["test_accuracy"] > 0.2
    steps = [r for r in records if not r.get("epoch_done")]
    assert steps and all(r["rho"] == 0.05 and r["train_grad_norm"] > 0 for r in steps)
    assert Checkpoints(os.path.join(workdir, "checkpoints")).all_steps() == [8, 12, 16]  # the last 3 kept


@pytest.mark.xdist_group("sam_run")
def test_resume_from_a_checkpoint_gives_identical_parameters(sam_run, tmp_path):
    config, workdir, _ = sam_run
    interrupted = str(tmp_path / "interrupted")
    shutil.copytree(workdir, interrupted)
    # Simulate a run killed half-way (N/2 = 8 of 16 steps): its last checkpoint is step 8.
    for step in ("12", "16"):
        shutil.rmtree(os.path.join(interrupted, "checkpoints", step))
    train_and_evaluate(config, interrupted)
    step_a, full = _final_params(workdir, config)
    step_b, resumed = _final_params(interrupted, config)
    assert step_a == step_b == 16
    chex.assert_trees_all_equal(full, resumed)  # bit-identical
    # The log holds each epoch once.
    assert [r["epoch"] for r in _records(interrupted) if r.get("epoch_done")] == [1, 2, 3, 4]


@pytest.mark.xdist_group("sam_run")
def test_a_finished_run_started_again_trains_nothing(sam_run):
    config, workdir, record = sam_run
    before = open(os.path.join(workdir, "metrics.jsonl")).read()
    again = train_and_evaluate(config, workdir)
    assert again["step"] == 16 and again["test_accuracy"] == record["test_accuracy"]
    assert open(os.path.join(workdir, "metrics.jsonl")).read() == before


def test_max_steps_stops_early_and_resumes(tmp_path):
    config = tiny_config(**{"train.max_steps": 6})
    workdir = str(tmp_path / "run")
    record = train_and_evaluate(config, workdir)
    assert record["step"] == 6 and record["epoch"] == 2 and not record["epoch_done"]
    assert Checkpoints(os.path.join(workdir, "checkpoints")).all_steps() == [4, 6]
    config.train.max_steps = 0
    record = train_and_evaluate(config, workdir)
    assert record["step"] == 8 and record["epoch_done"]


@pytest.mark.xdist_group("sam_run")
def test_a_workdir_of_another_config_is_refused_untouched(sam_run, tmp_path):
    config, workdir, _ = sam_run
    other = tiny_config(**{"sam.name": "none", "train.num_epochs": 4})
    before = open(os.path.join(workdir, "metrics.jsonl")).read()
    with pytest.raises(ValueError, match=r"different config \(sam.name: 'sam' -> 'none'\): use a new --workdir"):
        train_and_evaluate(other, workdir)
    assert open(os.path.join(workdir, "metrics.jsonl")).read() == before


@pytest.mark.xdist_group("sam_run")
def test_allow_config_change_keeps_the_old_config(sam_run, tmp_path):
    config, workdir, _ = sam_run
    copy = str(tmp_path / "copy")
    shutil.copytree(workdir, copy)
    longer = tiny_config(**{"sam.name": "sam", "train.num_epochs": 5})
    record = train_and_evaluate(longer, copy, allow_config_change=True)
    assert record["epoch"] == 5 and record["step"] == 20
    with open(os.path.join(copy, "config.1.json")) as f:
        assert json.load(f)["train"]["num_epochs"] == 4
    with open(os.path.join(copy, "config.json")) as f:
        assert json.load(f)["train"]["num_epochs"] == 5


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"optimizer.name": "lion"}, "unknown optimizer 'lion': use one of adam, adamw, sgd"),
        ({"sam.name": "ssam"}, "unknown sam.name 'ssam': use one of asam, fsam, gsam, looksam, msam, none, sam, vasso"),
        ({"sam.rho": -0.1, "sam.name": "sam"}, "rho must be a finite number >= 0"),
        ({"model.name": "resnet50"}, "unknown model 'resnet50'"),
        ({"train.batch_size": 1024}, "exceeds the 128 training examples"),
        ({"train.nan_policy": "ignore"}, "unknown train.nan_policy 'ignore': use stop or skip"),
    ],
)
def test_bad_config_is_one_clear_error(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train_and_evaluate(tiny_config(**overrides), str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


@pytest.mark.parametrize("sam_name", ["none", "sam", "looksam", "fsam", "vasso", "msam"])
def test_optimizer_variants_train(sam_name):
    """Each optimizer chain makes finite progress for a few steps."""
    import jax.numpy as jnp
    import optax

    from jaxsam.sam import gradient_point

    # Outside a mapped step there is no "data" axis: one global perturbation.
    config = tiny_config(**{"sam.name": sam_name, "optimizer.name": "adam", "optimizer.learning_rate": 1e-3, "sam.per_device": False})
    tx, lr = make_optimizer(config, 4)
    params = {"w": jnp.ones((3,))}
    state = tx.init(params)
    loss = lambda p: jnp.sum(p["w"] ** 2)  # noqa: E731
    grad = jax.grad(loss)
    for _ in range(3):
        updates, state = tx.update(grad(gradient_point(state, params)), state, params, grad_fn=grad)
        params = optax.apply_updates(params, updates)
    assert loss(params) < 3.0
    assert float(lr(0)) == pytest.approx(1e-3)


@pytest.mark.parametrize("sam_name, passes", [("msam", 1), ("sam", 2), ("fsam", 2), ("vasso", 2)])
def test_the_train_step_takes_one_gradient_for_momentum_sam_and_two_for_sam(sam_name, passes):
    """Forward passes per compiled train step, counted as they run: Momentum-SAM's one gradient is at its point."""
    import flax.linen as nn
    import jax.numpy as jnp

    from jaxsam.sam import gradient_point
    from jaxsam.train import create_train_state, per_device_train_step

    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            x = nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x.reshape((x.shape[0], -1))[:, :16]))
            return nn.Dense(10)(x)

    calls = []

    class Counting:  # the model, with a callback that runs once per executed forward pass
        def init(self, *args, **kwargs):
            return Tiny().init(*args, **kwargs)

        def apply(self, *args, **kwargs):
            jax.debug.callback(lambda: calls.append(1))
            return Tiny().apply(*args, **kwargs)

    config = tiny_config(**{"sam.name": sam_name, "sam.rho": 0.5})
    tx, _ = make_optimizer(config, 4)
    state = create_train_state(Counting(), tx, jax.random.key(0))
    step = jax.jit(jax.vmap(per_device_train_step(Counting(), tx), in_axes=(None, 0, 0), axis_name="data"))
    rng = np.random.RandomState(0)
    images = jnp.asarray(rng.randint(0, 256, (1, 8, 32, 32, 3)).astype(np.uint8))
    labels = jnp.asarray(rng.randint(0, 10, (1, 8)).astype(np.int32))
    for _ in range(3):
        state, sums = step(state, images, labels)
        state = jax.tree.map(lambda x: x[0], state)
    jax.effects_barrier()
    assert len(calls) == 3 * passes
    assert np.isfinite(float(sums["loss"][0]))
    if sam_name == "msam":  # after a step its point is ρ from the parameters
        point = gradient_point(state.opt_state, state.params)
        distance = float(jnp.sqrt(sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(point),
                                                                             jax.tree.leaves(state.params)))))
        assert distance == pytest.approx(0.5, rel=1e-5)


# The per-device step checked on 8 devices of one process; then each of the
# two-process run's three steps (MULTI: one step per epoch) taken again here from
# that run's own checkpoint before it, saved as step<k>.npz.
EIGHT_DEVICES = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    sys.path.insert(0, {tests!r})
    from test_train import MULTI, _abstract_state, tiny_config
    from jaxsam import data, parallel
    from jaxsam.checkpoint import Checkpoints
    from jaxsam.models import get_model
    from jaxsam.train import create_train_state, load_data, make_optimizer, make_train_step, per_device_train_step, train_and_evaluate
    assert jax.device_count() == 8, jax.devices()
    out = {{}}
    config = tiny_config(**MULTI)
    model = get_model("resnet18", 10, width=config.model.width)
    tx, _ = make_optimizer(config, 1)
    state = jax.device_get(create_train_state(model, tx, jax.random.key(config.seed)))  # on the host: steps donate theirs
    ds = load_data(config)
    batches = [next(data.train_batches(ds.train, 32, seed=config.seed, epoch=e)) for e in range(3)]
    mesh = parallel.data_mesh()
    step = make_train_step(model, tx, mesh, label_smoothing=config.train.label_smoothing,
                           per_device_sam=config.sam.per_device, crop_padding=config.data.crop_padding)

    # One step on 8 devices against the same per-device step emulated on one
    # device with vmap (8 shards of 4, per-shard BatchNorm and SAM perturbation).
    ds128 = data.load_dataset("synthetic", synthetic_size=(128, 64))
    images, labels = next(data.train_batches(ds128.train, 32, seed=0, epoch=0))
    emulated = jax.jit(jax.vmap(per_device_train_step(model, tx), in_axes=(None, 0, 0), axis_name="data"))
    s_emulated, m_emulated = emulated(state, images.reshape(8, 4, 32, 32, 3), labels.reshape(8, 4))
    s_emulated = jax.tree.map(lambda x: x[0], s_emulated)
    s_devices, m_devices = step(parallel.put_replicated(state, mesh), *parallel.put_batch((images, labels), mesh))
    diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), s_devices.params, s_emulated.params)
    out["step_max_param_diff"] = max(jax.tree.leaves(diff))
    out["step_loss"] = [float(m_devices["loss"]), float(m_emulated["loss"][0])]

    ckpt = Checkpoints({two!r} + "/checkpoints")
    for k, batch in enumerate(batches):
        before = state if k == 0 else jax.device_get(ckpt.restore(_abstract_state(config), k))
        after, _ = step(parallel.put_replicated(before, mesh), *parallel.put_batch(batch, mesh))
        np.savez({reference!r} + f"/step{{k + 1}}.npz", *jax.tree.leaves(jax.device_get((after.params, after.batch_stats))))
    ckpt.close()
    try:
        train_and_evaluate(tiny_config(**{{"train.batch_size": 36}}), {reference!r} + "/bad")
    except ValueError as err:
        out["error"] = str(err)
    print(json.dumps(out))
    """
)


def _free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


# tiny_config(**MULTI) as scripts/train.py flags: one step of 32 images per epoch, three epochs.
MULTI = {"sam.name": "sam", "data.synthetic_train": 32, "train.num_epochs": 3, "train.log_every_steps": 1}
MULTI_FLAGS = [
    "--config", os.path.join(ROOT, "configs", "sgd_sam.py") + ":smoke", "--config.train.progress=false",
    "--config.data.synthetic_train=32", "--config.data.synthetic_test=64", "--config.train.batch_size=32",
    "--config.train.eval_batch_size=32", "--config.train.num_epochs=3", "--config.optimizer.learning_rate=0.05",
    "--config.train.log_every_steps=1",
]  # fmt: skip

# One step of the same float32 math evaluated in two ways (8 devices of one process against
# vmap; two processes of 4 devices against one of 8) differs by rounding only: the layouts
# sum the devices in other orders (gloo vs XLA's in-process all-reduce), and the per-device
# convolution gradients themselves come out different in the last bits when a process has
# 4 rather than 8 CPU devices (same HLO, same threads; measured up to 2.2e-7 on the gradient).
# One step's rounding is then a few ulps of the parameters (1.2e-7 at size 1; measured
# 1.2e-7 to 2.4e-7 per step in repeated runs); 1e-5 is 80 ulps at size 1. Steps are compared one at a time from the same
# state, never along a trajectory: SAM with 4-example BatchNorm amplifies a rounding
# difference from step to step (2.4e-7, 3.0e-7, 1.3e-4 over three steps), so a trajectory
# bound would be a guess. A wiring fault (a process holding other rows, a missing mean over
# devices, a wrong epoch's batch) moves parameters by a whole step, 1e-3 and more.
ONE_STEP_ROUNDING = 1e-5


@pytest.mark.slow
def test_eight_devices_in_one_process_and_in_two(tmp_path):
    """The per-device step on 8 fake CPU devices (XLA's host platform device count), then a run
    of two processes of 4 devices each through jax.distributed (gloo on localhost) against it."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    # The training loop as two processes x 4 devices: the same mesh of 8 and the same global batches.
    two = tmp_path / "two_processes"
    port = _free_port()
    processes = [
        subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "scripts", "train.py"), *MULTI_FLAGS, f"--workdir={two}",
             f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]  # fmt: skip
    outputs = [p.communicate(timeout=900)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert outputs[0].strip().splitlines()[-1].startswith(f"done: {two}: epoch 3/3, step 3")
    assert not any(line.startswith("done:") for line in outputs[1].splitlines())  # process 0 reports
    config = tiny_config(**MULTI)
    assert json.loads((two / "config.json").read_text()) == json.loads(config.to_json_best_effort())
    records = _records(str(two))
    assert [(r["step"], "test_accuracy" in r) for r in records] == [(1, False), (1, True), (2, False), (2, True),
                                                                     (3, False), (3, True)]  # written once  # fmt: skip
    ckpt = Checkpoints(two / "checkpoints")
    assert ckpt.all_steps() == [1, 2, 3] and sorted(os.listdir(two / "checkpoints")) == ["1", "2", "3"]

    # One process of 8 devices: the step against vmap, and each two-process step taken again.
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    reference = tmp_path / "one_process"
    reference.mkdir()
    script = EIGHT_DEVICES.format(tests=os.path.join(ROOT, "tests"), reference=str(reference), two=str(two))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(result)
    assert result["step_max_param_diff"] < ONE_STEP_ROUNDING
    np.testing.assert_allclose(*result["step_loss"], rtol=1e-5)
    assert result["error"].startswith("train.batch_size=36 does not split over the 8 devices: use a multiple of 8")
    for step in (1, 2, 3):
        state = ckpt.restore(_abstract_state(config), step)
        ours = jax.tree.leaves((state.params, state.batch_stats))
        theirs = np.load(reference / f"step{step}.npz")
        assert len(ours) == len(theirs.files)
        worst = max(float(np.max(np.abs(a - theirs[f"arr_{i}"]))) for i, a in enumerate(ours))
        print(f"step {step} from the same state: largest difference {worst:.3g}")
        assert worst < ONE_STEP_ROUNDING, (step, worst)
    ckpt.close()


def test_bfloat16_trains_and_later_epochs_compile_nothing(tmp_path, monkeypatch):
    """bfloat16 compute (the GPU path) trains on CPU: the loss falls. And every program (train
    step, eval step, metrics) is built in epoch 1; epochs 2 and 3 reuse them. One run checks both."""
    import jaxsam.train as train_lib

    events = []
    lowering = "/jax/core/compile/jaxpr_to_mlir_module_duration"  # one per program lowered, cache or not

    def listener(event, *_, **__):
        events.append(event)

    original = train_lib.MetricsLog.write

    def write(self, record):
        events.append(("epoch", record["epoch"]) if "test_accuracy" in record else "log")
        original(self, record)

    monkeypatch.setattr(train_lib.MetricsLog, "write", write)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        train_and_evaluate(tiny_config(**{"train.num_epochs": 3, "model.dtype": "bfloat16"}), str(tmp_path))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    first_epoch_end = events.index(("epoch", 1))
    assert ("epoch", 3) in events
    assert events[first_epoch_end:].count(lowering) == 0, [e for e in events[first_epoch_end:] if e != "log"]
    epochs = [r for r in _records(str(tmp_path)) if "test_accuracy" in r]
    assert len(epochs) == 3 and epochs[-1]["train_loss"] < 0.9 * epochs[0]["train_loss"]


def test_compilation_cache_folder_env_wins_and_empty_turns_it_off(tmp_path, monkeypatch):
    from jaxsam import parallel

    previous = jax.config.jax_compilation_cache_dir
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/somewhere/else")
    assert parallel.use_compilation_cache(str(tmp_path / "mine")) == "/somewhere/else"
    assert not (tmp_path / "mine").exists()
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    assert parallel.use_compilation_cache("") is None
    try:
        assert parallel.use_compilation_cache(str(tmp_path / "mine")) == str(tmp_path / "mine")
        assert (tmp_path / "mine").is_dir() and jax.config.jax_compilation_cache_dir == str(tmp_path / "mine")
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)


def _inject_nan_at(monkeypatch, bad_step, steps_per_epoch=4):
    """Makes training step `bad_step` (1-based) have a NaN loss: its batch gets all-zero labels, and the
    training loss is NaN for a batch whose labels are all zero (a random batch of 32 never is)."""
    import jaxsam.train as train_lib
    from jaxsam import data

    original_batches, original_ce = data.train_batches, train_lib.cross_entropy

    def batches(split, batch_size, *, seed, epoch, start_step=0):
        for i, (images, labels) in enumerate(original_batches(split, batch_size, seed=seed, epoch=epoch,
                                                              start_step=start_step), start=start_step):  # fmt: skip
            if epoch * steps_per_epoch + i + 1 == bad_step:
                labels = np.zeros_like(labels)
            yield images, labels

    def cross_entropy(logits, labels, label_smoothing=0.0):
        loss = original_ce(logits, labels, label_smoothing)
        return jax.numpy.where(jax.numpy.all(labels == 0), jax.numpy.nan, loss)

    monkeypatch.setattr(data, "train_batches", batches)
    monkeypatch.setattr(train_lib, "cross_entropy", cross_entropy)


def test_a_nan_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from jaxsam.train import TrainingDiverged

    _inject_nan_at(monkeypatch, bad_step=6)  # epoch 2's second step; epoch 1 was saved at step 4
    workdir = str(tmp_path / "run")
    config = tiny_config(**{"sam.name": "sam"})
    with pytest.raises(TrainingDiverged) as err:
        train_and_evaluate(config, workdir)
    message = str(err.value)
    assert message == (
        "training diverged at step 6: the loss or gradient became NaN/Inf; lower optimizer.learning_rate (now 0.05) "
        f"or sam.rho (now 0.05), or set --config.train.nan_policy=skip to skip such steps; the last good checkpoint "
        f"(step 4) is kept in {workdir}"
    )
    step, params = _final_params(workdir, config)
    assert step == 4 and all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))
    assert [r["epoch"] for r in _records(workdir) if "test_accuracy" in r] == [1]


def test_nan_policy_skip_leaves_the_state_and_counts_the_step(tmp_path, monkeypatch):
    _inject_nan_at(monkeypatch, bad_step=3)
    workdir = str(tmp_path / "run")
    config = tiny_config(**{"train.nan_policy": "skip", "train.log_every_steps": 1})
    record = train_and_evaluate(config, workdir)
    epochs = [r for r in _records(workdir) if "test_accuracy" in r]
    assert [r["train_skipped_steps"] for r in epochs] == [1, 0]
    logged = {r["step"]: r["train_skipped_steps"] for r in _records(workdir) if "test_accuracy" not in r}
    assert logged == {1: 0, 2: 0, 3: 1, 4: 0, 5: 0, 6: 0, 7: 0, 8: 0}
    assert record["step"] == 8 and np.isfinite(record["train_loss"])
    # The loss and accuracy of epoch 1 average its 3 good steps only.
    assert np.isfinite(epochs[0]["train_loss"]) and np.isfinite(epochs[0]["train_grad_norm"])


def test_an_unwritable_workdir_is_one_line_and_touches_nothing(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("kept")
    workdir = str(blocker / "run")
    with pytest.raises(ValueError) as err:
        train_and_evaluate(tiny_config(), workdir)
    assert str(err.value) == f"cannot write to workdir {workdir} (Not a directory): choose a writable --workdir"
    assert blocker.read_text() == "kept"


@pytest.mark.xdist_group("sam_run")
def test_checkpoints_of_another_network_are_refused(sam_run, tmp_path):
    from jaxsam.run import load_run

    config, workdir, _ = sam_run
    copy = str(tmp_path / "copy")
    shutil.copytree(workdir, copy)
    before = sorted(os.listdir(os.path.join(copy, "checkpoints")))
    wider = tiny_config(**{"sam.name": "sam", "train.num_epochs": 4, "model.width": 0.125})
    with pytest.raises(ValueError, match=r"holds checkpoints of another network \(model.width differ\): "
                                         r"--allow_config_change cannot change the network; use a new --workdir$"):
        train_and_evaluate(wider, copy, allow_config_change=True)
    # A config.json that no longer matches its checkpoints (edited, or copied over): one line, not orbax's dump.
    with open(os.path.join(copy, "config.json")) as f:
        saved = json.load(f)
    saved["model"]["width"] = 0.125
    with open(os.path.join(copy, "config.json"), "w") as f:
        json.dump(saved, f)
    with pytest.raises(ValueError, match=r"^checkpoint 16 in .*copy/checkpoints does not fit this network and "
                                         r"optimizer \(.*\): it was written by another model or config; use a new --workdir$"):
        load_run(copy)
    assert sorted(os.listdir(os.path.join(copy, "checkpoints"))) == before


def _last_logged_step(workdir):
    """The highest step in metrics.jsonl (a line being written is skipped)."""
    last = 0
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            for line in f:
                try:
                    last = max(last, json.loads(line)["step"])
                except (ValueError, KeyError):
                    pass
    except FileNotFoundError:
        pass
    return last


def _start_driver(workdir, *args):
    """tests/crash_driver.py training `workdir` in a subprocess; its output goes to <workdir>.log."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    command = [sys.executable, os.path.join(ROOT, "tests", "crash_driver.py"), workdir, *args]
    with open(workdir + ".log", "a") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def _tail(workdir):
    with open(workdir + ".log") as f:
        return f.read()[-2000:]


def _kill_once_past(process, workdir, step, timeout=600):
    """SIGKILLs `process` as soon as metrics.jsonl shows `step` done (asserts it was still running)."""
    import signal
    import time

    deadline = time.time() + timeout
    while _last_logged_step(workdir) < step:
        assert process.poll() is None, f"the run ended before step {step}: {_tail(workdir)}"
        assert time.time() < deadline, f"step {step} not reached in {timeout} s"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()


@pytest.mark.slow
@pytest.mark.xdist_group("sam_run")
def test_killed_three_times_including_mid_save_resumes_to_bit_identical_parameters(sam_run, tmp_path):
    """SIGKILL at two random steps and once while a checkpoint is committed; each rerun resumes."""
    config, reference, _ = sam_run
    workdir = str(tmp_path / "crashed")
    os.makedirs(workdir)
    config = tiny_config(**{"sam.name": "sam", "train.num_epochs": 4, "train.log_every_steps": 1})
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort())
    rng = np.random.default_rng(2026)
    checkpoints = os.path.join(workdir, "checkpoints")
    # 1. A random moment in the first two epochs (4 steps each; a checkpoint at each epoch's end).
    _kill_once_past(_start_driver(workdir), workdir, int(rng.integers(2, 8)))
    # 2. While checkpoint 12 is being committed: its arrays are written, the folder not yet renamed.
    died = _start_driver(workdir, "12")
    assert died.wait(timeout=600) == -9, _tail(workdir)
    assert "12.orbax-checkpoint-tmp" in os.listdir(checkpoints)
    listing = Checkpoints(checkpoints)
    assert listing.all_steps()[-1] == 8  # the half-committed save is not taken as the latest
    listing.close()
    # 3. A random step of the last epoch (checkpoint 12 may still be being written in the background).
    _kill_once_past(_start_driver(workdir), workdir, int(rng.integers(13, 16)))
    finished = _start_driver(workdir)
    assert finished.wait(timeout=600) == 0, _tail(workdir)
    step_a, uninterrupted = _final_params(reference, config)
    step_b, resumed = _final_params(workdir, config)
    assert step_a == step_b == 16
    chex.assert_trees_all_equal(uninterrupted, resumed)  # bit-identical after three kills
    assert [r["epoch"] for r in _records(workdir) if r.get("epoch_done")] == [1, 2, 3, 4]
    assert [r["step"] for r in _records(workdir) if not r.get("epoch_done")] == list(range(1, 17))
    assert sorted(os.listdir(checkpoints)) == ["12", "16", "8"]


@pytest.mark.xdist_group("sam_run")
# orbax abandons the other reads of a damaged checkpoint on a closed event loop; none of that reaches the output.
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_a_corrupt_latest_checkpoint_is_reported_moved_aside_and_the_previous_one_used(sam_run, tmp_path, capfd):
    config, reference, _ = sam_run
    copy = str(tmp_path / "copy")
    shutil.copytree(reference, copy)
    checkpoints = os.path.join(copy, "checkpoints")

    def truncate_arrays(step):
        folder = os.path.join(checkpoints, str(step), "default", "d")
        for name in os.listdir(folder):
            with open(os.path.join(folder, name), "r+b") as f:
                f.truncate(os.path.getsize(os.path.join(folder, name)) // 2)

    truncate_arrays(16)
    record = train_and_evaluate(config, copy)  # resumes at 12 and trains the last epoch again
    assert record["step"] == 16
    warnings = [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1
    assert re.fullmatch(rf"warning: checkpoint 16 in {re.escape(checkpoints)} is unreadable \(.+\): "
                        rf"moved to {re.escape(checkpoints)}.corrupt/16; resuming from checkpoint 12", warnings[0])  # fmt: skip
    assert os.path.isdir(os.path.join(copy, "checkpoints.corrupt", "16", "default"))  # kept, not deleted
    chex.assert_trees_all_equal(_final_params(reference, config)[1], _final_params(copy, config)[1])
    assert [r["epoch"] for r in _records(copy) if r.get("epoch_done")] == [1, 2, 3, 4]
    # Every checkpoint unreadable: one line, nothing moved.
    for step in (8, 12, 16):
        truncate_arrays(step)
    with pytest.raises(ValueError, match=rf"^no checkpoint in {re.escape(checkpoints)} can be read \(the latest: "
                                         r"checkpoint 16 .* is unreadable .*\): move the folder aside to start the run "
                                         r"over, or use a new --workdir$"):  # fmt: skip
        train_and_evaluate(config, copy)
    assert sorted(os.listdir(checkpoints)) == ["12", "16", "8"]


@pytest.mark.xdist_group("sam_run")
def test_the_same_config_and_seed_train_bit_identically_on_cpu(sam_run, tmp_path):
    config, reference, _ = sam_run
    again = str(tmp_path / "again")
    train_and_evaluate(config, again)
    chex.assert_trees_all_equal(_final_params(reference, config)[1], _final_params(again, config)[1])
    timing = ("images_per_sec", "train_images_per_sec", "epoch_seconds")
    strip = lambda records: [{k: v for k, v in r.items() if k not in timing} for r in records]  # noqa: E731
    assert strip(_records(again)) == strip(_records(reference))  # every logged loss, accuracy, norm
