"""The experiment configuration: one `ml_collections.ConfigDict` per run.

`base_config(size)` holds every field with its default; the files in
`configs/` start from it and set the optimizer and SAM variant. Sizes:

* `full` (no argument): the paper-scale run, 200 epochs, batch 128, the whole
  CIFAR-10 training set, full-width networks.
* `cpu`: a real-data run that finishes on a 2-core CPU in about ten minutes:
  a width-1/8 network, 3 epochs of a 25,000-image training subset at batch
  64 with flip-only augmentation (Adam at lr 3e-3), the full test set.
  Measured on this project's 2-core machine (ResNet18, wall clock of
  `python scripts/train.py --config configs/<name>.py:cpu`): sgd 63.7% test
  accuracy in 6:22, sgd_sam 62.4% in 9:29, adam 61.8% in 5:46, adam_sam 63.9%
  in 10:05.
* `fit`: a run that fits its training subset on a 2-core CPU: a width-1/8
  network, 40 epochs of the first 5,000 training images at batch 128 with
  flip-only augmentation, the full test set. ResNet18 + SGD reached 99.98%
  train accuracy (eval mode, all 5,000 images) and 54.3% test accuracy in
  11:39 (`python scripts/train.py --config configs/sgd.py:fit`; the pilot
  runs are in configs/study.py's docstring). Crops slow the fitting and make
  the network capacity-bound at this width (a 10,000-image pilot with crops:
  67% train / 64% test after 16 epochs), so this size drops them to open a
  generalization gap of tens of points for the measures to explain.
* `smoke`: synthetic data, a tiny network, seconds of training (plus compilation).

Anchors for the defaults (stated where the run's config is printed):
SGD lr 0.1, momentum 0.9, weight decay 5e-4, cosine schedule, batch 128, 200
epochs: He et al. 2016 and the SAM paper's CIFAR ResNet baselines (Foret et al.
2021, appendix C). Adam lr 1e-3: Kingma & Ba 2015's default, the rate of the
original PyTorch study. SAM ρ = 0.05: Foret et al. 2021 (CIFAR-10). ASAM ρ = 0.5
(SGD), η = 0.01: Kwon et al. 2021. GSAM α = 0.1 (Zhuang et al. 2022); LookSAM
k = 5, α = 0.7 (Liu et al. 2022). F-SAM σ = 1, λ = 0.95 (Li et al. 2024, the
authors' code); VaSSO θ = 0.9 (Li & Giannakis 2023, the authors' code).
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Mapping

import ml_collections

SIZES = ("full", "fit", "cpu", "smoke")
ADAPTIVE_OPTIMIZERS = ("adam", "adamw")  # those with a second-moment preconditioner (preconditioned λmax)


# Per-size fields (the rest as for "full").
_SIZED = {
    # Three epochs are too few for the 200-epoch recipe: the network underfits
    # (train accuracy <= test accuracy), so this size takes more, smaller steps
    # and drops the random crop, which slows fitting; see use_adam for its rate.
    "cpu": {"model.width": 0.125, "data.n_train": 25000, "data.crop_padding": 0, "train.num_epochs": 3,
            "train.batch_size": 64, "train.checkpoint_every_epochs": 1, "train.log_every_steps": 20},
    "fit": {"model.width": 0.125, "data.n_train": 5000, "data.crop_padding": 0, "train.num_epochs": 40,
            "train.checkpoint_every_epochs": 10, "train.log_every_steps": 20},
    "smoke": {"model.width": 0.0625, "data.source": "synthetic", "train.num_epochs": 2, "train.batch_size": 32,
              "train.eval_batch_size": 64, "train.checkpoint_every_epochs": 1, "train.log_every_steps": 4},
}


def base_config(size: str | None = None) -> ml_collections.ConfigDict:
    """All fields with their defaults for one of SIZES (None means "full")."""
    size = size or "full"
    if size not in SIZES:
        raise ValueError(f"unknown config size {size!r}: use one of {', '.join(SIZES)} (e.g. configs/adam_sam.py:cpu)")
    c = ml_collections.ConfigDict()
    c.size = size
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.name = "resnet18"
    c.model.width = 1.0
    c.model.dtype = "float32"  # "bfloat16" computes in bf16 with float32 parameters (GPUs).
    # "auto": on the CPU backend, convolutions arranged for XLA:CPU (matrix products
    # on 2x2 maps and 1x1 kernels, batch chunks elsewhere; jaxsam/models/cpu_conv.py,
    # same numbers to float32 rounding); XLA's own convolution on GPU/TPU. "native": XLA's everywhere.
    c.model.conv = "auto"

    c.data = ml_collections.ConfigDict()
    c.data.source = "auto"  # archive (path or $JAXSAM_CIFAR10) | download (cached) | tfds | synthetic | auto (in that order)
    c.data.path = ""
    # Where source download (and auto without a path) fetches the binary archive, and the SHA-256 it
    # must have (the official file's); cached in ~/.cache/jaxsam ($JAXSAM_CACHE). Set both for a mirror.
    c.data.url = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
    c.data.sha256 = "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"
    c.data.n_train = 0  # 0: the whole training split (after the validation hold-out)
    c.data.n_validation = 0
    c.data.n_test = 0  # 0: the whole test split
    c.data.crop_padding = 4  # random-crop border in pixels (0: flip only)
    c.data.synthetic_train = 512
    c.data.synthetic_test = 256

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "sgd"  # sgd | adam | adamw
    c.optimizer.learning_rate = 0.1
    c.optimizer.schedule = "cosine"  # cosine | constant
    c.optimizer.warmup_epochs = 0.0
    c.optimizer.momentum = 0.9  # sgd
    c.optimizer.nesterov = False
    c.optimizer.b1 = 0.9  # adam, adamw
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    # sgd and adam: L2 added to the gradient (PyTorch's weight_decay); adamw: decoupled.
    c.optimizer.weight_decay = 5e-4

    c.sam = ml_collections.ConfigDict()
    c.sam.name = "none"  # none | sam | asam | gsam | looksam | fsam | vasso | msam
    c.sam.rho = 0.05
    c.sam.rho_min = 0.0  # gsam: rho follows the learning rate from rho down to rho_min
    c.sam.eta = 0.01  # asam
    # asam: the leaves scaled by |w| + eta (the others by 1): all | weights (not biases: Kwon et al.'s
    # code) | kernels; see README "ASAM's ball".
    c.sam.adaptive_leaves = "all"
    c.sam.alpha = 0.1  # gsam (0.1) / looksam (0.7)
    c.sam.k = 5  # looksam
    c.sam.sigma = 1.0  # fsam: share of the estimated full gradient removed from the perturbation
    c.sam.lmbda = 0.95  # fsam: decay of its gradient average (the authors' code default)
    c.sam.theta = 0.9  # vasso: weight of the new gradient in its average (the authors' default)
    # msam (Momentum-SAM) uses rho as its perturbation's norm: the authors use 3.0, not SAM's 0.05.
    c.sam.mask = "all"  # all | kernels (leave biases and BatchNorm unperturbed)
    # True: each device perturbs with its own gradient (m-sharpness, m = per-device
    # batch, as the SAM paper); False: one perturbation from the global gradient.
    c.sam.per_device = True

    c.train = ml_collections.ConfigDict()
    c.train.num_epochs = 200
    c.train.max_steps = 0  # > 0: stop after this many steps (checkpointed, resumable)
    c.train.batch_size = 128
    c.train.eval_batch_size = 500
    c.train.label_smoothing = 0.0
    # A step whose loss, gradient or update is NaN/Inf: "stop" ends the run with a
    # message naming the step (the last good checkpoint is kept); "skip" leaves the
    # parameters and optimizer state as they were and counts the step (train_skipped_steps).
    c.train.nan_policy = "stop"
    c.train.log_every_steps = 50
    c.train.checkpoint_every_epochs = 10
    c.train.keep_checkpoints = 3
    c.train.progress = True  # tqdm bar
    # Also write the step and epoch metrics as TensorBoard event files into <workdir>/tensorboard
    # (tensorboardX); metrics.jsonl stays the record the report reads.
    c.train.tensorboard = False

    # Geometry tracked during training (jaxsam.track), written into
    # metrics.jsonl after the epoch's evaluation. 0 = off.
    c.track = ml_collections.ConfigDict()
    c.track.every_epochs = 0
    c.track.measures = "lambda_max,worst_case"  # comma-separated: lambda_max, worst_case, average_case, first_order
    c.track.n_examples = 512  # the first n training examples (no augmentation), BatchNorm in eval mode
    c.track.batch_size = 256
    c.track.lanczos_iters = 10  # lambda_max: Lanczos steps (each one Hessian-vector product)
    c.track.rho = 0.05  # worst_case / first_order: L2 ball radius
    c.track.ascent_steps = 5  # worst_case: gradient-ascent steps
    c.track.sigma = 0.005  # average_case: Gaussian standard deviation per weight
    c.track.samples = 8  # average_case: loss evaluations, samples/2 antithetic pairs ±δ (even, >= 4)

    c.update_from_flattened_dict(_SIZED.get(size, {}))
    return c


def use_adam(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Adam with lr 1e-3 (the original study's rate), cosine schedule, L2 5e-4.

    The `cpu` and `fit` sizes use lr 3e-3: in the 3 short epochs of `cpu` lr
    1e-3 underfits (measured, batch 64, 25,000 images: 54.8% test accuracy at
    1e-3, 63.9% at 3e-3); `fit` keeps the `cpu` rate. The original study's
    lr 1e-3 is the study's `original_adam` arm.
    """
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 3e-3 if c.get("size") in ("cpu", "fit") else 1e-3
    return c


def use_sam(c: ml_collections.ConfigDict, rho: float = 0.05) -> ml_collections.ConfigDict:
    """SAM with ρ = 0.05 (Foret et al. 2021, CIFAR-10)."""
    c.sam.name = "sam"
    c.sam.rho = rho
    return c


def flatten(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
    """{"model.name": "resnet18", ...}: a config's leaves by dotted name, as JSON values."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Mapping[str, Any]) -> None:
        for key, value in node.items():
            if isinstance(value, Mapping):
                walk(f"{prefix}{key}.", value)
            else:
                out[f"{prefix}{key}"] = value

    tree = json.loads(config.to_json_best_effort()) if isinstance(config, ml_collections.ConfigDict) else config
    walk("", tree)
    return out


def changed_fields(
    old: Mapping[str, Any], new: Mapping[str, Any], defaults: Mapping[str, Any], ignore: Iterable[str] = ()
) -> list[str]:
    """The sorted dotted names whose values differ between two flattened configs.

    A field missing from `old` (a run or study made before the field existed)
    counts as its value in `defaults`, so older folders stay resumable; names
    in `ignore` (settings that may change between starts) are left out.

    Example:
      >>> changed_fields({"a": 1}, {"a": 1, "b": 2}, defaults={"b": 2})
      []
    """
    ignored = set(ignore)
    return sorted(k for k in set(old) | set(new) if k not in ignored and old.get(k, defaults.get(k)) != new.get(k))
