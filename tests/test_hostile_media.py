"""Hostile uploads over REST: every file in tests/hostile/media is refused (4xx, or 202 and then
"failed" with a readable message) except a real picture under a misleading name, and no file
outside the upload area is opened or created, whatever the file or its name says.

Playlists and concat scripts point at a sentinel folder (`@SENTINEL@` in the files is replaced
by its path) holding real media. Two witnesses watch it: inotify (catches opens by FFmpeg's C
code as well as Python's) and a `sys.addaudithook` hook on Python's `open`. Names with path
traversal go into the upload's filename, the avatar name and the URL ids.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from avatars.decode import DecodeLimits
from avatars.store import AvatarStore
from bench.loopback import ServerThread
from engines.preview import PreviewEngine
from server.app import create_app
from server.avatar_service import AvatarService
from server.media.pictures import IdleFrames
from server.metrics import ServerMetrics
from server.session.devices import Devices, Unit
from server.session.worker import FrameWorker
from server.settings import Settings

MEDIA = Path(__file__).parent / "hostile" / "media"
ACCEPTED = {"astronaut_named.mp4"}  # a real JPEG under a video's name: the name is ignored
IN_ACCESS, IN_OPEN = 0x1, 0x20

_audited: list[str] = []
_audit_prefix: list[str] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "open" and _audit_prefix and args and isinstance(args[0], str | bytes | Path):
        path = os.fsdecode(args[0])
        if path.startswith(_audit_prefix[0]):
            _audited.append(path)


sys.addaudithook(_audit)  # audit hooks cannot be removed: it only records while a prefix is set


class Inotify:
    """Open/access events under one folder (Linux inotify through libc)."""

    def __init__(self, folder: Path) -> None:
        self.libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if self.libc.inotify_add_watch(self.fd, os.fsencode(folder), IN_ACCESS | IN_OPEN) < 0:
            raise OSError(ctypes.get_errno(), "inotify_add_watch")

    def events(self) -> list[tuple[int, str]]:
        out: list[tuple[int, str]] = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return out
            pos = 0
            while pos < len(data):
                _wd, mask, _cookie, length = struct.unpack_from("iIII", data, pos)
                name = data[pos + 16 : pos + 16 + length].rstrip(b"\0").decode()
                out.append((mask, name))
                pos += 16 + length

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[tuple[Path, Inotify]]:
    folder = tmp_path / "sentinel"
    folder.mkdir()
    shutil.copy(MEDIA / "astronaut_named.mp4", folder / "secret.png")
    shutil.copy(MEDIA / "truncated.mp4", folder / "secret.mp4")
    watch = Inotify(folder)
    watch.events()  # drop the copies' own events
    _audit_prefix[:] = [str(folder)]
    _audited.clear()
    try:
        yield folder, watch
    finally:
        _audit_prefix.clear()
        watch.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    settings = Settings(engine="preview", avatars_dir=tmp_path / "avatars", max_pending_avatars=64)
    srv = ServerThread(create_app(settings, engine=PreviewEngine(), reason="test")).start()
    try:
        yield srv
    finally:
        srv.stop()


def hostile_files(sentinel: Path) -> list[tuple[str, bytes]]:
    files = []
    for path in sorted(MEDIA.iterdir()):
        data = path.read_bytes().replace(b"@SENTINEL@", os.fsencode(sentinel))
        files.append((path.name, data))
    return files


def wait_final(http: httpx.Client, avatar_id: str, within: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        info = http.get(f"/v1/avatars/{avatar_id}").json()
        if info["status"] in ("ready", "failed"):
            return dict(info)
        time.sleep(0.05)
    raise TimeoutError(f"avatar {avatar_id} still {info['status']}")


def tree(root: Path, *skip: Path) -> set[str]:
    """Every path under `root`, not looking inside `skip` (listing the sentinel folder would
    itself show up as an open of it)."""
    out = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        for p in folder.iterdir():
            if p in skip:
                continue
            out.add(str(p.relative_to(root)))
            if p.is_dir() and not p.is_symlink():
                stack.append(p)
    return out


def test_hostile_uploads_are_refused_and_open_nothing_outside(
    server: ServerThread, sentinel: tuple[Path, Inotify], tmp_path: Path
) -> None:
    folder, watch = sentinel
    avatars_root = server.app.state.avatars.store.root
    before = tree(tmp_path, avatars_root, folder)
    outcomes: dict[str, str] = {}
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        submitted = []
        for name, data in hostile_files(folder):
            r = http.post(
                "/v1/avatars",
                files={"file": (name, data, "application/octet-stream")},
                data={"name": name[:60]},
            )
            if r.status_code == 202:
                submitted.append((name, r.json()["id"]))
            else:
                assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
                assert r.json()["detail"], name
                outcomes[name] = f"{r.status_code}: {r.json()['detail']}"
        for name, avatar_id in submitted:
            final = wait_final(http, avatar_id)
            if name in ACCEPTED:
                assert final["status"] == "ready", (name, final)
                outcomes[name] = "ready"
                continue
            assert final["status"] == "failed", (name, final)
            error = final["error"]
            assert error and "Traceback" not in error and "internal" not in error, (name, error)
            assert str(folder) not in error, "the error message echoes a local path"
            outcomes[name] = f"failed: {error}"
    print("\n" + "\n".join(f"  {k:32s} {v[:90]}" for k, v in sorted(outcomes.items())))
    assert len(outcomes) == len(list(MEDIA.iterdir()))
    assert watch.events() == [], "a file in the sentinel folder was opened"
    assert _audited == [], _audited
    assert tree(tmp_path, avatars_root, folder) == before, (
        "files appeared outside the avatars folder"
    )
    uploads = server.app.state.avatars.uploads_dir
    assert not uploads.exists() or not any(uploads.iterdir()), "uploads were left behind"


def test_a_final_status_is_written_after_the_upload_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a client can see ("ready", "failed") comes after the clean-up, so the check above
    ("uploads were left behind", made as soon as the last status is final) cannot race it.
    Every final status written is recorded with whether an upload was still on disk."""
    store = AvatarStore(tmp_path / "avatars")
    engine = PreviewEngine()
    devices = Devices([Unit("cpu", engine, FrameWorker(engine))], max_sessions=4)
    service = AvatarService(store, devices, ServerMetrics(), DecodeLimits(), IdleFrames())
    service.startup()
    written: list[tuple[str, bool]] = []

    def uploads_left() -> bool:
        return service.uploads_dir.exists() and any(service.uploads_dir.iterdir())

    set_status, save = store.set_status, store.save

    def recording_set_status(avatar_id: str, status: str, **kwargs: Any) -> None:
        if status in ("ready", "failed"):
            written.append((status, uploads_left()))
        set_status(avatar_id, status, **kwargs)

    def recording_save(avatar: Any) -> None:
        written.append(("ready", uploads_left()))
        save(avatar)

    monkeypatch.setattr(store, "set_status", recording_set_status)
    monkeypatch.setattr(store, "save", recording_save)
    try:
        for i, name in enumerate(("astronaut_named.mp4", "truncated.mp4")):
            service.uploads_dir.mkdir(parents=True, exist_ok=True)
            upload = service.uploads_dir / f"upload-{i}"
            upload.write_bytes((MEDIA / name).read_bytes())
            avatar_id = service.submit(upload, f"a{i}", 0)["id"]
            deadline = time.monotonic() + 60
            while service.get(avatar_id)["status"] not in ("ready", "failed"):
                assert time.monotonic() < deadline, f"{name} is still being prepared"
                time.sleep(0.01)
    finally:
        service.shutdown()
    assert written == [("ready", False), ("failed", False)]


TRAVERSAL = [
    "../../../../sentinel/pwned",
    "..\\..\\..\\sentinel\\pwned",
    "/etc/passwd",
    "....//....//sentinel/pwned",
    "%2e%2e%2f%2e%2e%2fsentinel%2fpwned",
    "sentinel/\x00pwned.png",
    "x" * 5000,
    "CON",
    ".",
    "",
]


def test_path_traversal_names_and_ids_touch_nothing_outside(
    server: ServerThread, sentinel: tuple[Path, Inotify], tmp_path: Path
) -> None:
    folder, watch = sentinel
    avatars_root = server.app.state.avatars.store.root
    before = tree(tmp_path, avatars_root, folder)
    png = (MEDIA / "truncated.png").read_bytes()
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        ids = []
        for name in TRAVERSAL:
            r = http.post("/v1/avatars", files={"file": (name, png, "image/png")})
            assert r.status_code in (202, 400), (name, r.text)  # 400: a 5000-byte header
            if r.status_code == 202:
                ids.append(r.json()["id"])
            r = http.post(
                "/v1/avatars", files={"file": ("a.png", png, "image/png")}, data={"name": name}
            )
            assert r.status_code in (202, 400), (name, r.text)  # a display name, never a path
            if r.status_code == 202:
                ids.append(r.json()["id"])
        for avatar_id in ids:
            assert avatar_id.startswith("av_") and "/" not in avatar_id
            assert wait_final(http, avatar_id)["status"] == "failed"
        for bad in (
            "..%2F..%2Fsentinel",
            "%2e%2e",
            "..",
            "av_..%2F..%2Fsentinel%2Fsecret.png",
            "%2Fetc%2Fpasswd",
            "av_" + "0" * 500,
            "av_0123456789abcdeg",
        ):
            for method in ("GET", "DELETE"):
                r = http.request(method, f"/v1/avatars/{bad}")
                assert r.status_code in (404, 405), (method, bad, r.status_code)
                r = http.request(method, f"/v1/sessions/{bad}")
                assert r.status_code in (404, 405), (method, bad, r.status_code)
    assert watch.events() == []
    assert _audited == []
    assert sorted(p.name for p in folder.iterdir()) == ["secret.mp4", "secret.png"]
    assert len(ids) >= len(TRAVERSAL)
    assert tree(tmp_path, avatars_root, folder) == before
