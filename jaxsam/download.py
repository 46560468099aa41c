"""The official CIFAR-10 binary archive, downloaded once and cached.

`cached_or_download` returns the path of ``cifar-10-binary.tar.gz`` in the
cache folder (``$JAXSAM_CACHE``, else ``~/.cache/jaxsam``), downloading it
first when it is not there. A download is written to a temporary file in that
folder and renamed into place only after its SHA-256 matches, so the cache
holds the whole verified archive or nothing: a failed, corrupt or interrupted
download keeps no file and raises a one-line `DataError`. There are no
retries, and a short socket timeout makes an offline machine fail at once with
a line saying how to fetch the archive by hand. Processes that share a cache
folder take turns (an advisory lock on the folder), so a study's parallel runs
download it once.

    path = cached_or_download()        # ~/.cache/jaxsam/cifar-10-binary.tar.gz
    train, test = jaxsam.data.read_cifar10_archive(path)

`DataError` is defined here, so that this module needs nothing from
`jaxsam.data`, which re-exports it.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO, Iterator, Optional, Union

from tqdm import tqdm

try:
    import fcntl
except ImportError:  # not POSIX: no lock, at worst two processes download at once
    fcntl = None

__all__ = [
    "ARCHIVE_NAME", "ARCHIVE_SHA256", "ARCHIVE_SIZE", "DEFAULT_URL", "DataError", "cache_dir", "cached_or_download",
    "download",
]

ARCHIVE_NAME = "cifar-10-binary.tar.gz"
DEFAULT_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
HOME_PAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"
# The official file, as published on HOME_PAGE.
ARCHIVE_SIZE = 170_052_171
ARCHIVE_SHA256 = "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"
ARCHIVE_ENV_VAR = "JAXSAM_CIFAR10"  # a path to the archive (read by jaxsam.data)
CACHE_ENV_VAR = "JAXSAM_CACHE"
DEFAULT_CACHE = "~/.cache/jaxsam"
TIMEOUT_S = 15.0  # socket timeout: for the connection and for each read
CHUNK_BYTES = 1 << 20

PathLike = Union[str, os.PathLike]


class DataError(ValueError):
    """Bad or missing data; str() is one line that names the fix."""


def _one_line(err: BaseException, limit: int = 200) -> str:
    """First line of an exception's message, for wrapping foreign errors into one line."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def cache_dir() -> Path:
    """The cache folder: ``$JAXSAM_CACHE``, else ``~/.cache/jaxsam`` (not created here).

    Returns:
      The folder, user-expanded.
    """
    return Path(os.environ.get(CACHE_ENV_VAR) or DEFAULT_CACHE).expanduser()


def _by_hand(folder: Path) -> str:
    """How to get the archive without this module, naming where to put it."""
    return (
        f"get {ARCHIVE_NAME} by hand from {HOME_PAGE} (the binary version) and put it in {folder}/, "
        f"or pass --config.data.path=/path/to/{ARCHIVE_NAME} (or set {ARCHIVE_ENV_VAR})"
    )


def _checked_sha256(sha256: str) -> str:
    digest = str(sha256).strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise DataError(
            f"data.sha256 must be 64 hexadecimal digits (got {sha256!r}): pass the archive's SHA-256 "
            f"(sha256sum {ARCHIVE_NAME}), or leave the default {ARCHIVE_SHA256} for the official file"
        )
    return digest


def _cache_error(folder: Path, err: OSError) -> DataError:
    return DataError(
        f"cannot write the download to {folder} ({_one_line(err)}): set {CACHE_ENV_VAR} to a writable folder "
        f"with room for {ARCHIVE_SIZE / 1e6:.0f} MB, or {_by_hand(folder)}"
    )


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Holds an exclusive advisory lock on `folder` itself (no lock file is left), where the OS allows."""
    fd = None
    if fcntl is not None:
        try:
            fd = os.open(folder, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass  # a file system without flock: go on unlocked
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


class _Interrupted(Exception):
    """The connection broke after `received` bytes."""

    def __init__(self, received: int, why: Union[BaseException, str]):
        super().__init__(received, why)
        self.received, self.why = received, why if isinstance(why, str) else _one_line(why)


def _copy(response: BinaryIO, out: BinaryIO, name: str, total: Optional[int], progress: bool) -> tuple[str, int]:
    """Streams `response` into `out`: (SHA-256 hex digest, bytes received). Raises on a broken connection."""
    digest, received = hashlib.sha256(), 0
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"downloading {name}",
               disable=not progress, mininterval=1.0)
    with bar:
        while True:
            try:
                chunk = response.read(CHUNK_BYTES)
            except (OSError, http.client.HTTPException) as err:  # a timeout, a reset, IncompleteRead
                raise _Interrupted(received, err) from None
            if not chunk:
                return digest.hexdigest(), received
            out.write(chunk)
            digest.update(chunk)
            received += len(chunk)
            bar.update(len(chunk))


def download(
    url: str,
    dest: PathLike,
    sha256: str,
    *,
    size: Optional[int] = None,
    progress: bool = True,
    timeout: float = TIMEOUT_S,
) -> Path:
    """Downloads `url` to `dest` and keeps it only if its SHA-256 is `sha256`.

    The bytes go to a temporary file next to `dest`, which is renamed to
    `dest` once the whole file has arrived and its digest matches; on any
    failure the temporary file is removed, and `dest` is not touched.

    Args:
      url: what to download (http, https, or anything else urllib opens).
      dest: the file to create; its folder must exist.
      sha256: the expected SHA-256, as 64 hexadecimal digits.
      size: the expected size in bytes, checked against the server's
        Content-Length before any byte is read; None: the official archive's
        size when `sha256` is the official digest, else unchecked.
      progress: show a tqdm progress bar on stderr.
      timeout: socket timeout in seconds, for the connection and each read.

    Returns:
      `dest`, as a Path.

    Raises:
      DataError: the server is unreachable, an HTTP error, a size or digest
        mismatch, an interrupted transfer, or the folder is not writable; the
        message is one line that names the fix.
    """
    dest = Path(dest)
    folder = dest.parent
    expected = _checked_sha256(sha256)
    if size is None and expected == ARCHIVE_SHA256:
        size = ARCHIVE_SIZE
    kept = f"nothing was kept in {folder}"
    request = urllib.request.Request(url, headers={"User-Agent": "jaxsam"})
    try:
        # A fresh opener reads the proxy variables (https_proxy, no_proxy) of this call.
        response = urllib.request.build_opener().open(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        raise DataError(
            f"download of {url} failed (HTTP {err.code} {err.reason}): check --config.data.url, retry later, "
            f"or {_by_hand(folder)}"
        ) from None
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as err:
        reason = err.reason if isinstance(err, urllib.error.URLError) and isinstance(err.reason, BaseException) else err
        raise DataError(f"cannot download {url} ({_one_line(reason)}; offline?): {_by_hand(folder)}") from None
    with response:
        announced = response.headers.get("Content-Length", "")
        announced = int(announced) if announced.strip().isdigit() else None
        if size is not None and announced is not None and announced != size:
            raise DataError(
                f"{url} serves {announced:,} bytes, expected {size:,} (the official {ARCHIVE_NAME}): check "
                f"--config.data.url, or for another copy pass its --config.data.sha256=...; {kept}"
            )
        total = announced if announced is not None else size
        try:
            free = shutil.disk_usage(folder).free
            if total is not None and free < total:
                raise DataError(
                    f"{folder} has {free / 1e6:,.0f} MB free and the download needs {total / 1e6:,.0f} MB: free "
                    f"space there or set {CACHE_ENV_VAR} to another folder"
                )
            handle = tempfile.NamedTemporaryFile(dir=folder, prefix=f".{dest.name}.", suffix=".part", delete=False)
        except OSError as err:
            raise _cache_error(folder, err) from None
        partial = Path(handle.name)
        try:
            try:
                with handle:
                    got, received = _copy(response, handle, dest.name, total, progress)
                    if announced is not None and received < announced:
                        raise _Interrupted(received, "the connection closed early")
                    handle.flush()
                    os.fsync(handle.fileno())
            except _Interrupted as stop:
                of = f" of {announced:,}" if announced is not None else ""
                raise DataError(
                    f"download of {url} was interrupted after {stop.received:,}{of} bytes ({stop.why}): {kept}; "
                    f"retry, or {_by_hand(folder)}"
                ) from None
            except OSError as err:
                raise _cache_error(folder, err) from None
            if got != expected:
                raise DataError(
                    f"downloaded {url} has SHA-256 {got}, expected {expected}: the file is corrupt or changed; "
                    f"{kept}; retry, or {_by_hand(folder)}"
                )
            try:
                os.chmod(partial, 0o644)  # the temporary file was private
                os.replace(partial, dest)
            except OSError as err:
                raise _cache_error(folder, err) from None
        except BaseException:  # also KeyboardInterrupt: never leave a partial file
            partial.unlink(missing_ok=True)
            raise
    return dest


def cached_or_download(
    url: str = DEFAULT_URL,
    sha256: str = ARCHIVE_SHA256,
    *,
    cache: Optional[PathLike] = None,
    progress: bool = True,
    timeout: float = TIMEOUT_S,
) -> Path:
    """The cached ``cifar-10-binary.tar.gz``, downloaded into the cache first if absent.

    A cached file is used as it is (it was verified when it was downloaded)
    and no request is made. Otherwise the cache folder is created and locked,
    checked again (another process may have just downloaded it), and the
    archive is downloaded with `download`.

    Args:
      url: where to download it from (data.url).
      sha256: its expected SHA-256 (data.sha256); the official digest by default.
      cache: the cache folder; None: `cache_dir()`.
      progress: show a tqdm progress bar while downloading.
      timeout: socket timeout in seconds, for the connection and each read.

    Returns:
      The path of the archive in the cache folder.

    Raises:
      DataError: as `download`, or the cache folder cannot be created; one line.
    """
    expected = _checked_sha256(sha256)
    folder = Path(cache).expanduser() if cache else cache_dir()
    target = folder / ARCHIVE_NAME
    if target.is_file():
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _cache_error(folder, err) from None
    with _locked(folder):
        if not target.is_file():
            download(url, target, expected, progress=progress, timeout=timeout)
    return target
