"""Builds jaxsam's oneDNN convolution library from the source in this package, once per version.

The `cpu-fast` extra (`pip install -e ".[cpu-fast]"`) installs oneDNN's
libraries and headers from PyPI (`onednn-cpu-gomp`, `onednn-devel-cpu-gomp`);
the first use of `jaxsam.models.onednn_conv` then compiles
`jaxsam/_csrc/onednn_conv.cc` with the C++ compiler (`$CXX`, else `g++`)
against them and jaxlib's FFI headers (`jax.ffi.include_dir()`), into

    $JAXSAM_ONEDNN_DIR, else $JAXSAM_CACHE/onednn_conv, else ~/.cache/jaxsam/onednn_conv

under a name keyed by the source, jaxlib, oneDNN and compiler versions and the
flags, so a changed source or an upgraded jaxlib builds anew and a stale
library is never loaded. A file lock makes concurrent first uses (pytest
workers, study jobs) build it once. The build writes a temporary file and
renames it: an interrupted build leaves nothing half-written.

    python -m jaxsam.models.onednn_build           # build now (or say where it is); exit 1 with one line if it cannot
    python -m jaxsam.models.onednn_build --force   # build again
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata

SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_csrc", "onednn_conv.cc")
ONEDNN_PACKAGES = ("onednn-cpu-gomp", "onednn-devel-cpu-gomp")
ONEDNN_VERSION = "2023.2.0"
INSTALL_HINT = 'pip install -e ".[cpu-fast]"'
FLAGS = ("-O2", "-std=c++17", "-shared", "-fPIC")
DIR_ENV_VAR = "JAXSAM_ONEDNN_DIR"
LIBRARY_ENV_VAR = "JAXSAM_ONEDNN_CONV_LIB"  # a prebuilt library: loaded as is, never built


class BuildError(RuntimeError):
    """The library cannot be built here; str() is one line that names the fix."""


def build_dir() -> str:
    """Where built libraries live (module docstring)."""
    if os.environ.get(DIR_ENV_VAR):
        return os.path.expanduser(os.environ[DIR_ENV_VAR])
    return os.path.join(os.path.expanduser(os.environ.get("JAXSAM_CACHE") or "~/.cache/jaxsam"), "onednn_conv")


def _installed_file(package: str, suffix: str) -> str | None:
    """The path of the file of an installed distribution whose recorded name ends with `suffix`, or None."""
    try:
        files = metadata.files(package) or []
    except metadata.PackageNotFoundError:
        return None
    for f in files:
        if str(f).replace(os.sep, "/").endswith(suffix):
            return os.path.normpath(str(f.locate()))
    return None


def _onednn_prefix() -> tuple[str, str]:
    """(include dir, lib dir) of the pip-installed oneDNN, or BuildError naming the install.

    Found through the installed distributions' file records, so an environment
    that sees another's site-packages (a .pth, --system-site-packages) finds
    them too; else under `sys.prefix`.
    """
    header = _installed_file(ONEDNN_PACKAGES[1], "include/oneapi/dnnl/dnnl.hpp")
    library = _installed_file(ONEDNN_PACKAGES[0], "libdnnl.so.3") or _installed_file(ONEDNN_PACKAGES[0], "libdnnl.so")
    if header and library and os.path.isfile(header) and os.path.exists(library):
        return os.path.dirname(os.path.dirname(os.path.dirname(header))), os.path.dirname(library)
    include, lib = os.path.join(sys.prefix, "include"), os.path.join(sys.prefix, "lib")
    if os.path.isfile(os.path.join(include, "oneapi", "dnnl", "dnnl.hpp")) and any(
        os.path.exists(os.path.join(lib, name)) for name in ("libdnnl.so", "libdnnl.so.3")
    ):
        return include, lib
    raise BuildError(f"oneDNN's headers and library are not installed for {sys.executable} ({INSTALL_HINT})")


def _compiler() -> str:
    cxx = os.environ.get("CXX") or "g++"
    if shutil.which(cxx) is None:
        raise BuildError(f"no C++ compiler ({cxx!r} not found): install g++ or set CXX, then {INSTALL_HINT}")
    return cxx


def _versions(cxx: str) -> str:
    import jax
    import jaxlib

    dnnl = ",".join(f"{p}={_version(p)}" for p in ONEDNN_PACKAGES)
    try:
        compiler = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        compiler = ""
    return f"jax={jax.__version__} jaxlib={jaxlib.__version__} {dnnl} {compiler.splitlines()[:1]} {' '.join(FLAGS)}"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "none"


def library_path() -> str:
    """The path the library for this source and these versions has (built or not).

    Raises:
      BuildError: oneDNN or the compiler is missing (one line naming the fix).
    """
    _onednn_prefix()
    cxx = _compiler()
    with open(SOURCE, "rb") as f:
        key = hashlib.sha256(f.read() + _versions(cxx).encode()).hexdigest()[:16]
    return os.path.join(build_dir(), f"libjaxsam_onednn_conv-{key}.so")


@contextlib.contextmanager
def _locked(folder: str):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build(force: bool = False, log=None) -> str:
    """Returns the path of the built library, compiling it first if needed (or if `force`).

    Args:
      force: compile even if the library for this key exists.
      log: called with one line before compiling (e.g. `print`); None: silent.

    Returns:
      The library's path.

    Raises:
      BuildError: oneDNN, the compiler or the compilation failed (one line; the
        compiler's own output is in the message's last part).
    """
    path = library_path()
    if os.path.exists(path) and not force:
        return path
    include, lib = _onednn_prefix()
    import jax

    folder = os.path.dirname(path)
    try:
        with _locked(folder):
            if os.path.exists(path) and not force:
                return path  # another process built it while this one waited
            if log is not None:
                log(f"onednn_conv: compiling {SOURCE} into {path} (once)")
            fd, tmp = tempfile.mkstemp(dir=folder, suffix=".so.tmp")
            os.close(fd)
            cmd = [_compiler(), *FLAGS, f"-I{jax.ffi.include_dir()}", f"-I{include}", SOURCE,
                   f"-L{lib}", "-ldnnl", f"-Wl,-rpath,{lib}", "-o", tmp]  # fmt: skip
            try:
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    errors = [line for line in done.stderr.splitlines() if "error" in line][:1]
                    raise BuildError(f"compiling {SOURCE} failed (exit {done.returncode}): "
                                     f"{errors[0] if errors else done.stderr.strip()[-200:]}")  # fmt: skip
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
    except OSError as err:
        raise BuildError(f"cannot write the oneDNN library into {folder} ({err.strerror}): "
                         f"set {DIR_ENV_VAR} to a writable folder") from err  # fmt: skip
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build jaxsam's oneDNN convolution library.")
    parser.add_argument("--force", action="store_true", help="compile even if it is built")
    args = parser.parse_args(argv)
    try:
        path = build(force=args.force, log=print)
    except BuildError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"built {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
