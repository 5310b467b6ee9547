"""The loader: fallback without a compiler, FASTREG_BACKEND=reference, concurrent first builds,
stale and held build locks, and the ahead-of-time build check.

Scenarios that need a fresh process run in subprocesses on a copy of the package without any
ahead-of-time library (so they exercise the JIT path) and with their own FASTREG_CACHE_DIR.
Only the concurrency scenario compiles (once, about 20 s of CPU).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import fastreg
from fastreg import _build, _loader

# Runs in the child: imports fastreg, runs dropout forward and backward through the ops and the
# reference with the same generator seed, and prints what happened as one JSON line.
CHILD = textwrap.dedent(
    """
    import json, warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch, fastreg
        from fastreg import _loader
        from fastreg.reference import dropout as ref

        x = torch.randn(5, 37, dtype=torch.float64)
        grad = torch.randn(5, 37, dtype=torch.float64)
        results = {}
        for mask_mode in (0, 1, 2):
            out, mask, state = torch.ops.fastreg.dropout(x, 0.3, mask_mode, torch.Generator().manual_seed(11))
            r_out, r_mask, r_state = ref.dropout(x, 0.3, mask_mode, torch.Generator().manual_seed(11))
            back = torch.ops.fastreg.dropout_backward(grad, mask, state, 0.3, mask_mode)
            r_back = ref.dropout_backward(grad, r_mask, r_state, 0.3, mask_mode)
            results[mask_mode] = bool(torch.equal(out, r_out) and torch.equal(back, r_back))
        module = fastreg.Dropout(0.5)
        y = module(x.clone().requires_grad_())
        y.sum().backward()
        rows = fastreg.backends()
    print(json.dumps({
        "matches_reference": results,
        "package": fastreg.__file__,
        "mode": _loader.STATE.mode,
        "backends": sorted({row["backend"] for row in rows}),
        "why": sorted({row["why"] for row in rows}),
        "fallback_warnings": [str(w.message) for w in caught if issubclass(w.category, _loader.FastregFallbackWarning)],
    }))
    """
)


@pytest.fixture(scope="module")
def jit_only_package(tmp_path_factory) -> Path:
    """A copy of the fastreg package and its sources without an ahead-of-time library."""
    root = tmp_path_factory.mktemp("jit-only")
    skip = shutil.ignore_patterns("__pycache__", "_C*.so", "_build_info.json")
    shutil.copytree(_build.PACKAGE_DIR, root / "fastreg", ignore=skip)
    sources = _build.source_root()
    if not sources.is_relative_to(_build.PACKAGE_DIR):  # a checkout: csrc/ beside the package
        shutil.copytree(sources, root / "csrc", ignore=skip)
    return root


def child_env(package_root: Path, cache_dir: Path, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTREG_")}
    env.update(
        PYTHONPATH=str(package_root),
        FASTREG_CACHE_DIR=str(cache_dir),
        CUDA_VISIBLE_DEVICES="",  # a CPU-only build: seconds, not minutes of nvcc
        PYTHONWARNINGS="default",
    )
    env.update(overrides)
    return env


def run_child(package_root: Path, env: dict[str, str], timeout: float = 600) -> tuple[dict, str]:
    result = subprocess.run(
        [sys.executable, "-c", CHILD], cwd=package_root, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"child failed:\n{result.stderr[-4000:]}"
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(report["package"]).is_relative_to(package_root)  # the copy, not an installed fastreg
    return report, result.stderr


def test_without_compiler_ops_use_reference_with_one_warning(jit_only_package, tmp_path):
    env = child_env(jit_only_package, tmp_path / "cache", CXX="/nonexistent/c++")
    report, _ = run_child(jit_only_package, env)
    assert report["matches_reference"] == {"0": True, "1": True, "2": True}
    assert report["mode"] == "reference"
    assert report["backends"] == ["reference"]
    assert len(report["fallback_warnings"]) == 1, report["fallback_warnings"]
    assert "/nonexistent/c++" in report["fallback_warnings"][0]  # it says why
    assert not list((tmp_path / "cache").rglob("*.so"))


def test_backend_reference_forces_reference_without_warning(jit_only_package, tmp_path):
    env = child_env(jit_only_package, tmp_path / "cache", FASTREG_BACKEND="reference")
    report, _ = run_child(jit_only_package, env)
    assert report["matches_reference"] == {"0": True, "1": True, "2": True}
    assert report["backends"] == ["reference"]
    assert report["why"] == ["FASTREG_BACKEND=reference"]
    assert report["fallback_warnings"] == []
    assert not (tmp_path / "cache").exists()  # nothing was built


def test_invalid_backend_is_rejected(monkeypatch):
    monkeypatch.setenv("FASTREG_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTREG_BACKEND"):
        _loader.requested_backend()


def test_build_failure_is_summarised_by_its_first_error():
    log = "\n".join(
        [
            "[1/3] c++ -c a.cpp",
            "FAILED: a.o",
            "a.cpp:106:62: error: no match for 'operator+'",
            "  106 |   x + 1.0;",
            "b.h:57:14: note: the ABI for passing parameters with 32-byte alignment has changed in GCC 4.6",
            "ninja: build stopped: subcommand failed.",
        ]
    )
    summary = _loader._failure_summary(log)
    assert summary.startswith("a.cpp:106:62: error: no match") and "106 |" in summary
    assert _loader._failure_summary("no compiler\nfound") == "no compiler | found"


@pytest.mark.parametrize(("value", "backend"), [("", "auto"), (" ", "auto"), ("Reference", "reference")])
def test_backend_value_blank_means_the_default(monkeypatch, value, backend):
    monkeypatch.setenv("FASTREG_BACKEND", value)
    assert _loader.requested_backend() == backend


def cpu_build_dir(package, env) -> Path:
    """The JIT build folder a child process with this environment would use."""
    probe = subprocess.run(
        [sys.executable, "-c", "from fastreg import _loader; print(_loader.jit_build_dir(False))"],
        cwd=package,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(probe.stdout.strip())


@pytest.fixture(scope="module")
def concurrent_first_builds(jit_only_package, tmp_path_factory):
    """Two processes start on an empty cache whose build folder holds the `lock` file of a killed
    build (torch's own lock, which would otherwise block torch's build forever)."""
    cache = tmp_path_factory.mktemp("cache")
    env = child_env(jit_only_package, cache)
    build_dir = cpu_build_dir(jit_only_package, env)
    build_dir.mkdir(parents=True)
    stale_lock = build_dir / "lock"
    stale_lock.write_text("")
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD],
            cwd=jit_only_package,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outcomes = []
    for child in children:
        stdout, stderr = child.communicate(timeout=900)
        outcomes.append((child.returncode, stdout, stderr))
    return {"build_dir": build_dir, "stale_lock": stale_lock, "outcomes": outcomes}


def test_concurrent_first_builds_both_work_and_compile_once(concurrent_first_builds):
    reports = []
    for returncode, stdout, stderr in concurrent_first_builds["outcomes"]:
        assert returncode == 0, stderr[-4000:]
        reports.append(json.loads(stdout.strip().splitlines()[-1]))
    for report in reports:
        assert report["mode"] == "jit"
        assert report["backends"] == ["kernel (jit)"]
        assert report["matches_reference"] == {"0": True, "1": True, "2": True}
    compiled = [stderr for _, _, stderr in concurrent_first_builds["outcomes"] if "fastreg: compiling" in stderr]
    assert len(compiled) == 1
    assert len(list(concurrent_first_builds["build_dir"].glob("*.so"))) == 1


def test_stale_build_lock_is_reported_with_its_path(concurrent_first_builds):
    stale_lock = concurrent_first_builds["stale_lock"]
    warned = [
        message
        for _, stdout, _ in concurrent_first_builds["outcomes"]
        for message in json.loads(stdout.strip().splitlines()[-1])["fallback_warnings"]
    ]
    assert len(warned) == 1, warned  # the process that built found it; the other waited for that build
    assert f"stale build lock {stale_lock}" in warned[0]
    assert not stale_lock.exists()


def test_build_lock_held_too_long_gives_up_naming_the_lock(jit_only_package, tmp_path):
    """A build that hangs while holding the lock makes others fall back after the timeout."""
    env = child_env(jit_only_package, tmp_path / "cache", FASTREG_BUILD_LOCK_TIMEOUT="1")
    build_dir = cpu_build_dir(jit_only_package, env)
    build_dir.mkdir(parents=True)
    lock_path = build_dir / ".fastreg-build.lock"
    with open(lock_path, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        report, stderr = run_child(jit_only_package, env)
    assert report["mode"] == "reference"
    assert report["matches_reference"] == {"0": True, "1": True, "2": True}
    assert len(report["fallback_warnings"]) == 1
    assert str(lock_path) in report["fallback_warnings"][0]
    assert "waiting for another build" in stderr


def test_aot_mismatch_names_both_versions_and_the_fix():
    info = {"mode": "aot", "torch": "1.13.0", "cuda": "11.7", "source_hash": _build.source_hash()}
    message = _loader.aot_mismatch(info)
    assert message is not None
    assert "1.13.0" in message and torch.__version__ in message
    assert "--no-build-isolation" in message
    assert _loader.aot_mismatch({**info, "torch": torch.__version__, "cuda": torch.version.cuda}) is None


def test_aot_sources_changed_detects_edited_sources():
    assert _loader.aot_sources_changed({"source_hash": "0" * 16})
    assert not _loader.aot_sources_changed({"source_hash": _build.source_hash()})


def test_aot_mismatch_warns_once_at_import(tmp_path, monkeypatch):
    info_file = tmp_path / "_build_info.json"
    info_file.write_text(json.dumps({"mode": "aot", "torch": "0.0.1", "cuda": None, "cuda_kernels": False}))
    monkeypatch.setattr(_loader, "BUILD_INFO_FILE", info_file)
    monkeypatch.setattr(_loader, "_WARNED", set())
    monkeypatch.delenv("FASTREG_BACKEND", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _loader.check_aot_build_at_import()
        _loader.check_aot_build_at_import()
    messages = [str(w.message) for w in caught if issubclass(w.category, _loader.FastregFallbackWarning)]
    assert len(messages) == 1 and "0.0.1" in messages[0]


def test_aot_build_is_used_when_present():
    """Where the package was built ahead of time (CI's editable install), that library is loaded."""
    info = _loader.aot_build_info()
    if info is None or _loader.requested_backend() == "reference":
        pytest.skip("no ahead-of-time build here")
    assert _loader.aot_mismatch(info) is None, _loader.aot_mismatch(info)
    if _loader.aot_sources_changed(info):
        pytest.skip("csrc/ edited since the ahead-of-time build: the JIT build is expected")
    fastreg.backends()
    assert _loader.STATE.mode == "aot"
    assert Path(_loader.STATE.library).parent == _build.PACKAGE_DIR


def test_link_flags_name_the_libstdcxx_that_torch_loaded():
    """The extension must share torch's libstdc++: a static copy inside it (what a g++ that links
    libstdc++ statically would make) crashed on the first TORCH_CHECK message it formatted."""
    if not Path("/proc/self/maps").is_file():
        pytest.skip("needs Linux's /proc")
    loaded = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "libstdc++.so" in line}
    extra = [flag for flag in _build.link_flags() if flag not in _build.LINK_FLAGS]
    assert len(extra) == 1 and extra[0] in loaded, (extra, loaded)


def test_compiled_library_depends_on_the_shared_libstdcxx():
    if _loader.requested_backend() == "reference" or shutil.which("ldd") is None:
        pytest.skip("needs the compiled library and ldd")
    fastreg.backends()
    if _loader.STATE.library is None:
        pytest.skip("no compiled library in this process")
    linked = subprocess.run(["ldd", _loader.STATE.library], capture_output=True, text=True, check=True).stdout
    assert "libstdc++.so" in linked, linked


FIRST_CALLS = {
    "dropout": "fastreg.functional.dropout(x, 0.5)",
    "batch_norm": "fastreg.BatchNorm2d(3)(x.view(2, 3, 2, 2))",
    "weight_penalty": "fastreg.weight_penalty([x], l2=0.1)",
}


@pytest.mark.skipif(_loader.requested_backend() == "reference", reason="the compiled library's autograd")
@pytest.mark.parametrize("function", list(FIRST_CALLS))
def test_a_process_first_call_records_the_compiled_librarys_autograd_node(function):
    """The first call in a process loads the compiled library before its op dispatches, so it
    records the C++ node (less host time; dropout's tangents) and not the reference's Python
    one, which the lazy load would otherwise leave on that call's graph."""
    call = FIRST_CALLS[function]
    script = f"import torch, fastreg; x = torch.randn(24, requires_grad=True); print(({call}).grad_fn.name())"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip().startswith("fastreg::"), result.stdout
