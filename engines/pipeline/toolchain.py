"""What the `compiled` backend needs on the host besides the wheels.

torch.compile generates Triton kernels, and Triton builds a small C launcher for them when it
first runs, with the host's C compiler and Python's headers. A CUDA runtime image such as
`nvidia/cuda:*-runtime` has neither, and torch.compile then fails minutes into the warm-up
("Failed to find C compiler"). `compiled_problem` says so up front: `auto` picks `torch`
instead and `--backend compiled` fails with the fix named.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import sysconfig
from pathlib import Path

# what Triton looks for where CC is not set
COMPILERS = ("gcc", "clang", "cc")


def triton_problem() -> str | None:
    """Why Triton is missing (None: it is installed)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (torch's CUDA wheels bring it: pip install torch)"
    return None


def compiler_problem() -> str | None:
    """Why Triton would find no C compiler (None: `CC` or one of COMPILERS resolves)."""
    cc = os.environ.get("CC", "").strip()
    if cc:
        first = shlex.split(cc)[0]
        if shutil.which(first) is None:
            return f"CC={cc!r} is not an executable on PATH (Triton compiles with it)"
        return None
    if any(shutil.which(name) for name in COMPILERS):
        return None
    return (
        "no C compiler on PATH: Triton builds its kernel launchers with one "
        "(install gcc, e.g. apt-get install gcc libc6-dev, or set CC)"
    )


def headers_problem() -> str | None:
    """Why Triton's launchers could not include Python.h (None: the headers are there)."""
    include = sysconfig.get_paths().get("include") or ""
    if include and (Path(include) / "Python.h").is_file():
        return None
    return (
        f"no Python headers (Python.h under {include or '?'}): Triton's kernel launchers "
        "include them (install python3-dev)"
    )


def compiled_problem() -> str | None:
    """The first reason the compiled backend cannot build its kernels here (None: it can)."""
    return triton_problem() or compiler_problem() or headers_problem()
