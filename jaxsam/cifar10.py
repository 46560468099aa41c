"""The official CIFAR-10 binary archive, read into host memory.

The binary version (Krizhevsky 2009, "Learning Multiple Layers of Features
from Tiny Images"; https://www.cs.toronto.edu/~kriz/cifar.html) is five
training batch files and one test file of 10,000 records each, a record being
one label byte then the 1,024 red, 1,024 green and 1,024 blue bytes of a
row-major 32x32 image. `read_cifar10_archive` reads them straight from
``cifar-10-binary.tar.gz`` (tarfile + numpy, nothing extracted) or from the
extracted ``cifar-10-batches-bin/`` folder into two `Split`s; every defect of
the file (truncated, corrupt, the pickled python version, wrong labels) is one
`DataError` line naming the fix. `jaxsam.data` builds the run's `Dataset` on
it and re-exports these names.

    train, test = read_cifar10_archive("cifar-10-binary.tar.gz")
    train.images.shape, train.labels.shape   # (50000, 32, 32, 3), (50000,)
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import tarfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Union

import numpy as np

from jaxsam.download import ARCHIVE_ENV_VAR as ENV_VAR
from jaxsam.download import DataError, _one_line

NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)

# The binary version's layout: each record is 1 label byte then the 1,024 red,
# 1,024 green and 1,024 blue bytes of a row-major 32x32 image.
RECORD_BYTES = 1 + 32 * 32 * 3
RECORDS_PER_FILE = 10_000  # checked strictly; tests lower it to write tiny archives
BIN_FOLDER = "cifar-10-batches-bin"
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILE = "test_batch.bin"

PathLike = Union[str, os.PathLike]

_BINARY_HINT = "download the binary version cifar-10-binary.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html"
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
