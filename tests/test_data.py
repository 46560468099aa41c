"""Data: the binary-archive reader against tiny archives written here (and the
real one when present), subsets, resumable batching, and exact augmentation."""

from __future__ import annotations

import io
import pathlib
import socket
import sys
import tarfile
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsam import cifar10, data
from jaxsam.data import DataError

REAL_ARCHIVE = pathlib.Path(__file__).resolve().parents[1].parent / "shared/data/cifar10/cifar-10-binary.tar.gz"
RECORDS = 20  # records per batch file in the fake archives


# ---------------------------------------------------------------------------
# Fake archives in the official binary layout.


def _encode(images: np.ndarray, labels: np.ndarray) -> bytes:
    """NHWC images and labels -> records of a label byte and the CHW planes (the inverse of the reader)."""
    chw = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    return np.concatenate([labels.astype(np.uint8)[:, None], chw], axis=1).tobytes()


def _fake_files(seed: int = 0) -> tuple[dict[str, bytes], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Batch files of RECORDS random records each, and the (train images, labels, test images, labels) they hold."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(6 * RECORDS, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=6 * RECORDS).astype(np.int32)
    names = list(data.TRAIN_FILES) + [data.TEST_FILE]
    files = {
        name: _encode(images[i * RECORDS : (i + 1) * RECORDS], labels[i * RECORDS : (i + 1) * RECORDS])
        for i, name in enumerate(names)
    }
    cut = 5 * RECORDS
    return files, (images[:cut], labels[:cut], images[cut:], labels[cut:])


def _write_tar(
    path: pathlib.Path, files: dict[str, bytes], folder: str = "cifar-10-batches-bin", mode: str = "w:gz"
) -> pathlib.Path:
    with tarfile.open(path, mode) as tar:
        meta = "\n".join(data.CIFAR10_CLASSES).encode()
        for name, payload in {"batches.meta.txt": meta, **files}.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


@pytest.fixture
def small_records(monkeypatch):
    """Batch files of RECORDS records instead of 10,000."""
    monkeypatch.setattr(cifar10, "RECORDS_PER_FILE", RECORDS)  # the reader's (data re-exports it)


@pytest.fixture
def fake_archive(tmp_path, small_records):
    files, expected = _fake_files()
    return _write_tar(tmp_path / "cifar-10-binary.tar.gz", files), expected


def _assert_split(split: data.Split, images: np.ndarray, labels: np.ndarray) -> None:
    assert split.images.dtype == np.uint8 and split.labels.dtype == np.int32
    np.testing.assert_array_equal(split.images, images)
    np.testing.assert_array_equal(split.labels, labels)


# ---------------------------------------------------------------------------
# The reader.


def test_archive_round_trips_labels_and_pixels(fake_archive):
    path, (train_x, train_y, test_x, test_y) = fake_archive
    train, test = data.read_cifar10_archive(path)
    assert (len(train), len(test)) == (5 * RECORDS, RECORDS)
    _assert_split(train, train_x, train_y)
    _assert_split(test, test_x, test_y)
    # The CHW -> HWC order itself, on one pixel: record byte 1 + c*1024 + y*32 + x.
    raw = np.frombuffer(_encode(train_x[:1], train_y[:1]), np.uint8)
    assert train.images[0, 5, 7, 2] == raw[1 + 2 * 1024 + 5 * 32 + 7]


def test_uncompressed_tar_reads_the_same(tmp_path, small_records):
    files, (train_x, train_y, test_x, test_y) = _fake_files(seed=2)
    train, test = data.read_cifar10_archive(_write_tar(tmp_path / "cifar-10-binary.tar", files, mode="w"))
    _assert_split(train, train_x, train_y)
    _assert_split(test, test_x, test_y)


def test_extracted_folder_reads_the_same(tmp_path, small_records):
    files, (train_x, train_y, test_x, test_y) = _fake_files(seed=1)
    bin_folder = tmp_path / "cifar-10-batches-bin"
    bin_folder.mkdir()
    for name, payload in files.items():
        (bin_folder / name).write_bytes(payload)
    for path in (bin_folder, tmp_path):  # the folder itself, or one that contains it
        train, test = data.read_cifar10_archive(path)
        _assert_split(train, train_x, train_y)
        _assert_split(test, test_x, test_y)
    dataset = data.load_dataset("archive", path=str(tmp_path))
    assert dataset.description.startswith(f"CIFAR-10 from folder {tmp_path} ")


def test_truncated_member_names_member_and_byte_counts(tmp_path, small_records):
    files, _ = _fake_files()
    files["data_batch_2.bin"] = files["data_batch_2.bin"][:-100]
    path = _write_tar(tmp_path / "cifar-10-binary.tar.gz", files)
    with pytest.raises(DataError) as err:
        data.read_cifar10_archive(path)
    message = str(err.value)
    assert "cifar-10-batches-bin/data_batch_2.bin" in message
    assert f"{RECORDS * 3073 - 100:,} bytes" in message and f"expected {RECORDS * 3073:,}" in message
    assert "\n" not in message


def test_wrong_record_count_against_the_official_size(tmp_path):
    # With the real constant: 5 whole records where 10,000 are expected.
    files = {name: bytes(5 * 3073) for name in list(data.TRAIN_FILES) + [data.TEST_FILE]}
    path = _write_tar(tmp_path / "cifar-10-binary.tar.gz", files)
    with pytest.raises(DataError, match=r"data_batch_1\.bin has 15,365 bytes .*expected 30,730,000"):
        data.read_cifar10_archive(path)


def test_missing_member(tmp_path, small_records):
    files, _ = _fake_files()
    del files["test_batch.bin"]
    path = _write_tar(tmp_path / "cifar-10-binary.tar.gz", files)
    with pytest.raises(DataError, match=r"no cifar-10-batches-bin/test_batch\.bin"):
        data.read_cifar10_archive(path)
    # The same for an extracted folder.
    (tmp_path / "cifar-10-batches-bin").mkdir()
    for name, payload in files.items():
        (tmp_path / "cifar-10-batches-bin" / name).write_bytes(payload)
    with pytest.raises(DataError, match=r"test_batch\.bin"):
        data.read_cifar10_archive(tmp_path)


def test_python_pickle_version_is_refused(tmp_path, small_records):
    files, _ = _fake_files()
    by_name = _write_tar(tmp_path / "cifar-10-python.tar.gz", files)
    with pytest.raises(DataError, match=r"pickles.*cifar-10-binary\.tar\.gz"):
        data.read_cifar10_archive(by_name)
    # Renamed, it is still recognized by its folder, and nothing in it is read.
    pickled = {"data_batch_1": b"\x80\x04not read", "test_batch": b"\x80\x04not read"}
    by_content = _write_tar(tmp_path / "download.tar.gz", pickled, folder="cifar-10-batches-py")
    with pytest.raises(DataError, match="pickles"):
        data.read_cifar10_archive(by_content)
    (tmp_path / "extracted" / "cifar-10-batches-py").mkdir(parents=True)
    with pytest.raises(DataError, match="pickles"):
        data.read_cifar10_archive(tmp_path / "extracted")


def test_corrupt_or_truncated_gzip(tmp_path, fake_archive):
    path, _ = fake_archive
    good = path.read_bytes()
    cases = {"truncated.tar.gz": good[: len(good) // 2], "header-only.tar.gz": good[:10]}
    # Random pixels do not compress, so gzip stores them verbatim: zeroing 64
    # bytes there decodes without a zlib error, and only the CRC-32 catches it.
    for fraction in (0.3, 0.6, 0.9):
        corrupt = bytearray(good)
        start = int(len(good) * fraction)
        corrupt[start : start + 64] = bytes(64)
        cases[f"corrupt-{fraction}.tar.gz"] = bytes(corrupt)
    for name, payload in cases.items():
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(DataError) as err:
            data.read_cifar10_archive(tmp_path / name)
        message = str(err.value)
        assert f"{name} is a corrupt or incomplete gzip file" in message, message
        assert "re-download" in message and "\n" not in message, message


def test_neither_archive_nor_folder(tmp_path):
    not_gzip = tmp_path / "notes.txt"
    not_gzip.write_text("hello")
    with pytest.raises(DataError, match=r"notes\.txt is not a \.tar\.gz archive"):
        data.read_cifar10_archive(not_gzip)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"holds no CIFAR-10 binary files"):
        data.read_cifar10_archive(empty)


def test_missing_path_names_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    with pytest.raises(DataError, match="JAXSAM_CIFAR10"):
        data.read_cifar10_archive(tmp_path / "nowhere.tar.gz")
    with pytest.raises(DataError, match=r"--config\.data\.path=.*JAXSAM_CIFAR10"):
        data.load_dataset("archive")


def test_environment_variable_and_auto(fake_archive, monkeypatch):
    path, (train_x, train_y, _, _) = fake_archive
    monkeypatch.setenv(data.ENV_VAR, str(path))
    for source in ("archive", "auto"):
        dataset = data.load_dataset(source, n_validation=20, n_train=60, n_test=10)
        assert dataset.description == (
            f"CIFAR-10 from archive {path} (train 60 of 100, validation 20, test 10 of 20)"
        )
        assert (len(dataset.train), len(dataset.validation), len(dataset.test)) == (60, 20, 10)
        assert dataset.num_classes == 10


# ---------------------------------------------------------------------------
# The real archive (when the shared copy exists).


@pytest.fixture(scope="module")
def real_cifar10():
    if not REAL_ARCHIVE.exists():
        pytest.skip(f"real CIFAR-10 archive not found at {REAL_ARCHIVE}")
    return data.read_cifar10_archive(REAL_ARCHIVE)


def test_real_archive_sizes_classes_and_mean(real_cifar10):
    train, test = real_cifar10
    assert train.images.shape == (50_000, 32, 32, 3) and test.images.shape == (10_000, 32, 32, 3)
    np.testing.assert_array_equal(np.bincount(train.labels, minlength=10), np.full(10, 5_000))
    np.testing.assert_array_equal(np.bincount(test.labels, minlength=10), np.full(10, 1_000))
    mean = train.images.mean(axis=(0, 1, 2), dtype=np.float64) / 255.0
    np.testing.assert_allclose(mean, (0.4913, 0.4821, 0.4465), atol=2e-3)
    np.testing.assert_allclose(mean, data.CIFAR10_MEAN, atol=2e-3)


# ---------------------------------------------------------------------------
# Subsets.


def _rows(split: data.Split) -> set[bytes]:
    return {image.tobytes() for image in split.images}


def test_validation_and_train_subsets():
    size = (200, 40)
    pool = data.load_dataset("synthetic", synthetic_size=size, seed=3)
    assert pool.validation is None and len(pool.train) == 200

    full = data.load_dataset("synthetic", synthetic_size=size, seed=3, n_validation=50)
    assert (len(full.train), len(full.validation)) == (150, 50)
    assert not _rows(full.train) & _rows(full.validation)
    assert _rows(full.train) | _rows(full.validation) == _rows(pool.train)

    sub = data.load_dataset("synthetic", synthetic_size=size, seed=3, n_validation=50, n_train=30)
    again = data.load_dataset("synthetic", synthetic_size=size, seed=3, n_validation=50, n_train=30)
    assert len(sub.train) == 30
    np.testing.assert_array_equal(sub.train.images, again.train.images)
    # The validation set does not depend on n_train, and smaller subsets nest in larger ones.
    np.testing.assert_array_equal(sub.validation.images, full.validation.images)
    assert _rows(sub.train) <= _rows(full.train)

    # Another seed draws other subsets (of other synthetic images too, so compare positions).
    other = data.load_dataset("synthetic", synthetic_size=size, seed=4, n_validation=50, n_train=30)
    assert not np.array_equal(other.train.images, sub.train.images)
    assert sub.description == "synthetic CIFAR-10-shaped data (seed 3) (train 30 of 200, validation 50, test 40)"
    # n_train=0 is the whole split (after the hold-out), and the description says so.
    assert full.description == "synthetic CIFAR-10-shaped data (seed 3) (train 150 (all: n_train=0), validation 50, test 40)"

    with pytest.raises(DataError, match=r"training split has 200"):
        data.load_dataset("synthetic", synthetic_size=size, n_validation=150, n_train=51)
    with pytest.raises(DataError, match=r"test split has 40"):
        data.load_dataset("synthetic", synthetic_size=size, n_test=41)
    assert len(data.load_dataset("synthetic", synthetic_size=size, n_test=7).test) == 7


def test_subsets_of_the_archive_keep_the_right_examples(fake_archive):
    path, (train_x, train_y, _, _) = fake_archive
    dataset = data.load_dataset("archive", path=path, n_validation=30, n_train=40, seed=5)
    order = np.random.default_rng(5).permutation(100)
    _assert_split(dataset.validation, train_x[np.sort(order[:30])], train_y[np.sort(order[:30])])
    _assert_split(dataset.train, train_x[np.sort(order[30:70])], train_y[np.sort(order[30:70])])


# ---------------------------------------------------------------------------
# Synthetic data.


def test_synthetic_shapes_determinism_and_learnability():
    a = data.load_dataset("synthetic", synthetic_size=(300, 100), seed=0)
    b = data.load_dataset("synthetic", synthetic_size=(300, 100), seed=0)
    c = data.load_dataset("synthetic", synthetic_size=(300, 100), seed=1)
    assert a.train.images.shape == (300, 32, 32, 3) and a.test.images.shape == (100, 32, 32, 3)
    assert a.train.images.dtype == np.uint8 and a.train.labels.dtype == np.int32
    assert a.train.labels.min() >= 0 and a.train.labels.max() < 10
    np.testing.assert_array_equal(np.bincount(a.train.labels, minlength=10), np.full(10, 30))
    np.testing.assert_array_equal(a.train.images, b.train.images)
    np.testing.assert_array_equal(a.test.labels, b.test.labels)
    assert not np.array_equal(a.train.images, c.train.images)
    # Learnable: nearest class-mean colour, fit on train, classifies the test split.
    colour = lambda s: s.images.mean(axis=(1, 2))
    centroids = np.stack([colour(a.train)[a.train.labels == k].mean(0) for k in range(10)])
    predicted = np.argmin(((colour(a.test)[:, None] - centroids) ** 2).sum(-1), axis=1)
    assert np.mean(predicted == a.test.labels) > 0.95


# ---------------------------------------------------------------------------
# Sources.


def test_unknown_source_lists_the_valid_ones():
    with pytest.raises(DataError, match=r"'archive', 'auto', 'synthetic', 'tfds'"):
        data.load_dataset("imagenet")


def test_tfds_without_tensorflow_points_to_the_archive(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # makes `import tensorflow` fail
    monkeypatch.delenv(data.ENV_VAR, raising=False)

    def no_network(*args, **kwargs):
        raise AssertionError("must not probe the network")

    def offline(*args, **kwargs):
        raise DataError("cannot download (offline)")

    monkeypatch.setattr(data, "_reachable", no_network)
    monkeypatch.setattr(data, "_tfds_prepared", no_network)
    monkeypatch.setattr(data.download, "cached_or_download", offline)
    with pytest.raises(DataError) as err:
        data.load_dataset("tfds")
    message = str(err.value)
    assert "pip install tensorflow-cpu" in message
    assert "--config.data.source=archive" in message and "JAXSAM_CIFAR10" in message
    assert "\n" not in message
    # 'auto' without a path tries the download cache first; without TensorFlow it does not go on to TFDS.
    with pytest.raises(DataError, match=r"^cannot download \(offline\)$"):
        data.load_dataset("auto")


def test_tfds_offline_and_not_prepared_fails_fast(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", types.ModuleType("tensorflow"))
    probed = []
    monkeypatch.setattr(data, "_tfds_prepared", lambda data_dir: (False, "/data/tfds/cifar10/3.0.2"))
    monkeypatch.setattr(data, "_reachable", lambda host, port: probed.append((host, port)) or False)
    with pytest.raises(DataError, match=r"not prepared in /data/tfds/cifar10/3\.0\.2.*--config\.data\.source=archive"):
        data.load_dataset("tfds")
    assert probed == [("www.cs.toronto.edu", 443)]


def test_tfds_failures_become_one_line(monkeypatch):
    fake_tfds = types.ModuleType("tensorflow_datasets")

    def broken_load(*args, **kwargs):
        raise RuntimeError("builder exploded\nwith a long traceback-like tail")

    fake_tfds.load = broken_load
    fake_tfds.as_numpy = lambda tree: tree
    monkeypatch.setitem(sys.modules, "tensorflow", types.ModuleType("tensorflow"))
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake_tfds)
    monkeypatch.setattr(data, "_tfds_prepared", lambda data_dir: (True, "/data/tfds"))
    with pytest.raises(DataError) as err:
        data.load_dataset("tfds")
    assert str(err.value) == (
        "TFDS failed to load cifar10 (RuntimeError: builder exploded): use --config.data.source=archive "
        "--config.data.path=/path/to/cifar-10-binary.tar.gz (or set JAXSAM_CIFAR10)"
    )


def test_reachable_probe_on_local_ports():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        assert data._reachable("127.0.0.1", port, timeout=1.0)
    # The port is closed now: refused at once.
    assert not data._reachable("127.0.0.1", port, timeout=1.0)


# ---------------------------------------------------------------------------
# Batching.


def _indexed_split(n: int) -> data.Split:
    """Images that carry their own index in the first two bytes."""
    images = np.zeros((n, 32, 32, 3), np.uint8)
    images[:, 0, 0, 0] = np.arange(n) % 256
    images[:, 0, 0, 1] = np.arange(n) // 256
    return data.Split(images, (np.arange(n) % 10).astype(np.int32))


def _indices(images: np.ndarray) -> np.ndarray:
    return images[:, 0, 0, 0].astype(np.int64) + 256 * images[:, 0, 0, 1].astype(np.int64)


def test_epoch_permutation():
    p = data.epoch_permutation(0, 0, 1000)
    np.testing.assert_array_equal(np.sort(p), np.arange(1000))
    np.testing.assert_array_equal(p, data.epoch_permutation(0, 0, 1000))
    expected = jax.random.permutation(jax.random.fold_in(jax.random.key(0), 0), 1000)
    np.testing.assert_array_equal(p, np.asarray(expected))
    assert not np.array_equal(p, data.epoch_permutation(0, 1, 1000))
    assert not np.array_equal(p, data.epoch_permutation(1, 0, 1000))


def test_train_batches_resume_and_order():
    split = _indexed_split(103)
    assert data.steps_per_epoch(103, 10) == 10
    full = list(data.train_batches(split, 10, seed=7, epoch=2))
    assert len(full) == 10
    for images, labels in full:
        assert images.shape == (10, 32, 32, 3) and images.dtype == np.uint8
        assert labels.shape == (10,) and labels.dtype == np.int32
    visited = np.concatenate([_indices(images) for images, _ in full])
    np.testing.assert_array_equal(visited, data.epoch_permutation(7, 2, 103)[:100])
    np.testing.assert_array_equal(np.concatenate([l for _, l in full]), visited % 10)

    resumed = list(data.train_batches(split, 10, seed=7, epoch=2, start_step=3))
    assert len(resumed) == 7
    for (xa, ya), (xb, yb) in zip(resumed, full[3:]):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    next_epoch = np.concatenate([_indices(x) for x, _ in data.train_batches(split, 10, seed=7, epoch=3)])
    assert not np.array_equal(next_epoch, visited)

    with pytest.raises(DataError, match="exceeds the 103 training examples"):
        data.train_batches(split, 200, seed=0, epoch=0)
    with pytest.raises(ValueError, match="start_step"):
        data.train_batches(split, 10, seed=0, epoch=0, start_step=11)


def test_eval_batches_cover_each_example_once():
    split = _indexed_split(103)
    batches = list(data.eval_batches(split, 10))
    assert len(batches) == 11
    assert all(x.shape == (10, 32, 32, 3) and y.shape == (10,) and m.shape == (10,) for x, y, m in batches)
    assert all(m.dtype == np.float32 for _, _, m in batches)
    masks = np.concatenate([m for _, _, m in batches])
    assert masks.sum() == 103
    images = np.concatenate([x for x, _, _ in batches])
    labels = np.concatenate([y for _, y, _ in batches])
    real = masks == 1.0
    np.testing.assert_array_equal(images[real], split.images)
    np.testing.assert_array_equal(labels[real], split.labels)
    assert not images[~real].any() and not labels[~real].any()
    np.testing.assert_array_equal(masks[:103], 1.0)  # padding only at the end
    # An exact multiple needs no padding.
    assert [m.sum() for _, _, m in data.eval_batches(_indexed_split(20), 10)] == [10.0, 10.0]


# ---------------------------------------------------------------------------
# Normalization and augmentation.


def test_normalize_constant_colour():
    colour = np.array([10, 128, 250], np.uint8)
    image = np.broadcast_to(colour, (2, 32, 32, 3))
    got = np.asarray(jax.jit(data.normalize)(image))
    expected = (colour / 255.0 - np.array(data.CIFAR10_MEAN)) / np.array(data.CIFAR10_STD)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, np.broadcast_to(expected, got.shape), rtol=0, atol=1e-6)
    with pytest.raises(TypeError, match="uint8"):
        data.normalize(jnp.zeros((1, 32, 32, 3), jnp.float32))


def _candidates(image: np.ndarray) -> np.ndarray:
    """All 9x9 crops of the 4-pixel zero-padded image, unflipped then flipped: (162, 32, 32, 3)."""
    padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
    windows = np.stack([padded[dy : dy + 32, dx : dx + 32] for dy in range(9) for dx in range(9)])
    return np.concatenate([windows, windows[:, :, ::-1]])


def test_augment_is_a_padded_crop_and_flip_then_normalize():
    images = np.random.default_rng(0).integers(0, 256, size=(32, 32, 32, 3), dtype=np.uint8)
    key = jax.random.key(42)
    out = np.asarray(jax.jit(data.augment)(key, images))
    assert out.shape == (32, 32, 32, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out, np.asarray(jax.jit(data.augment)(key, images)))
    assert not np.array_equal(out, np.asarray(jax.jit(data.augment)(jax.random.key(43), images)))

    normalize = jax.jit(data.normalize)
    found = []
    for image, augmented in zip(images, out):
        candidates = np.asarray(normalize(_candidates(image)))
        matches = [k for k in range(len(candidates)) if np.array_equal(candidates[k], augmented)]
        assert len(matches) == 1, matches
        found.append(matches[0])
    flips = {k >= 81 for k in found}
    offsets = {k % 81 for k in found}
    assert flips == {False, True} and len(offsets) >= 8


def test_crop_and_flip_offsets_and_flips_are_uniform():
    # Pixel (y, x) holds y+1 and x+1, so each output tells its offset and flip.
    yy, xx = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    image = np.stack([yy + 1, xx + 1, np.full_like(yy, 255)], axis=-1).astype(np.uint8)
    n = 2000
    out = np.asarray(jax.jit(data.crop_and_flip)(jax.random.key(0), np.broadcast_to(image, (n, 32, 32, 3))))
    centre = out[:, 16, 16].astype(int)
    flipped = out[:, 16, 17, 1].astype(int) < centre[:, 1]
    dy = centre[:, 0] - 13  # output row 16 is padded row dy + 16, i.e. image row dy + 12
    dx = np.where(flipped, centre[:, 1] - 12, centre[:, 1] - 13)
    padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
    for i in range(n):
        window = padded[dy[i] : dy[i] + 32, dx[i] : dx[i] + 32]
        np.testing.assert_array_equal(out[i], window[:, ::-1] if flipped[i] else window)
    assert abs(flipped.mean() - 0.5) < 0.05
    counts = np.bincount(dy * 9 + dx, minlength=81)
    assert counts.min() > 0 and counts.max() < 3 * n / 81
