"""CIFAR-10 in host memory, batching, and augmentation on device.

The data set (Krizhevsky 2009, "Learning Multiple Layers of Features from Tiny
Images"; https://www.cs.toronto.edu/~kriz/cifar.html) is small enough to hold
whole: 60,000 images of 32x32x3 uint8 are 180 MB. It is loaded once into a
`Dataset` of uint8 NHWC numpy arrays on the host, from one of

* ``archive``: the official *binary* version, ``cifar-10-binary.tar.gz``, read
  straight from the tar.gz with `tarfile` and numpy (nothing is extracted to
  disk), or its extracted ``cifar-10-batches-bin/`` folder (`jaxsam.cifar10`). The python version
  (``cifar-10-python.tar.gz``) is refused: it holds pickles, and unpickling a
  downloaded file runs whatever code it carries.
* ``download``: that archive downloaded once (checksummed) into a cache folder,
  ``~/.cache/jaxsam`` or ``$JAXSAM_CACHE`` (`jaxsam.download`).
* ``tfds``: TensorFlow Datasets' ``cifar10`` (needs TensorFlow and, the first
  time, the network).
* ``synthetic``: random CIFAR-shaped images whose class shifts their colour,
  for smoke runs that must show the loss falling without real data.

``auto`` takes the first that works of: the archive at the given path or
``$JAXSAM_CIFAR10``, the cached download, a new download, TFDS (when
TensorFlow is installed).

Batching (deterministic in (seed, epoch, step), so a resumed run sees the
batches an uninterrupted one sees) and the standard CIFAR augmentation on
device are in `jaxsam.pipeline`, and importable from here:

    data = load_dataset("archive", path="cifar-10-binary.tar.gz", n_validation=5000)
    for images, labels in train_batches(data.train, 128, seed=0, epoch=epoch): ...
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import socket
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from jaxsam import download
# The binary archive's layout and reader live in jaxsam.cifar10; they are part of this module's API.
from jaxsam.cifar10 import (  # noqa: F401
    BIN_FOLDER,
    IMAGE_SHAPE,
    NUM_CLASSES,
    RECORD_BYTES,
    RECORDS_PER_FILE,
    TEST_FILE,
    TRAIN_FILES,
    PathLike,
    Split,
    read_cifar10_archive,
)
from jaxsam.download import DataError, _one_line
# Batching and augmentation live in jaxsam.pipeline; they are part of this module's API.
from jaxsam.pipeline import (  # noqa: F401
    CIFAR10_MEAN,
    CIFAR10_STD,
    PAD,
    augment,
    crop_and_flip,
    epoch_permutation,
    eval_batches,
    normalize,
    steps_per_epoch,
    train_batches,
)

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR10_CLASSES",
    "DataError",
    "Split",
    "Dataset",
    "read_cifar10_archive",
    "load_dataset",
    "epoch_permutation",
    "steps_per_epoch",
    "train_batches",
    "eval_batches",
    "normalize",
    "crop_and_flip",
    "augment",
]

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

ENV_VAR = download.ARCHIVE_ENV_VAR
SOURCES = ("archive", "auto", "synthetic", "tfds", "download")

# Where TFDS downloads cifar10 from; probed before a download so that offline
# use fails in seconds instead of after minutes of retries.
TFDS_DOWNLOAD_HOST = ("www.cs.toronto.edu", 443)
REACHABILITY_TIMEOUT_S = 3.0


_ARCHIVE_HINT = (
    "use --config.data.source=archive --config.data.path=/path/to/cifar-10-binary.tar.gz "
    f"(or set {ENV_VAR})"
)




@dataclasses.dataclass(frozen=True)
class Dataset:
    """The splits a run uses and where they came from.

    Attributes:
      train: the training examples (after holding out `validation`).
      test: the test examples.
      validation: examples held out of the training split, or None.
      num_classes: number of labels.
      description: one line naming the source and the split sizes.
      source: the source actually read ('archive', 'download', 'tfds' or
        'synthetic'; 'auto' resolved), for the run's records.
      path: the archive or folder read (for 'download' the cached archive),
        the TFDS data dir if one was given, else None.
    """

    train: Split
    test: Split
    validation: Optional[Split]
    num_classes: int
    description: str
    source: str = ""
    path: Optional[str] = None


# ---------------------------------------------------------------------------
# TFDS and synthetic sources.


def _reachable(host: str, port: int, timeout: float = REACHABILITY_TIMEOUT_S) -> bool:
    """Whether a TCP connection to host:port opens within `timeout` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _tfds_prepared(data_dir: Optional[str]) -> tuple[bool, str]:
    """(whether TFDS cifar10 is already built in data_dir, that folder)."""
    import tensorflow_datasets as tfds

    builder = tfds.builder("cifar10", data_dir=data_dir)
    return bool(builder.is_prepared()), str(builder.data_dir)


def _tensorflow_importable() -> bool:
    """Whether `import tensorflow` can find a module (without importing it)."""
    try:
        return importlib.util.find_spec("tensorflow") is not None
    except (ImportError, ValueError):  # ValueError: a module in sys.modules without a spec
        return sys.modules.get("tensorflow") is not None


def _load_tfds(data_dir: Optional[str]) -> tuple[Split, Split]:
    """(train, test) of TFDS cifar10; every failure is a one-line DataError."""
    try:
        import tensorflow  # noqa: F401  (TFDS builds and reads its files with it)
    except Exception as err:  # ImportError, or a broken install failing otherwise
        raise DataError(
            f"source 'tfds' needs TensorFlow to build and read cifar10 (import tensorflow: {_one_line(err)}): "
            f"pip install tensorflow-cpu, or {_ARCHIVE_HINT}"
        ) from None
    try:
        prepared, where = _tfds_prepared(data_dir)
    except Exception as err:
        raise DataError(f"TFDS could not open cifar10 ({_one_line(err)}): {_ARCHIVE_HINT}") from None
    if not prepared and not _reachable(*TFDS_DOWNLOAD_HOST):
        host, port = TFDS_DOWNLOAD_HOST
        raise DataError(
            f"TFDS cifar10 is not prepared in {where} and its download host {host}:{port} is unreachable "
            f"(offline?): {_ARCHIVE_HINT}"
        )
    try:
        import tensorflow_datasets as tfds

        (train_x, train_y), (test_x, test_y) = tfds.as_numpy(
            tfds.load("cifar10", split=["train", "test"], as_supervised=True, batch_size=-1, data_dir=data_dir)
        )
    except Exception as err:
        raise DataError(f"TFDS failed to load cifar10 ({_one_line(err)}): {_ARCHIVE_HINT}") from None
    as_split = lambda x, y: Split(np.asarray(x, np.uint8), np.asarray(y, np.int32))
    return as_split(train_x, train_y), as_split(test_x, test_y)


# A fixed palette (the same for every seed, so train and test, and runs with
# different seeds, pose the same task): class c shifts all pixels by colour c.
_PALETTE = np.random.default_rng(20240229).integers(40, 216, size=(NUM_CLASSES, 3))
_SYNTHETIC_NOISE = 64  # uniform noise in [-64, 64] per pixel: a single pixel barely tells the class


def _synthetic(n_train: int, n_test: int, seed: int) -> tuple[Split, Split]:
    """Learnable random (train, test): uniform noise around a class colour, balanced labels."""
    rng = np.random.default_rng(seed)

    def make(n: int) -> Split:
        labels = rng.permutation(np.arange(n) % NUM_CLASSES).astype(np.int32)
        noise = rng.integers(-_SYNTHETIC_NOISE, _SYNTHETIC_NOISE + 1, size=(n, *IMAGE_SHAPE), dtype=np.int16)
        images = np.clip(_PALETTE[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
        return Split(images, labels)

    return make(n_train), make(n_test)


# ---------------------------------------------------------------------------
# load_dataset.


def _archive_path(path: Optional[PathLike]) -> Path:
    chosen = path if path else os.environ.get(ENV_VAR)
    if not chosen:
        raise DataError(
            "no CIFAR-10 archive given: pass --config.data.path=/path/to/cifar-10-binary.tar.gz "
            f"or set {ENV_VAR}=/path/to/cifar-10-binary.tar.gz"
        )
    return Path(chosen).expanduser()


def _count(n: Optional[int], name: str) -> int:
    """None -> 0; otherwise a non-negative int."""
    if n is None:
        return 0
    if isinstance(n, bool) or int(n) != n or n < 0:
        raise DataError(f"{name} must be an integer >= 0 (got {n!r})")
    return int(n)


def _size(n: int, total: Optional[int] = None) -> str:
    return f"{n:,}" if total is None or n == total else f"{n:,} of {total:,}"


def load_dataset(
    source: str,
    *,
    path: Optional[PathLike] = None,
    n_train: Optional[int] = None,
    n_validation: int = 0,
    n_test: Optional[int] = None,
    seed: int = 0,
    synthetic_size: tuple[int, int] = (512, 256),
    url: str = download.DEFAULT_URL,
    sha256: str = download.ARCHIVE_SHA256,
    progress: bool = True,
) -> Dataset:
    """CIFAR-10 (or a synthetic stand-in) with held-out validation and subsets.

    Subsets come from one seeded permutation of the training split: its first
    `n_validation` examples are the validation split, and the training split is
    the next `n_train` (all the rest by default). So for one seed the
    validation set does not depend on `n_train`, smaller training subsets are
    contained in larger ones, and validation and training never overlap. Both
    keep the file order of their examples.

    Args:
      source: 'archive' (the binary version at `path`, else $JAXSAM_CIFAR10),
        'download' (the binary version cached in $JAXSAM_CACHE or
        ~/.cache/jaxsam, downloaded from `url` if absent), 'tfds' (TensorFlow
        Datasets' cifar10; `path`, if given, is the TFDS data dir),
        'synthetic', or 'auto' ('archive' if `path` or $JAXSAM_CIFAR10 is
        set, else 'download', else 'tfds' if TensorFlow is installed).
      path: see `source`.
      n_train: training examples to keep; None or 0 keeps all that remain
        after the validation split.
      n_validation: training examples to hold out as the validation split.
      n_test: the first `n_test` test examples; None keeps all.
      seed: seeds the subset permutation (and the synthetic images).
      synthetic_size: (training pool, test) sizes of the synthetic source.
      url: where 'download' fetches the archive from.
      sha256: the SHA-256 a download must have (the official file's by default).
      progress: show a progress bar while downloading.

    Returns:
      A `Dataset` whose `validation` is None when `n_validation` is 0.

    Raises:
      DataError: unknown source, missing or bad data, or more examples asked
        for than exist; the message is one line that names the fix.

    Example:
      >>> data = load_dataset("synthetic", synthetic_size=(100, 20), n_validation=10)
      >>> len(data.train), len(data.validation), len(data.test)
      (90, 10, 20)
    """
    if source not in SOURCES:
        raise DataError(f"unknown data source {source!r}: expected one of {', '.join(repr(s) for s in SOURCES)}")
    n_train_asked = _count(n_train, "n_train")
    n_validation = _count(n_validation, "n_validation")
    if isinstance(seed, bool) or int(seed) != seed or seed < 0:
        raise DataError(f"seed must be an integer >= 0 (got {seed!r})")
    archive, failed_download = None, None
    if source == "download" and path:
        raise DataError(
            f"source 'download' reads the archive cached in {download.cache_dir()}, not data.path {path}: "
            f"use --config.data.source=archive to read {path}"
        )
    if source == "auto" and (path or os.environ.get(ENV_VAR)):
        source = "archive"
    elif source in ("auto", "download"):
        try:
            archive, source = download.cached_or_download(url, sha256, progress=progress), "download"
        except DataError as err:
            if source == "download" or not _tensorflow_importable():
                raise
            source, failed_download = "tfds", err

    used = None  # the file or folder read
    if source == "archive":
        archive = _archive_path(path)
        train_pool, test_pool = read_cifar10_archive(archive)
        origin, used = f"CIFAR-10 from {'folder' if archive.is_dir() else 'archive'} {archive}", str(archive)
    elif source == "download":
        try:
            train_pool, test_pool = read_cifar10_archive(archive)
        except DataError as err:
            raise DataError(f"{err} (this is the cached download: delete {archive} to download it again)") from None
        origin, used = f"CIFAR-10 from archive {archive} (the download cache)", str(archive)
    elif source == "tfds":
        used = os.fspath(Path(path).expanduser()) if path else None
        try:
            train_pool, test_pool = _load_tfds(used)
        except DataError as err:
            if failed_download is None:
                raise
            raise DataError(f"{failed_download} (TFDS, tried next, failed too: {err})") from None
        origin = "CIFAR-10 from TFDS cifar10" + (f" in {used}" if used else "")
    else:
        pool_size, test_size = (_count(n, "synthetic_size") for n in synthetic_size)
        train_pool, test_pool = _synthetic(pool_size, test_size, int(seed))
        origin = f"synthetic CIFAR-10-shaped data (seed {seed})"

    available = len(train_pool)
    if n_validation + n_train_asked > available:
        raise DataError(
            f"asked for n_validation={n_validation:,} + n_train={n_train_asked:,} training examples, but "
            f"the training split has {available:,}: lower them"
        )
    if n_validation == 0 and n_train_asked in (0, available):
        train, validation = train_pool, None  # no copy of the whole split
    else:
        order = np.random.default_rng(int(seed)).permutation(available)
        kept = order[n_validation:] if n_train_asked == 0 else order[n_validation : n_validation + n_train_asked]
        train = train_pool.take(np.sort(kept))
        validation = train_pool.take(np.sort(order[:n_validation])) if n_validation else None

    test = test_pool
    if n_test is not None:
        n_test = _count(n_test, "n_test")
        if n_test > len(test_pool):
            raise DataError(f"asked for n_test={n_test:,}, but the test split has {len(test_pool):,}: lower it")
        test = Split(test_pool.images[:n_test], test_pool.labels[:n_test])

    train_size = f"{len(train):,} (all: n_train=0)" if n_train_asked == 0 else _size(len(train), available)
    sizes = (
        f"train {train_size}, validation {_size(n_validation)}, "
        f"test {_size(len(test), len(test_pool))}"
    )
    return Dataset(
        train=train, test=test, validation=validation, num_classes=NUM_CLASSES, description=f"{origin} ({sizes})",
        source=source, path=used,
    )
