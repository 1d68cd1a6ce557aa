"""An autouse fixture that fails any test leaving asyncio tasks, RTCPeerConnections, open files or
CUDA memory behind (registered from conftest.py).

- Tasks: pytest-asyncio runs each test's loop in an `asyncio.Runner`, whose `close()` cancels
  what is still pending, hiding leaks. A wrapper around `asyncio.runners._cancel_all_tasks` notes
  those tasks (main thread only: the servers' own loops run in threads and are checked by
  `tests/test_leaks.py` with footprints) before they are cancelled.
- Peer connections: `RTCPeerConnection.__init__` is wrapped (once aiortc is imported) to keep a
  weak set of every instance; one made during the test and not closed at its end is a leak.
- Open files: the entries of /proc/self/fd, before and after.
- CUDA: `torch.cuda.memory_allocated()` where torch is imported and CUDA initialised.

Higher-scoped fixtures (module servers) are set up before and torn down after this function
fixture, so they are part of the baseline. Things that end asynchronously (a peer connection
closing on a server thread) get `GRACE_S` to settle. A test may opt out with
`@pytest.mark.allow_leaks("why")`.
"""

from __future__ import annotations

import asyncio
import asyncio.runners
import gc
import os
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

GRACE_S = 5.0
TASK_GRACE_S = 5.0
CUDA_SLACK_BYTES = int(os.environ.get("LIPSTREAM_LEAK_CUDA_BYTES", str(1 << 20)))

_pcs: weakref.WeakSet[Any] = weakref.WeakSet()
_pc_patched = False
_leaked_tasks: list[str] = []
_original_cancel_all = asyncio.runners._cancel_all_tasks  # type: ignore[attr-defined]


def _recording_cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    if threading.current_thread() is threading.main_thread():
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        if pending:  # let tasks that are winding down (a closed peer's) finish first
            loop.run_until_complete(asyncio.wait(pending, timeout=TASK_GRACE_S))
        for task in pending:
            if not task.done():
                _leaked_tasks.append(_describe_task(task))
    _original_cancel_all(loop)


asyncio.runners._cancel_all_tasks = _recording_cancel_all  # type: ignore[attr-defined]


def _warm_process_globals() -> None:
    """Create the process-wide descriptors that libraries open once and keep (libuv's signal
    pipe, made by the first uvloop loop: uvicorn's servers use uvloop where it is installed),
    so the first test to start a server is not blamed for them."""
    try:
        import uvloop
    except ImportError:
        return
    uvloop.new_event_loop().close()


_warm_process_globals()


def _describe_task(task: asyncio.Task[Any]) -> str:
    coro = task.get_coro()
    where = getattr(coro, "__qualname__", repr(coro))
    frames = task.get_stack(limit=8)
    at = " <- ".join(f"{f.f_code.co_name}:{f.f_lineno}" for f in reversed(frames))
    return f"{task.get_name()} ({where}, at {at})"


def _patch_peer_connections() -> None:
    """Track RTCPeerConnection instances from now on (only once aiortc is imported)."""
    global _pc_patched
    if _pc_patched or "aiortc" not in sys.modules:
        return
    import aiortc

    cls = aiortc.RTCPeerConnection
    original = cls.__init__

    def tracked_init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        _pcs.add(self)

    cls.__init__ = tracked_init  # type: ignore[method-assign]
    _pc_patched = True


def open_peer_connections() -> list[Any]:
    return [pc for pc in list(_pcs) if pc.connectionState != "closed"]


def mapped_files() -> set[str]:
    """Files mapped into memory now (/proc/self/maps)."""
    out = set()
    with open("/proc/self/maps") as fh:
        for line in fh:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].startswith("/"):
                out.add(parts[5].strip())
    return out


def open_fds() -> dict[int, str]:
    """Open file descriptors and what they point at, leaving out those of memory-mapped files
    (an `mmap` keeps a descriptor; a loaded avatar's frames are mapped while it is loaded, a
    cache whose life is the server's, not the test's)."""
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the listing's own fd, or one closed meanwhile
    mapped = mapped_files()
    return {fd: target for fd, target in out.items() if target not in mapped}


def cuda_allocated() -> int | None:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    torch.cuda.synchronize()
    return int(torch.cuda.memory_allocated())


def _problems(
    fds0: dict[int, str], pcs0: set[int], cuda0: int | None, tasks: list[str]
) -> list[str]:
    problems = []
    if tasks:
        problems.append(f"asyncio tasks still pending at the end: {tasks}")
    pcs = [pc for pc in open_peer_connections() if id(pc) not in pcs0]
    if pcs:
        states = [pc.connectionState for pc in pcs]
        problems.append(f"{len(pcs)} RTCPeerConnection(s) not closed (states {states})")
    fds = open_fds()
    new = {fd: target for fd, target in fds.items() if fds0.get(fd) != target}
    if len(fds) > len(fds0):
        problems.append(f"{len(fds) - len(fds0)} more open files: {sorted(set(new.values()))}")
    cuda = cuda_allocated()
    if cuda0 is not None and cuda is not None and cuda - cuda0 > CUDA_SLACK_BYTES:
        problems.append(f"CUDA memory grew by {cuda - cuda0} bytes")
    return problems


@pytest.fixture(autouse=True)
def leakcheck(request: pytest.FixtureRequest) -> Iterator[None]:
    if request.node.get_closest_marker("allow_leaks") is not None:
        yield
        return
    _patch_peer_connections()
    gc.collect()
    fds0 = open_fds()
    pcs0 = {id(pc) for pc in open_peer_connections()}
    cuda0 = cuda_allocated()
    del _leaked_tasks[:]
    yield
    _patch_peer_connections()
    tasks = list(_leaked_tasks)
    deadline = time.monotonic() + GRACE_S
    while True:
        gc.collect()
        problems = _problems(fds0, pcs0, cuda0, tasks)
        if not problems or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    del _leaked_tasks[:]
    if problems:
        pytest.fail("leak check: " + "; ".join(problems), pytrace=False)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "allow_leaks(reason): the leak check (tests/leakcheck.py) skips this test"
    )
