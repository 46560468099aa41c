"""CIFAR-10 in host memory, batching, and augmentation on device.

The data set (Krizhevsky 2009, "Learning Multiple Layers of Features from Tiny
Images"; https://www.cs.toronto.edu/~kriz/cifar.html) is small enough to hold
whole: 60,000 images of 32x32x3 uint8 are 180 MB. It is loaded once into a
`Dataset` of uint8 NHWC numpy arrays on the host, from one of

* ``archive``: the official *binary* version, ``cifar-10-binary.tar.gz``, read
  straight from the tar.gz with `tarfile` and numpy (nothing is extracted to
  disk), or its extracted ``cifar-10-batches-bin/`` folder. The python version
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
import gzip
import importlib.util
import os
import socket
import sys
import tarfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Optional, Union

import numpy as np

from jaxsam import download
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
NUM_CLASSES = len(CIFAR10_CLASSES)
IMAGE_SHAPE = (32, 32, 3)

# The binary version's layout: each record is 1 label byte then the 1,024 red,
# 1,024 green and 1,024 blue bytes of a row-major 32x32 image.
RECORD_BYTES = 1 + 32 * 32 * 3
RECORDS_PER_FILE = 10_000  # checked strictly; tests lower it to write tiny archives
BIN_FOLDER = "cifar-10-batches-bin"
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILE = "test_batch.bin"
ENV_VAR = download.ARCHIVE_ENV_VAR
SOURCES = ("archive", "auto", "synthetic", "tfds", "download")

# Where TFDS downloads cifar10 from; probed before a download so that offline
# use fails in seconds instead of after minutes of retries.
TFDS_DOWNLOAD_HOST = ("www.cs.toronto.edu", 443)
REACHABILITY_TIMEOUT_S = 3.0

PathLike = Union[str, os.PathLike]

_BINARY_HINT = "download the binary version cifar-10-binary.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html"
_ARCHIVE_HINT = (
    "use --config.data.source=archive --config.data.path=/path/to/cifar-10-binary.tar.gz "
    f"(or set {ENV_VAR})"
)
_GZIP_MAGIC = b"\x1f\x8b"


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of an image classification set, on the host.

    Attributes:
      images: uint8 (N, 32, 32, 3), NHWC.
      labels: int32 (N,).
    """

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        images, labels = self.images, self.labels
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
            raise DataError(f"Split.images must be uint8 (N, 32, 32, 3), got {images.dtype} {images.shape}")
        if labels.dtype != np.int32 or labels.shape != (images.shape[0],):
            raise DataError(f"Split.labels must be int32 ({images.shape[0]},), got {labels.dtype} {labels.shape}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, indices: np.ndarray) -> "Split":
        """The examples at `indices`, in that order (a copy)."""
        return Split(self.images[indices], self.labels[indices])


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
# The binary archive.


def _pickle_version_error(path: Path) -> DataError:
    return DataError(
        f"{path} is the CIFAR-10 python version, which is not read because it holds pickles "
        f"(unpickling a downloaded file runs arbitrary code): {_BINARY_HINT} and pass its path"
    )


def _check_size(size: int, where: str) -> None:
    """Raises unless a batch file holds exactly RECORDS_PER_FILE records."""
    expected = RECORDS_PER_FILE * RECORD_BYTES
    if size == expected:
        return
    shape = (
        "a whole number of records"
        if size and size % RECORD_BYTES == 0
        else f"not a whole number of {RECORD_BYTES:,}-byte records"
    )
    raise DataError(
        f"{where} has {size:,} bytes ({shape}), expected {expected:,} "
        f"({RECORDS_PER_FILE:,} records of {RECORD_BYTES:,} bytes): the file is truncated or not "
        f"the CIFAR-10 binary version; re-download cifar-10-binary.tar.gz"
    )


# Where each batch file's records go: (images, labels) views into the output arrays.
_Slots = dict[str, tuple[np.ndarray, np.ndarray]]


def _decode_into(raw: bytes, where: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Records (label byte + CHW pixels) -> NHWC `images` and `labels`, in place."""
    _check_size(len(raw), where)
    records = np.frombuffer(raw, np.uint8).reshape(-1, RECORD_BYTES)
    labels[:] = records[:, 0]
    if labels.max(initial=0) >= NUM_CLASSES:
        raise DataError(
            f"{where} has label {int(labels.max())}, expected 0..{NUM_CLASSES - 1}: "
            f"not the CIFAR-10 binary version (CIFAR-100's has two label bytes); {_BINARY_HINT}"
        )
    # One channel plane at a time: several times faster than a 4-D transpose copy.
    pixels = images.reshape(len(records), 32 * 32, 3)
    for c in range(3):
        pixels[:, :, c] = records[:, 1 + 1024 * c : 1 + 1024 * (c + 1)]


def _missing_error(path: Path, missing: list[str], kind: str) -> DataError:
    return DataError(
        f"{kind} {path} has no {BIN_FOLDER}/{missing[0]} (missing: {', '.join(missing)}); expected "
        f"data_batch_1..5.bin and {TEST_FILE} of the CIFAR-10 binary version: re-download cifar-10-binary.tar.gz"
    )


def _read_tar(path: Path, slots: _Slots) -> None:
    """Fills `slots` from the batch files of a (gzipped) tar, in one streaming pass."""
    wanted = set(slots)
    found: set[str] = set()
    try:
        handle = open(path, "rb")
    except OSError as err:
        raise DataError(f"cannot open {path}: {_one_line(err)}") from None
    with handle:
        magic = handle.read(2)
        handle.seek(0)
        try:
            # GzipFile checks the CRC-32 and length at the end of the stream;
            # tarfile's own gunzip does not, and a corrupt stored (incompressible)
            # block would otherwise decompress into wrong pixels silently.
            stream = gzip.GzipFile(fileobj=handle, mode="rb") if magic == _GZIP_MAGIC else handle
            # Stream mode: one sequential pass. Random access (`r:gz` +
            # getmember) would rewind and re-decompress for every member.
            with tarfile.open(fileobj=stream, mode="r|", bufsize=1 << 20) as tar:
                for member in tar:
                    parts = PurePosixPath(member.name).parts
                    if "cifar-10-batches-py" in parts:
                        raise _pickle_version_error(path)
                    name = parts[-1] if parts else ""
                    if not member.isfile() or name not in wanted or name in found:
                        continue
                    where = f"{path} member {member.name}"
                    _check_size(member.size, where)
                    _decode_into(tar.extractfile(member).read(), where, *slots[name])
                    found.add(name)
            while stream.read(1 << 20):  # to the gzip trailer, so its checksum is verified
                pass
        except (tarfile.TarError, zlib.error, EOFError, OSError) as err:
            if magic == _GZIP_MAGIC:
                raise DataError(
                    f"{path} is a corrupt or incomplete gzip file ({_one_line(err)}): "
                    f"re-download cifar-10-binary.tar.gz"
                ) from None
            raise DataError(
                f"{path} is not a .tar.gz archive ({_one_line(err)}): expected cifar-10-binary.tar.gz "
                f"or its extracted {BIN_FOLDER}/ folder"
            ) from None
    missing = [n for n in TRAIN_FILES + (TEST_FILE,) if n not in found]
    if missing:
        raise _missing_error(path, missing, "archive")


def _read_folder(path: Path, slots: _Slots) -> None:
    """Fills `slots` from an extracted `cifar-10-batches-bin/` (or a folder holding it)."""
    names = TRAIN_FILES + (TEST_FILE,)
    folder = path / BIN_FOLDER if (path / BIN_FOLDER).is_dir() else path
    present = [n for n in names if (folder / n).is_file()]
    if not present:
        python_version = "cifar-10-batches-py"
        if path.name == python_version or (path / python_version).is_dir() or (path / "data_batch_1").is_file():
            raise _pickle_version_error(path)
        raise DataError(
            f"folder {path} holds no CIFAR-10 binary files: expected {BIN_FOLDER}/ or data_batch_1..5.bin and "
            f"{TEST_FILE} in it (the extracted cifar-10-binary.tar.gz), or pass the .tar.gz itself"
        )
    missing = [n for n in names if n not in present]
    if missing:
        raise _missing_error(folder, missing, "folder")
    for name in names:
        file = folder / name
        _check_size(file.stat().st_size, str(file))
        _decode_into(file.read_bytes(), str(file), *slots[name])


def read_cifar10_archive(path: PathLike) -> tuple[Split, Split]:
    """(train, test) from the official CIFAR-10 binary version.

    Reads `cifar-10-binary.tar.gz` directly (tarfile + numpy, nothing extracted
    to disk), or its extracted `cifar-10-batches-bin/` folder, or a folder that
    contains `cifar-10-batches-bin/`. Each of data_batch_1..5.bin and
    test_batch.bin holds `RECORDS_PER_FILE` records of 3,073 bytes: a label
    byte, then the image as 1,024 red, 1,024 green and 1,024 blue bytes.

    Args:
      path: the .tar.gz file or a folder as above.

    Returns:
      (train, test): 50,000 and 10,000 examples, images uint8 NHWC, in file order.

    Raises:
      DataError: missing path, the python (pickle) version, a missing batch
        file, a file of the wrong size, a corrupt gzip; the message is one line.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(
            f"{path} does not exist: expected cifar-10-binary.tar.gz or its extracted {BIN_FOLDER}/ folder "
            f"(pass --config.data.path=/path/to/cifar-10-binary.tar.gz or set {ENV_VAR})"
        )
    if path.name.startswith("cifar-10-python"):
        # Refuse by name before reading a byte; the readers also refuse by content.
        raise _pickle_version_error(path)
    # Decode each file straight into its place in the output: no concatenation,
    # and at most one raw file in memory besides the result.
    n = RECORDS_PER_FILE
    train_images, test_images = (np.empty((k * n, *IMAGE_SHAPE), np.uint8) for k in (len(TRAIN_FILES), 1))
    train_labels, test_labels = (np.empty(k * n, np.int32) for k in (len(TRAIN_FILES), 1))
    slots = {
        name: (train_images[i * n : (i + 1) * n], train_labels[i * n : (i + 1) * n])
        for i, name in enumerate(TRAIN_FILES)
    }
    slots[TEST_FILE] = (test_images, test_labels)
    if path.is_dir():
        _read_folder(path, slots)
    else:
        _read_tar(path, slots)
    return Split(train_images, train_labels), Split(test_images, test_labels)


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

    sizes = (
        f"train {_size(len(train), available)}, validation {_size(n_validation)}, "
        f"test {_size(len(test), len(test_pool))}"
    )
    return Dataset(
        train=train, test=test, validation=validation, num_classes=NUM_CLASSES, description=f"{origin} ({sizes})",
        source=source, path=used,
    )
