"""FASTREG_* settings: a value that fastreg cannot use as given is an error that names the
setting, where it is read (the first op for the loader's and the kernels', ``setup.py`` for the
install's), never a silent fallback to the default."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fastreg import _loader

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_a_bad_lock_timeout_is_named_by_the_first_op_not_by_import(value):
    """A bad FASTREG_BUILD_LOCK_TIMEOUT broke ``import fastreg`` with a bare float() error."""
    code = textwrap.dedent(
        """
        import torch, fastreg
        try:
            torch.ops.fastreg.dropout(torch.ones(4), 0.5, 0, None)
        except ValueError as error:
            print(error)
        """
    )
    env = dict(os.environ, FASTREG_BUILD_LOCK_TIMEOUT=value, FASTREG_BACKEND="auto")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"FASTREG_BUILD_LOCK_TIMEOUT must be a number of seconds >= 0, got {value!r}"


def test_lock_timeout_takes_seconds_and_defaults_to_half_an_hour(monkeypatch):
    for value, seconds in (("", 1800.0), ("  ", 1800.0), ("0", 0.0), ("2.5", 2.5)):
        monkeypatch.setenv("FASTREG_BUILD_LOCK_TIMEOUT", value)
        assert _loader.lock_timeout_s() == seconds
    monkeypatch.delenv("FASTREG_BUILD_LOCK_TIMEOUT")
    assert _loader.lock_timeout_s() == 1800.0


@pytest.mark.parametrize(
    "setting, value",
    [
        ("FASTREG_CPU_ISA", "AVX2"),  # C++ compares exactly: this capped nothing
        ("FASTREG_CPU_ISA", "sse"),
        ("FASTREG_CPU_POOL_MB", "1G"),  # strtol read 1
        ("FASTREG_CPU_POOL_MB", "-5"),
        ("FASTREG_CPU_CACHE_MB", "32MB"),  # atoll read 32
        ("FASTREG_CUDA_LARGE_KERNEL_ARGS", "off"),  # only "0" turned it off
        ("FASTREG_FORCE_CUDA", "true"),  # only "1" forced
        ("FASTREG_VERBOSE_BUILD", "yes"),
    ],
)
def test_settings_that_cpp_or_the_build_would_misread_are_refused_by_name(monkeypatch, setting, value):
    monkeypatch.setenv(setting, value)
    with pytest.raises(ValueError, match=f"^{setting} must be .*got {value!r}$"):
        _loader.check_settings()


@pytest.mark.parametrize(
    "setting, values",
    [
        ("FASTREG_CPU_ISA", ["avx512", "avx2", "base", ""]),
        ("FASTREG_CPU_POOL_MB", ["0", "1024", ""]),
        ("FASTREG_CPU_CACHE_MB", ["0", "32", ""]),
        ("FASTREG_CUDA_LARGE_KERNEL_ARGS", ["0", "1", ""]),
        ("FASTREG_FORCE_CUDA", ["0", "1", ""]),
        ("FASTREG_VERBOSE_BUILD", ["0", "1", ""]),
    ],
)
def test_documented_setting_values_are_taken(monkeypatch, setting, values):
    for value in values:
        monkeypatch.setenv(setting, value)
        _loader.check_settings()


@pytest.mark.skipif(not (REPO / "setup.py").is_file(), reason="needs the source tree")
@pytest.mark.parametrize("setting", ["FASTREG_BUILD_OPS", "FASTREG_FORCE_CUDA"])
def test_install_settings_other_than_0_or_1_stop_setup_py(setting, tmp_path):
    # "yes" was read as unset: FASTREG_BUILD_OPS=yes did not insist on the build it asked for
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTREG_")}
    env[setting] = "yes"
    result = subprocess.run(
        [sys.executable, str(REPO / "setup.py"), "--version"], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert f"fastreg setup: {setting} must be 0 or 1 (or unset), got 'yes'" in result.stderr
    env[setting] = "0"
    result = subprocess.run(
        [sys.executable, str(REPO / "setup.py"), "--version"], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
