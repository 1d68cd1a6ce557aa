"""`engines.pipeline.toolchain`: what the compiled backend needs on the host (Triton, a C
compiler, Python's headers), and what backend selection (`engines.backends.select_backend`)
does without it.

The compiler and header checks run for real against this machine's PATH and a folder made
here. Backend selection needs a CUDA GPU to reach the compiled case: those tests say the GPU
is there (`torch.cuda.is_available` patched, as CI has none) and patch the toolchain's verdict.
"""

from __future__ import annotations

import logging
import os
import stat
import sysconfig
from pathlib import Path

import pytest
import torch

from engines.backends import select_backend
from engines.base import EngineError
from engines.pipeline import toolchain
from engines.tensorrt import engine as tensorrt


def _fake_compiler(folder: Path, name: str) -> None:
    exe = folder / name
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)


def test_no_compiler_on_path_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no gcc, clang or cc
    problem = toolchain.compiler_problem()
    assert problem is not None and "no C compiler" in problem and "gcc" in problem
    _fake_compiler(tmp_path, "clang")
    assert toolchain.compiler_problem() is None


def test_cc_must_resolve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CC", "/nonexistent/gcc-13")
    problem = toolchain.compiler_problem()
    assert problem is not None and "CC='/nonexistent/gcc-13'" in problem
    _fake_compiler(tmp_path, "mycc")
    monkeypatch.setenv("CC", "mycc -m64")  # a compiler with flags, as CC may hold
    assert toolchain.compiler_problem() is None


def test_missing_python_headers_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = sysconfig.get_paths

    def paths(*a, **k):  # type: ignore[no-untyped-def]
        return {**real(*a, **k), "include": str(tmp_path)}

    monkeypatch.setattr(sysconfig, "get_paths", paths)
    problem = toolchain.headers_problem()
    assert problem is not None and "Python.h" in problem and str(tmp_path) in problem
    (tmp_path / "Python.h").write_text("/* */\n")
    assert toolchain.headers_problem() is None


def test_compiled_problem_is_the_first_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(toolchain, "triton_problem", lambda: None)
    monkeypatch.setattr(toolchain, "compiler_problem", lambda: "no compiler")
    monkeypatch.setattr(toolchain, "headers_problem", lambda: "no headers")
    assert toolchain.compiled_problem() == "no compiler"
    monkeypatch.setattr(toolchain, "compiler_problem", lambda: None)
    assert toolchain.compiled_problem() == "no headers"
    monkeypatch.setattr(toolchain, "headers_problem", lambda: None)
    assert toolchain.compiled_problem() is None


def test_this_machine_has_what_the_suite_compiles_with() -> None:
    # the CPU suite compiles C++ with them already (inductor on the CPU, e.g.
    # tests/test_nhwc_norm.py's compiled norm): the checks must not cry wolf here
    assert toolchain.compiler_problem() is None, os.environ.get("PATH")
    assert toolchain.headers_problem() is None


@pytest.fixture
def gpu_without_trt(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CUDA GPU as far as backend selection asks (CI has none), TensorRT missing."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tensorrt, "tensorrt_problem", lambda: "tensorrt does not import")


@pytest.mark.usefixtures("gpu_without_trt")
def test_auto_falls_back_to_eager_without_a_compiler(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(toolchain, "compiled_problem", lambda: "no C compiler on PATH")
    with caplog.at_level(logging.WARNING, logger="engines.backends"):
        assert select_backend("auto") == "torch"
    assert "no C compiler on PATH" in caplog.text
    with pytest.raises(EngineError, match="backend compiled unavailable: no C compiler"):
        select_backend("compiled")
    assert select_backend("torch") == "torch"


@pytest.mark.usefixtures("gpu_without_trt")
def test_auto_picks_compiled_where_it_can_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(toolchain, "compiled_problem", lambda: None)
    assert select_backend("auto") == "compiled"
    assert select_backend("compiled") == "compiled"


@pytest.mark.usefixtures("gpu_without_trt")
def test_bench_refuses_a_backend_it_cannot_build_before_measuring(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`lipstream bench --stream-backends compiled` asks for compiled explicitly: without a
    compiler it fails at once, naming why, and not at the first compile minutes in."""
    from bench.options import BenchOptions, check_backends

    monkeypatch.setattr(toolchain, "compiled_problem", lambda: "no C compiler on PATH")
    eager = BenchOptions(backends=("torch",), stream_backends=("torch",))
    check_backends(eager)  # eager needs no compiler
    for opts in (
        BenchOptions(backends=("torch",), stream_backends=("compiled-gather40",)),
        BenchOptions(backends=("torch", "compiled-nofold"), stream_backends=("torch",)),
    ):
        with pytest.raises(EngineError, match="backend compiled unavailable: no C compiler"):
            check_backends(opts)
    with pytest.raises(EngineError, match="backend tensorrt unavailable"):
        check_backends(BenchOptions(backends=("tensorrt",), stream_backends=("torch",)))
