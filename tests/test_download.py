"""Downloading and caching the CIFAR-10 archive, against an HTTP server on 127.0.0.1.

The small tests serve a few-KB file (or a tiny archive) with its own SHA-256,
so the download logic is tested where the real archive is absent. The real
archive's tests serve the shared copy, whose SHA-256 (not the official one)
is computed once; only one of them decodes it."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import os
import pathlib
import socket
import sys
import tarfile
import threading
import time
import types

import numpy as np
import pytest

from jaxsam import cifar10, config, data, download
from jaxsam.data import DataError

REAL_ARCHIVE = pathlib.Path(__file__).resolve().parents[1].parent / "shared/data/cifar10/cifar-10-binary.tar.gz"
NAME = download.ARCHIVE_NAME


# ---------------------------------------------------------------------------
# A local server.


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET: the server's payload (bytes or a file), whole or spoilt as the server's `mode` says."""

    timeout = 30  # a stuck client cannot hold a handler thread for longer

    def do_GET(self):
        server = self.server
        server.requests.append(self.path)
        time.sleep(server.delay)
        if server.mode == "404":
            self.send_error(404)
            return
        payload = server.payload
        size = payload.stat().st_size if isinstance(payload, pathlib.Path) else len(payload)
        self.send_response(200)
        self.send_header("Content-Type", "application/gzip")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        limit = size // 2 if server.mode == "truncate" else size  # then close: the body ends early
        sent = 0
        with open(payload, "rb") if isinstance(payload, pathlib.Path) else io.BytesIO(payload) as source:
            with contextlib.suppress(OSError):  # the client may hang up first
                while sent < limit:
                    chunk = bytearray(source.read(min(1 << 20, limit - sent)))
                    if server.mode == "corrupt" and sent == 0:
                        chunk[len(chunk) // 2] ^= 0xFF
                    self.wfile.write(chunk)
                    sent += len(chunk)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    """A threaded server on a free 127.0.0.1 port; set .payload (and .mode, .delay); .requests lists the GETs."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.payload, httpd.mode, httpd.delay, httpd.requests = b"", "ok", 0.0, []
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/{NAME}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """An empty cache folder in $JAXSAM_CACHE; no archive path, and no proxy between the tests and 127.0.0.1."""
    folder = tmp_path / "cache"
    monkeypatch.setenv(download.CACHE_ENV_VAR, str(folder))
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    for proxy in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    return folder


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _files(folder: pathlib.Path) -> list[str]:
    return sorted(os.listdir(folder)) if folder.exists() else []


def _one_line_error(call, match: str) -> str:
    with pytest.raises(DataError, match=match) as err:
        call()
    message = str(err.value)
    assert "\n" not in message and message.strip() == message
    return message


PAYLOAD = np.random.default_rng(0).integers(0, 256, 5_000, dtype=np.uint8).tobytes()
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


# ---------------------------------------------------------------------------
# A few-KB file: the download logic without the real archive.


def test_download_lands_in_the_cache_then_is_read_without_a_request(server, cache):
    server.payload = PAYLOAD
    path = download.cached_or_download(server.url, PAYLOAD_SHA)  # with the progress bar
    assert path == cache / NAME and path.read_bytes() == PAYLOAD
    assert _files(cache) == [NAME] and len(server.requests) == 1
    assert download.cached_or_download(server.url, PAYLOAD_SHA.upper(), progress=False) == path
    assert len(server.requests) == 1


def test_the_config_defaults_are_the_official_archive():
    c = config.base_config()
    assert (c.data.url, c.data.sha256) == (download.DEFAULT_URL, download.ARCHIVE_SHA256)
    assert download.DEFAULT_URL.endswith("/" + NAME)


@pytest.mark.parametrize(
    "mode, sha, match",
    [
        ("corrupt", PAYLOAD_SHA, rf"^downloaded http://.* has SHA-256 [0-9a-f]{{64}}, expected {PAYLOAD_SHA}: "
         r"the file is corrupt or changed; nothing was kept in .*; retry, or get cifar-10-binary.tar.gz by hand"),
        ("ok", "0" * 64, r"has SHA-256 " + PAYLOAD_SHA + r", expected 0{64}: the file is corrupt or changed"),
        ("truncate", PAYLOAD_SHA, r"^download of http://.* was interrupted after 2,500 of 5,000 bytes \(.*\): "
         r"nothing was kept in .*; retry, or get cifar-10-binary.tar.gz by hand from https://www.cs.toronto.edu"),
        ("404", PAYLOAD_SHA, r"^download of http://.* failed \(HTTP 404 Not Found\): check --config.data.url"),
    ],
)
def test_a_failed_download_is_one_line_and_keeps_nothing(server, cache, mode, sha, match):
    server.payload, server.mode = PAYLOAD, mode
    message = _one_line_error(lambda: download.cached_or_download(server.url, sha, progress=False), match)
    assert str(cache) in message and "--config.data.path=" in message and "JAXSAM_CIFAR10" in message
    assert _files(cache) == [] and len(server.requests) == 1


def test_the_wrong_size_is_refused_before_the_body(server, cache):
    server.payload = PAYLOAD  # against the official digest, so the official size is expected
    _one_line_error(
        lambda: download.cached_or_download(server.url, progress=False),
        r"serves 5,000 bytes, expected 170,052,171 \(the official cifar-10-binary.tar.gz\): check --config.data.url, "
        r"or for another copy pass its --config.data.sha256=\.\.\.; nothing was kept",
    )
    assert _files(cache) == []


def test_offline_fails_fast_naming_the_manual_steps(cache, monkeypatch):
    url = f"http://127.0.0.1:{_closed_port()}/{NAME}"
    start = time.monotonic()
    message = _one_line_error(
        lambda: download.cached_or_download(url, PAYLOAD_SHA),
        r"^cannot download http://127\.0\.0\.1:\d+/.*\(.*; offline\?\)",
    )
    assert time.monotonic() - start < 5
    assert message.endswith(
        f"get {NAME} by hand from https://www.cs.toronto.edu/~kriz/cifar.html (the binary version) and put it in "
        f"{cache}/, or pass --config.data.path=/path/to/{NAME} (or set JAXSAM_CIFAR10)"
    )
    # The same line through source 'auto' when TensorFlow is absent (no TFDS to fall back to).
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    assert _one_line_error(lambda: data.load_dataset("auto", url=url, sha256=PAYLOAD_SHA), "offline") == message
    assert _files(cache) == []


def test_a_silent_server_times_out(cache):
    with socket.socket() as silent:  # listens, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/{NAME}"
        start = time.monotonic()
        _one_line_error(lambda: download.download(url, cache / NAME, PAYLOAD_SHA, timeout=0.5), r"timed out.*offline\?")
        assert time.monotonic() - start < 5


def test_bad_digest_and_unwritable_cache_are_one_line(tmp_path, monkeypatch):
    _one_line_error(
        lambda: download.cached_or_download("http://127.0.0.1:1/x", "abc"), r"data.sha256 must be 64 hexadecimal"
    )
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv(download.CACHE_ENV_VAR, str(tmp_path / "a_file" / "cache"))
    _one_line_error(
        lambda: download.cached_or_download("http://127.0.0.1:1/x", PAYLOAD_SHA),
        r"^cannot write the download to .*/a_file/cache \(.*\): set JAXSAM_CACHE to a writable folder",
    )


def test_an_interrupt_leaves_no_partial_file(server, cache, monkeypatch):
    server.payload = PAYLOAD

    def interrupted(response, out, *args):
        out.write(response.read(100))
        raise KeyboardInterrupt

    monkeypatch.setattr(download, "_copy", interrupted)
    with pytest.raises(KeyboardInterrupt):
        download.cached_or_download(server.url, PAYLOAD_SHA, progress=False)
    assert _files(cache) == []


def test_processes_sharing_the_cache_download_once(server, cache):
    server.payload, server.delay = PAYLOAD, 0.3
    paths = []
    fetch = lambda: paths.append(download.cached_or_download(server.url, PAYLOAD_SHA, progress=False))
    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert paths == [cache / NAME] * 2 and len(server.requests) == 1


# ---------------------------------------------------------------------------
# Through load_dataset, with a tiny archive.


@pytest.fixture
def tiny_archive(monkeypatch) -> bytes:
    """A cifar-10-binary.tar.gz of 3 records per batch file, as bytes."""
    monkeypatch.setattr(cifar10, "RECORDS_PER_FILE", 3)  # the reader's (data re-exports it)
    rng = np.random.default_rng(1)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in (*data.TRAIN_FILES, data.TEST_FILE):
            records = rng.integers(0, 256, (3, data.RECORD_BYTES), dtype=np.uint8)
            records[:, 0] %= 10
            info = tarfile.TarInfo(f"{data.BIN_FOLDER}/{name}")
            info.size = records.nbytes
            tar.addfile(info, io.BytesIO(records.tobytes()))
    return buffer.getvalue()


def test_sources_download_and_auto_read_the_cache_and_say_so(server, cache, tiny_archive, tmp_path):
    server.payload = tiny_archive
    sha = hashlib.sha256(tiny_archive).hexdigest()
    for source in ("download", "auto"):  # auto, with no path: the cache, downloaded by the first
        dataset = data.load_dataset(source, url=server.url, sha256=sha, progress=False)
        assert (dataset.source, dataset.path) == ("download", str(cache / NAME))
        assert dataset.description == (
            f"CIFAR-10 from archive {cache / NAME} (the download cache) (train 15 (all: n_train=0), validation 0, test 3)"
        )
    assert len(server.requests) == 1
    # An explicit path wins over the cache, and is recorded.
    given = tmp_path / "mine.tar.gz"
    given.write_bytes(tiny_archive)
    dataset = data.load_dataset("auto", path=given)
    assert (dataset.source, dataset.path) == ("archive", str(given))
    assert (data.load_dataset("synthetic").source, data.load_dataset("synthetic").path) == ("synthetic", None)
    _one_line_error(
        lambda: data.load_dataset("download", path=given),
        rf"^source 'download' reads the archive cached in {cache}, not data.path {given}: "
        r"use --config.data.source=archive",
    )


def test_a_damaged_cached_copy_names_the_file_to_delete(cache):
    cache.mkdir()
    (cache / NAME).write_bytes(b"\x1f\x8b not really gzip")
    _one_line_error(
        lambda: data.load_dataset("download", url=f"http://127.0.0.1:{_closed_port()}/x", sha256=PAYLOAD_SHA),
        r"is a corrupt or incomplete gzip file .*"
        rf"\(this is the cached download: delete {cache / NAME} to download it again\)$",
    )


def test_auto_goes_on_to_tfds_only_when_tensorflow_is_installed(cache, monkeypatch):
    url = f"http://127.0.0.1:{_closed_port()}/{NAME}"
    monkeypatch.setitem(sys.modules, "tensorflow", types.ModuleType("tensorflow"))
    tiny = data.Split(np.zeros((4, 32, 32, 3), np.uint8), np.arange(4, dtype=np.int32))
    monkeypatch.setattr(data, "_load_tfds", lambda data_dir: (tiny, tiny))
    dataset = data.load_dataset("auto", url=url, sha256=PAYLOAD_SHA)
    assert (dataset.source, dataset.path) == ("tfds", None)

    def tfds_fails(data_dir):
        raise DataError("TFDS cifar10 is not prepared")

    monkeypatch.setattr(data, "_load_tfds", tfds_fails)
    _one_line_error(
        lambda: data.load_dataset("auto", url=url, sha256=PAYLOAD_SHA),
        r"^cannot download .*offline\?\).* \(TFDS, tried next, failed too: TFDS cifar10 is not prepared\)$",
    )
    # The explicit source 'download' never goes on to TFDS.
    _one_line_error(lambda: data.load_dataset("download", url=url, sha256=PAYLOAD_SHA), r"offline\?\): get")


# ---------------------------------------------------------------------------
# The real archive (when the shared copy exists): served whole, spoilt, cut short.


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.fixture(scope="module")
def real_sha256() -> str:
    """The shared copy's own SHA-256 (it is not the official file)."""
    if not REAL_ARCHIVE.exists():
        pytest.skip(f"real CIFAR-10 archive not found at {REAL_ARCHIVE}")
    return _sha256(REAL_ARCHIVE)


def test_real_archive_download_then_cache(server, cache, real_sha256):
    server.payload = REAL_ARCHIVE
    path = download.cached_or_download(server.url, real_sha256, progress=False)
    assert _files(cache) == [NAME] and _sha256(path) == real_sha256
    assert download.cached_or_download(server.url, real_sha256, progress=False) == path
    assert len(server.requests) == 1


@pytest.mark.parametrize("mode", ["corrupt", "truncate"])
def test_real_archive_spoilt_download_keeps_nothing(server, cache, real_sha256, mode):
    server.payload, server.mode = REAL_ARCHIVE, mode
    size = REAL_ARCHIVE.stat().st_size
    match = {"corrupt": r"has SHA-256 [0-9a-f]{64}, expected " + real_sha256 + ": the file is corrupt or changed",
             "truncate": rf"interrupted after {size // 2:,} of {size:,} bytes"}[mode]
    _one_line_error(lambda: download.cached_or_download(server.url, real_sha256, progress=False), match)
    assert _files(cache) == []


def test_real_archive_auto_without_a_path_downloads_and_reads_it(server, cache, real_sha256):
    server.payload = REAL_ARCHIVE
    dataset = data.load_dataset("auto", url=server.url, sha256=real_sha256, n_validation=5_000, progress=False)
    assert (dataset.source, dataset.path) == ("download", str(cache / NAME))
    assert (len(dataset.train), len(dataset.validation), len(dataset.test)) == (45_000, 5_000, 10_000)
    np.testing.assert_array_equal(np.bincount(dataset.test.labels, minlength=10), np.full(10, 1_000))
    assert len(server.requests) == 1
