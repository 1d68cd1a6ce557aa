"""The on-disk avatar store: round trip, atomicity, ids, versions, and the `avatar` CLI."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from skimage.data import astronaut
from typer.testing import CliRunner

from avatars import store_check, store_io
from avatars.avatar import FORMAT_VERSION, Avatar
from avatars.store import (
    AvatarNotFoundError,
    AvatarNotReadyError,
    AvatarStore,
    AvatarStoreError,
)
from lipstream.commands.avatar import avatar_app


def make_avatar(
    avatar_id: str, n: int = 4, h: int = 48, w: int = 64, latents: bool = True
) -> Avatar:
    rng = np.random.default_rng(n)
    frames = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    face = np.tile(np.array([[10, 8, 40, 38]], np.int32), (n, 1))
    crop = np.tile(np.array([[2, 0, 48, 46]], np.int32), (n, 1))
    masks = [rng.integers(0, 256, (46, 46), dtype=np.uint8) for _ in range(n)]
    face[1] = crop[1] = -1  # frame 1 has no face
    masks[1] = np.zeros((0, 0), np.uint8)
    return Avatar(
        id=avatar_id,
        name="Test Person",
        fps=29.97,
        frames=frames,
        face_boxes=face,
        crop_boxes=crop,
        masks=masks,
        latents=rng.standard_normal((n, 8, 32, 32)).astype(np.float32) if latents else None,
        latents_key="vae-key-1" if latents else None,
        bbox_shift=3,
        meta={"prep_seconds_per_frame": 0.012, "detector": "haar"},
    )


def assert_same(a: Avatar, b: Avatar) -> None:
    assert (a.id, a.name, a.fps, a.bbox_shift) == (b.id, b.name, b.fps, b.bbox_shift)
    assert np.array_equal(a.frames, b.frames)
    assert np.array_equal(a.face_boxes, b.face_boxes)
    assert np.array_equal(a.crop_boxes, b.crop_boxes)
    assert len(a.masks) == len(b.masks)
    assert all(np.array_equal(x, y) for x, y in zip(a.masks, b.masks, strict=True))
    if a.latents is None:
        assert b.latents is None
    else:
        assert b.latents is not None and np.array_equal(a.latents, b.latents)
        assert a.latents_key == b.latents_key


def test_round_trip(tmp_path: Path) -> None:
    store = AvatarStore(tmp_path)
    avatar_id = store.new_id()
    original = make_avatar(avatar_id)
    store.save(original)
    loaded = store.load(avatar_id)
    assert_same(original, loaded)
    assert isinstance(loaded.frames, np.memmap) and not loaded.frames.flags.writeable
    assert loaded.has_face.tolist() == [True, False, True, True]
    assert loaded.meta["detector"] == "haar"
    info = store.info(avatar_id)
    assert info["status"] == "ready" and info["format_version"] == FORMAT_VERSION
    assert info["n_frames"] == 4 and info["size"] == [48, 64] and info["fps"] == 29.97
    assert info["prep_seconds_per_frame"] == 0.012 and info["latents_key"] == "vae-key-1"
    assert sorted(p.name for p in (tmp_path / avatar_id).iterdir()) == [
        "boxes.npz",
        "frames.npy",
        "latents.npy",
        "masks.npz",
        "meta.json",
    ]
    assert not isinstance(store.load(avatar_id, mmap=False).frames, np.memmap)


def test_create_status_then_save(tmp_path: Path) -> None:
    store = AvatarStore(tmp_path)
    avatar_id = store.create("Anna")
    assert store.info(avatar_id)["status"] == "pending"
    with pytest.raises(AvatarNotReadyError, match="pending"):
        store.load(avatar_id)
    store.set_status(avatar_id, "preparing", progress=0.4)
    assert store.info(avatar_id)["progress"] == 0.4
    created = store.info(avatar_id)["created"]
    store.save(make_avatar(avatar_id, latents=False))
    info = store.info(avatar_id)
    assert info["status"] == "ready" and info["progress"] == 1.0 and info["created"] == created
    assert store.load(avatar_id).latents is None
    store.set_status(avatar_id, "failed", error="boom")
    with pytest.raises(AvatarNotReadyError, match="boom"):
        store.load(avatar_id)
    with pytest.raises(ValueError):
        store.set_status(avatar_id, "done")


def test_save_latents_later(tmp_path: Path) -> None:
    store = AvatarStore(tmp_path)
    avatar_id = store.new_id()
    store.save(make_avatar(avatar_id, latents=False))
    latents = np.ones((4, 8, 32, 32), np.float32)
    store.save_latents(avatar_id, latents, key="vae-key-2")
    loaded = store.load(avatar_id)
    assert loaded.latents is not None and np.array_equal(loaded.latents, latents)
    assert loaded.latents_key == "vae-key-2"
    with pytest.raises(ValueError):
        store.save_latents(avatar_id, np.ones((3, 8, 32, 32), np.float32), key="k")


def test_failed_save_leaves_nothing_half_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = AvatarStore(tmp_path)
    ready_id = store.new_id()
    good = make_avatar(ready_id)
    store.save(good)
    real_write = store_io.write_npz

    def failing_write(path: Path, arrays: dict[str, np.ndarray]) -> None:
        if path.name == "masks.npz":
            raise OSError("disk full")
        real_write(path, arrays)

    monkeypatch.setattr(store_io, "write_npz", failing_write)
    # a new avatar: nothing appears under its id, no temporary folder is left
    new_id = store.new_id()
    with pytest.raises(OSError, match="disk full"):
        store.save(make_avatar(new_id, n=6))
    assert not (tmp_path / new_id).exists()
    assert [p.name for p in tmp_path.iterdir()] == [ready_id]
    # re-saving an existing avatar: the old files stay whole; it is no longer "ready"
    with pytest.raises(OSError, match="disk full"):
        store.save(make_avatar(ready_id, n=6))
    assert not list((tmp_path / ready_id).glob(".tmp-*"))
    assert np.array_equal(np.load(tmp_path / ready_id / "frames.npy"), good.frames)
    assert store.info(ready_id)["status"] == "preparing"
    assert store.recover() == [ready_id]
    assert store.info(ready_id)["status"] == "failed"


@pytest.mark.parametrize(
    "bad",
    [
        "../outside",
        "av_../../etc",
        "/etc/passwd",
        "av_0123",
        "AV_0123456789ABCDEF",
        "av_0123456789abcdef/../../x",
        "av_0123456789abcdeg",
        "",
    ],
)
def test_bad_ids_rejected(tmp_path: Path, bad: str) -> None:
    root = tmp_path / "store"
    store = AvatarStore(root)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "meta.json").write_text("{}")
    for call in (store.info, store.load, store.delete, store.path):
        with pytest.raises(AvatarNotFoundError):
            call(bad)
    with pytest.raises(AvatarNotFoundError):
        store.set_status(bad, "failed")
    with pytest.raises(AvatarNotFoundError):
        store.save(make_avatar(bad))
    assert (tmp_path / "outside" / "meta.json").exists()


def test_unknown_format_version_refused(tmp_path: Path) -> None:
    store = AvatarStore(tmp_path)
    avatar_id = store.new_id()
    store.save(make_avatar(avatar_id))
    meta_path = tmp_path / avatar_id / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = FORMAT_VERSION + 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(AvatarStoreError, match=r"format version 2.*add the avatar again"):
        store.load(avatar_id)


def test_corrupt_files_refused(tmp_path: Path) -> None:
    store = AvatarStore(tmp_path)
    avatar_id = store.new_id()
    store.save(make_avatar(avatar_id))
    (tmp_path / avatar_id / "masks.npz").write_bytes(b"garbage")
    with pytest.raises(AvatarStoreError, match="corrupt"):
        store.load(avatar_id)
    (tmp_path / avatar_id / "meta.json").write_text("{not json")
    with pytest.raises(AvatarStoreError, match="unreadable"):
        store.info(avatar_id)
    (listed,) = store.list()  # listed as failed with the reason, so it can be deleted
    assert listed["status"] == "failed" and "meta.json is unreadable" in listed["error"]


def test_list_resolve_delete(tmp_path: Path) -> None:
    store = AvatarStore(tmp_path)
    first = store.create("alice")
    time.sleep(0.002)
    second = store.create("bob")
    (tmp_path / "not-an-avatar").mkdir()
    assert [m["id"] for m in store.list()] == [first, second]
    assert store.resolve("bob") == second and store.resolve(first) == first
    store.create("bob")
    with pytest.raises(AvatarStoreError, match="2 avatars"):
        store.resolve("bob")
    store.delete(first)
    assert not (tmp_path / first).exists()
    with pytest.raises(AvatarNotFoundError):
        store.delete(first)
    with pytest.raises(AvatarNotFoundError):
        store.resolve("alice")
    with pytest.raises(ValueError):
        store.create("bad\nname")


def test_concurrent_status_updates(tmp_path: Path) -> None:
    store = AvatarStore(tmp_path)
    avatar_id = store.create("x")

    def bump(k: int) -> None:
        for i in range(20):
            store.set_status(avatar_id, "preparing", progress=(k * 20 + i) / 100)

    threads = [threading.Thread(target=bump, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    info = store.info(avatar_id)
    assert info["status"] == "preparing" and 0 <= info["progress"] <= 1
    assert not [p for p in (tmp_path / avatar_id).iterdir() if p.name != "meta.json"]


def test_npy_headers_parsed_under_the_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """numpy parses .npy headers with ast.literal_eval, which CPython 3.11 may fail on when two
    threads parse at once: every header the store reads is parsed under NPY_HEADER_LOCK."""
    store = AvatarStore(tmp_path)
    store.save(make_avatar("av_0000000000000011"))
    unlocked: list[str] = []
    real = store_check.npy_format.read_array_header_1_0

    def spy(fh: Any, *args: Any, **kwargs: Any) -> Any:
        if not store_check.NPY_HEADER_LOCK.locked():
            unlocked.append(getattr(fh, "name", "member"))
        return real(fh, *args, **kwargs)

    monkeypatch.setattr(store_check.npy_format, "read_array_header_1_0", spy)
    for mmap in (True, False):
        loaded = store.load("av_0000000000000011", mmap=mmap)
        assert loaded.latents is not None and len(loaded.masks) == 4
    assert not unlocked


def test_concurrent_loads_and_checks(tmp_path: Path) -> None:
    store = AvatarStore(tmp_path)
    ids = [f"av_00000000000000{k:02x}" for k in range(3)]
    for avatar_id in ids:
        store.save(make_avatar(avatar_id))
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for i in range(40):
                avatar_id = ids[(k + i) % len(ids)]
                assert store.load(avatar_id, mmap=bool(i % 2)).frames.shape == (4, 48, 64, 3)
                assert store.describe(avatar_id)["status"] == "ready"
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]


def test_load_720p_250_frames_fast(tmp_path: Path) -> None:
    n, h, w = 250, 720, 1280
    frames = np.zeros((n, h, w, 3), np.uint8)
    frames[:, ::7] = 200
    masks = [np.full((300, 300), 128, np.uint8) for _ in range(n)]
    avatar = Avatar(
        id="av_00000000000000fa",
        name="hd",
        fps=25.0,
        frames=frames,
        face_boxes=np.tile(np.array([[500, 200, 700, 420]], np.int32), (n, 1)),
        crop_boxes=np.tile(np.array([[450, 160, 750, 460]], np.int32), (n, 1)),
        masks=masks,
        latents=np.zeros((n, 8, 32, 32), np.float32),
        latents_key="k",
    )
    store = AvatarStore(tmp_path)
    store.save(avatar)
    del frames, avatar
    t0 = time.perf_counter()
    loaded = store.load("av_00000000000000fa")
    seconds = time.perf_counter() - t0
    assert loaded.frames.shape == (n, h, w, 3) and loaded.frames[3, 7, 5, 0] == 200
    assert seconds < 0.5, f"load took {seconds:.3f} s"


def write_png(path: Path) -> Path:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(astronaut(), cv2.COLOR_RGB2BGR))
    assert ok
    path.write_bytes(buf.tobytes())
    return path


def test_cli_add_list_rm(tmp_path: Path) -> None:
    runner = CliRunner()
    avatars = tmp_path / "avatars"
    models = tmp_path / "no-models"
    photo = write_png(tmp_path / "photo")  # no extension: the type comes from the bytes
    args = ["--avatars-dir", str(avatars)]
    added = runner.invoke(
        avatar_app, ["add", "Astro", str(photo), *args, "--models-dir", str(models)]
    )
    assert added.exit_code == 0, added.output
    assert "no latents stored" in added.output and "ms per frame" in added.output
    (avatar_id,) = [m["id"] for m in AvatarStore(avatars).list()]
    assert avatar_id in added.output
    assert AvatarStore(avatars).load(avatar_id).has_face.tolist() == [True]
    listed = runner.invoke(avatar_app, ["list", *args])
    assert listed.exit_code == 0 and "Astro" in listed.output and "ready" in listed.output
    grey = tmp_path / "grey.png"
    cv2.imwrite(str(grey), np.full((200, 200, 3), 127, np.uint8))
    refused = runner.invoke(
        avatar_app, ["add", "Grey", str(grey), *args, "--models-dir", str(models)]
    )
    assert refused.exit_code == 1 and "no face found" in refused.output
    removed = runner.invoke(avatar_app, ["rm", "Astro", *args])
    assert removed.exit_code == 0 and avatar_id in removed.output
    assert AvatarStore(avatars).list() == []
    missing = runner.invoke(avatar_app, ["rm", "Astro", *args])
    assert missing.exit_code == 1 and "no avatar" in missing.output
