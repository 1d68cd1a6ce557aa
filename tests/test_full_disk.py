"""A real server whose avatars folder is on a small filesystem (a 30 MB tmpfs mounted for the
test) that fills up: uploads answer 507 "no space left on the device" (not a malformed
multipart, not a 500), a preparation that runs out of space ends `failed` with that reason,
nothing half-written is left behind, and a restart cleans what a crash left.

Mounting needs root (CAP_SYS_ADMIN); where it is not permitted the test is skipped, saying so.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import pytest

from bench.loopback import ServerThread
from engines.preview import PreviewEngine
from server.app import create_app
from server.settings import Settings

DISK = "30m"
PAGE = 4096
NO_SPACE = "no space left on the device"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK},mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(
            "mounting a small tmpfs needs root with CAP_SYS_ADMIN, which this runner lacks: "
            f"{done.stderr.strip() or done.returncode}"
        )
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], check=False)


def leave_free(disk: Path, nbytes: int) -> None:
    """Fill the filesystem so that exactly the pages holding `nbytes` stay free."""
    filler = disk / "filler"
    with contextlib.suppress(FileNotFoundError):
        filler.unlink()
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    keep = -(-nbytes // PAGE) * PAGE
    assert free > keep, (free, keep)
    with open(filler, "wb") as fh:
        os.posix_fallocate(fh.fileno(), 0, free - keep)
    st = os.statvfs(disk)
    assert st.f_bavail * st.f_frsize == keep


def astronaut_jpeg() -> bytes:
    from skimage.data import astronaut

    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(astronaut(), cv2.COLOR_RGB2BGR))
    assert ok
    return jpeg.tobytes()


def serve(root: Path) -> ServerThread:
    settings = Settings(engine="preview", avatars_dir=root)
    return ServerThread(create_app(settings, engine=PreviewEngine(), reason="test")).start()


def upload(base: str, data: bytes, name: str = "astronaut") -> httpx.Response:
    return httpx.post(
        f"{base}/v1/avatars",
        files={"file": ("face.jpg", data, "image/jpeg")},
        data={"name": name},
        timeout=30,
    )


def final_status(base: str, avatar_id: str, within: float = 30.0) -> dict:
    deadline = time.monotonic() + within
    while True:
        info = httpx.get(f"{base}/v1/avatars/{avatar_id}").json()
        if info["status"] in ("ready", "failed") or time.monotonic() > deadline:
            return dict(info)
        time.sleep(0.05)


def leftovers(root: Path) -> list[str]:
    """Anything in the store that is neither an avatar's own file nor the uploads folder."""
    found = []
    for entry in root.iterdir():
        if entry.name == ".uploads":
            found += [f".uploads/{p.name}" for p in entry.iterdir()]
        elif not entry.name.startswith("av_"):
            found.append(entry.name)
        else:
            found += [
                f"{entry.name}/{p.name}"
                for p in entry.iterdir()
                if p.name not in ("meta.json", "frames.npy", "boxes.npz", "masks.npz")
            ]
    return found


def test_a_full_disk_answers_507_and_leaves_nothing_half_written(small_disk: Path) -> None:
    root = small_disk / "avatars"
    jpeg = astronaut_jpeg()
    srv = serve(root)
    try:
        base = srv.base_url
        # no room even for the upload
        leave_free(small_disk, 0)
        r = upload(base, jpeg)
        assert r.status_code == 507 and NO_SPACE in r.json()["detail"], r.text
        assert leftovers(root) == [] and not list(root.glob("av_*"))
        # room for the upload, none for the new avatar's metadata
        leave_free(small_disk, len(jpeg))
        r = upload(base, jpeg)
        assert r.status_code == 507 and NO_SPACE in r.json()["detail"], r.text
        assert leftovers(root) == [] and not list(root.glob("av_*"))
        # room for the upload and the metadata, none for the prepared frames
        leave_free(small_disk, len(jpeg) + PAGE)
        r = upload(base, jpeg, name="too big")
        assert r.status_code == 202, r.text
        info = final_status(base, r.json()["id"])
        assert info["status"] == "failed" and NO_SPACE in info["error"], info
        assert leftovers(root) == [], leftovers(root)
        failed_id = info["id"]
        # space again: an upload is prepared as usual
        (small_disk / "filler").unlink()
        r = upload(base, jpeg, name="fits")
        assert r.status_code == 202, r.text
        assert final_status(base, r.json()["id"])["status"] == "ready"
    finally:
        srv.stop()
    # what a crash in the middle of writes leaves: a new avatar's folder holding only a
    # temporary file, a temporary folder, an upload
    half = root / "av_00000000000f0011"
    half.mkdir()
    (half / ".meta.json.0a1b2c3d.tmp").write_bytes(b"{")
    (root / ".tmp-0123456789ab").mkdir()
    (root / ".uploads" / "upload-0123").write_bytes(b"x")
    srv = serve(root)
    try:
        listed = {a["id"]: a for a in httpx.get(f"{srv.base_url}/v1/avatars").json()["avatars"]}
        assert half.name not in listed and leftovers(root) == [], leftovers(root)
        assert listed[failed_id]["status"] == "failed"
        for avatar_id in listed:
            assert httpx.delete(f"{srv.base_url}/v1/avatars/{avatar_id}").status_code == 200
        assert httpx.get(f"{srv.base_url}/v1/avatars").json()["avatars"] == []
        assert [p.name for p in root.iterdir()] in ([], [".uploads"])
    finally:
        srv.stop()
