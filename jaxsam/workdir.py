"""A training run's folder and its small files: config.json, data.json, metrics.jsonl, TensorBoard events.

    <workdir>/
      config.json        the settings (`write_or_check_config`, `read_config`); older ones kept as config.<n>.json
      data.json          the data the run read: source, file, training-set size (`write_data_used`, `data_used`)
      metrics.jsonl      one JSON object per logged step and per epoch (`MetricsLog`): the record the report reads
      tensorboard/       the same metrics as TensorBoard event files, with train.tensorboard=true
      checkpoints/       orbax checkpoints (`jaxsam.checkpoint`)

Every write is whole or not at all (`jaxsam.files`): a full disk gives one
`WriteError` line and leaves the files written before as they were.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import ml_collections

from jaxsam import data, files
from jaxsam.config import base_config, changed_fields, flatten

# Fields that name the network: a changed one makes the checkpoints unusable.
NETWORK_FIELDS = ("model.name", "model.width")
# Fields that may change when a run is resumed (how it is shown and stopped, where its data is read from).
RESUMABLE_FIELDS = ("train.progress", "train.log_every_steps", "train.max_steps", "train.nan_policy",
                    "train.tensorboard", "data.path", "data.url", "data.sha256")  # fmt: skip
DATA_USED = "data.json"


def make_workdir(workdir: str) -> None:
    """Creates the run folder and checks that files can be written in it (one-line `WriteError` if not)."""
    files.check_writable(workdir, "workdir", "--workdir")


def write_or_check_config(
    config: ml_collections.ConfigDict, workdir: str, *, allow_change: bool = False, write: bool = True
) -> None:
    """Writes config.json, or checks that an existing one describes the same run.

    Args:
      config: the run's config.
      workdir: the run folder.
      allow_change: a differing config.json is kept as config.<n>.json and the
        new one written, so the history of the run's settings is not lost (the
        network itself may not change once checkpoints exist).
      write: False (every process but the first of a multi-process run) only checks.

    Raises:
      ValueError: the folder holds another run; the message names the fields and the fix.
    """
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = flatten(json.load(f))
        current = flatten(config)
        differs = changed_fields(saved, current, flatten(base_config(current.get("size"))), RESUMABLE_FIELDS)
        if not differs:
            return
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differs[:4])
        network = [k for k in differs if k in NETWORK_FIELDS]
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
        files.keep_aside(path)
    if write:
        files.write_atomic(path, config.to_json_best_effort(indent=2, sort_keys=True))


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run was made with (its config.json), fields it predates filled with their defaults."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"{workdir} has no config.json: pass the folder of a run made by scripts/train.py")
    with open(path) as f:
        saved = flatten(json.load(f))
    config = base_config(saved.get("size"))
    unknown = sorted(set(saved) - set(flatten(config)))
    if unknown:
        raise ValueError(f"{path} has fields this jaxsam does not know ({', '.join(unknown[:4])}): update jaxsam")
    config.update_from_flattened_dict(saved)
    return config


def write_data_used(workdir: str, dataset: Any) -> None:
    """data.json: the source and file a run's data came from (config.json keeps what was asked: source=auto)."""
    files.write_json(
        os.path.join(workdir, DATA_USED),
        {"source": dataset.source, "path": dataset.path, "n_train": len(dataset.train),
         "num_classes": dataset.num_classes},
        indent=None,
    )


def data_used(workdir: str) -> dict[str, Any]:
    """What data.json says ({} for a run made before it existed)."""
    path = os.path.join(workdir, DATA_USED)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


class MetricsLog:
    """metrics.jsonl (and, if asked, TensorBoard event files): one record per logged step or epoch.

    On resume the records past the checkpoint the run restarts from are
    dropped (those steps run again). A write that fails raises `WriteError`
    with one line; the records written before are kept.

    Example:
      >>> log = MetricsLog("/tmp/run/metrics.jsonl", resume_step=0)
      >>> log.write({"step": 20, "epoch": 1, "train_loss": 2.1})
      >>> log.close()
    """

    def __init__(self, path: str, resume_step: int, enabled: bool = True, tensorboard: Optional[str] = None):
        self.path = path if enabled else None  # disabled: every process but the first of a multi-process run
        self._writer = None
        if not enabled:
            return
        if os.path.exists(path):
            kept = [r for r in files.read_jsonl(path) if r.get("step", 0) <= resume_step]
            files.write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
        if tensorboard:
            self._writer = _tensorboard_writer(tensorboard, resume_step)

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        files.append_line(self.path, json.dumps(record))
        if self._writer is not None:
            step = int(record["step"])
            for name, value in record.items():
                if name not in ("step", "epoch") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    # Step records hold train_*; epoch records the epoch's train_*, test_* and validation_*.
                    tag = f"epoch/{name}" if "epoch_done" in record else f"step/{name}"
                    self._writer.add_scalar(tag, value, global_step=step)
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _tensorboard_writer(folder: str, resume_step: int):
    """A tensorboardX writer into `folder`; on resume TensorBoard drops the events past `resume_step`."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:  # validate.check_config refuses train.tensorboard without it, before anything is written
        raise ValueError("train.tensorboard=true needs tensorboardX: pip install tensorboardX") from None
    files.check_writable(folder, "TensorBoard folder", "--workdir")
    writer = SummaryWriter(logdir=folder, purge_step=resume_step + 1 if resume_step > 0 else None)
    return writer


def load_data(config: ml_collections.ConfigDict, workdir: str | None = None) -> data.Dataset:
    """The run's dataset; with `workdir`, a run whose config says source=auto reads the file its data.json names."""
    d = config.data
    path = d.path or None
    if d.source == "auto" and path is None and workdir and not os.environ.get(data.ENV_VAR):
        recorded = data_used(workdir)
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
