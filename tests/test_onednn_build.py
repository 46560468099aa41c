"""Building the oneDNN convolution from source (jaxsam/models/onednn_build.py): keyed, locked, one-line failures."""

from __future__ import annotations

import os
import sys

import pytest

from jaxsam.models import onednn_build
from jaxsam.models.layers import conv_notice


def _onednn_installed() -> bool:
    try:
        onednn_build._onednn_prefix()
        onednn_build._compiler()
    except onednn_build.BuildError:
        return False
    return True


def test_without_a_compiler_the_build_is_one_line_naming_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(onednn_build, "_onednn_prefix", lambda: (str(tmp_path), str(tmp_path)))
    with pytest.raises(onednn_build.BuildError) as err:
        onednn_build.build()
    assert str(err.value) == (f"no C++ compiler ('{tmp_path / 'no-such-compiler'}' not found): install g++ or set CXX, "
                              'then pip install -e ".[cpu-fast]"')  # fmt: skip


def test_without_onednn_the_build_says_which_install_to_run(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    monkeypatch.setattr(onednn_build, "_installed_file", lambda package, suffix: None)
    monkeypatch.setenv(onednn_build.DIR_ENV_VAR, str(tmp_path / "out"))
    assert onednn_build.main([]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (f"error: oneDNN's headers and library are not installed for {sys.executable} "
                   '(pip install -e ".[cpu-fast]")\n')
    assert not (tmp_path / "out").exists()  # nothing written


def test_only_the_experimental_onednn_convolution_gets_a_one_line_notice():
    assert conv_notice("onednn").startswith("conv=onednn is experimental: on an AVX2 CPU its calls corrupted the heap")
    for impl in ("auto", "xla", "native"):
        assert conv_notice(impl) == ""


@pytest.mark.skipif(not _onednn_installed(), reason='oneDNN or g++ is not installed (pip install -e ".[cpu-fast]")')
def test_a_build_is_keyed_by_its_source_and_kept(monkeypatch, tmp_path):
    monkeypatch.setenv(onednn_build.DIR_ENV_VAR, str(tmp_path))
    logged = []
    path = onednn_build.build(log=logged.append)
    assert os.path.dirname(path) == str(tmp_path) and os.path.getsize(path) > 0 and len(logged) == 1
    stamp = os.stat(path).st_mtime_ns
    assert onednn_build.build(log=logged.append) == path and os.stat(path).st_mtime_ns == stamp and len(logged) == 1

    # A changed source has another key; one that does not compile is one line, and leaves no partial file.
    broken = tmp_path / "broken.cc"
    broken.write_text(open(onednn_build.SOURCE).read() + "\nthis is not C++;\n")
    monkeypatch.setattr(onednn_build, "SOURCE", str(broken))
    assert onednn_build.library_path() != path
    with pytest.raises(onednn_build.BuildError, match=r"^compiling .*broken\.cc failed \(exit 1\): .*error") as err:
        onednn_build.build()
    assert "\n" not in str(err.value)
    assert sorted(os.listdir(tmp_path)) == sorted([".lock", os.path.basename(path), "broken.cc"])


def test_a_model_asking_for_onednn_without_the_extension_is_refused(monkeypatch):
    import jax
    import jax.numpy as jnp

    from jaxsam.models import get_model, onednn_conv

    monkeypatch.setattr(onednn_conv, "AVAILABLE", False)
    monkeypatch.setattr(onednn_conv, "REASON", "the reason (the fix)")
    model = get_model("resnet18", width=0.0625, conv="onednn")
    with pytest.raises(ValueError, match=r"^conv='onednn' needs the oneDNN extension: the reason \(the fix\); or use "
                                         r"conv='auto'"):  # fmt: skip
        model.init(jax.random.key(0), jnp.ones((1, 32, 32, 3)), train=False)
