"""A trained run, loaded from its folder: `load_run(workdir)` gives the config, network and state.

The data is read only when `Run.dataset` is first used (the file the run's
data.json names), so loading the weights of a run for a measure, a plot or
another experiment costs a checkpoint restore, not a pass over CIFAR-10.

    run = load_run("runs/sgd_sam_cpu")
    run.model.apply({"params": run.state.params, "batch_stats": run.state.batch_stats}, x, train=False)
    run.dataset.test           # read now
"""

from __future__ import annotations

import os

import jax
import ml_collections

from jaxsam import data as data_lib
from jaxsam import workdir as workdir_lib
from jaxsam.checkpoint import Checkpoints
from jaxsam.models import get_model
from jaxsam.train import create_train_state, learning_rate_schedule, make_optimizer
from jaxsam.workdir import load_data, read_config

class Run:
    """A trained run loaded from its workdir (`load_run`): config, network, state; data on first use.

    Attributes:
      config: the run's config (config.json, fields it predates at their defaults).
      model: the Flax network.
      steps_per_epoch: training steps per epoch.
      state: the checkpointed `TrainState`.
      initial_state: the run's state at step 0 (same seed), for init -> final interpolation.
      workdir: the run folder.
      dataset: the run's data, read when first asked for (the file data.json names).
    """

    def __init__(self, config, model, steps_per_epoch, state, initial_state, workdir, dataset=None):
        self.config, self.model, self.steps_per_epoch = config, model, steps_per_epoch
        self.state, self.initial_state, self.workdir = state, initial_state, workdir
        self._dataset = dataset

    @property
    def dataset(self) -> data_lib.Dataset:
        if self._dataset is None:
            self._dataset = load_data(self.config, self.workdir)
        return self._dataset

    def learning_rate(self) -> float:
        """The learning rate of the run's last step (what its final update used)."""
        return float(learning_rate_schedule(self.config, self.steps_per_epoch)(max(int(self.state.step) - 1, 0)))


def _train_size(config: ml_collections.ConfigDict, workdir: str) -> tuple[int, int]:
    """(training examples, classes) of a run, from data.json, or from its config for a run that predates it."""
    used = workdir_lib.data_used(workdir)
    if "n_train" in used:
        return int(used["n_train"]), int(used["num_classes"])
    synthetic = (used.get("source") or config.data.source) == "synthetic"
    pool = config.data.synthetic_train if synthetic else len(data_lib.TRAIN_FILES) * data_lib.RECORDS_PER_FILE
    return config.data.n_train or pool - config.data.n_validation, data_lib.NUM_CLASSES


def load_run(workdir: str, *, step: int | None = None, data: data_lib.Dataset | None = None) -> Run:
    """Loads a run's config, network and checkpointed state (the latest, or `step`), without reading its data.

    Args:
      workdir: a folder made by `train_and_evaluate` (scripts/train.py).
      step: the checkpoint to load; None: the latest.
      data: the run's dataset if the caller has it already; otherwise `Run.dataset`
        reads it when first used (the file the run's data.json names).

    Returns:
      A `Run`.

    Raises:
      ValueError: no config.json, no checkpoint (at `step`), or one of another network.
    """
    config = read_config(workdir)
    n_train, num_classes = _train_size(config, workdir)
    model = get_model(config.model.name, num_classes, width=config.model.width, dtype=config.model.dtype,
                      conv=config.model.conv)
    steps_per_epoch = n_train // config.train.batch_size
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
    return Run(config, model, steps_per_epoch, state, initial, workdir, dataset=data)
