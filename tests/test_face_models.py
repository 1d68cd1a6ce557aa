"""S3FD and BiSeNet: the published checkpoints' layout, strict loading of random weights of that
layout, MuseTalk's detection decoding and parsing input; the face weights' table, download
checks and random stand-ins."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from avatars.musetalk_faces import bisenet, s3fd
from avatars.musetalk_faces import weights as fw

REPO = Path(__file__).resolve().parents[1]

# -- the published layouts, written out from the reference definitions (net_s3fd.s3fd and
# face_parsing model.BiSeNet / resnet.Resnet18): (in, out, kernel) of every convolution.
S3FD_CONVS = {
    "conv1_1": (3, 64, 3), "conv1_2": (64, 64, 3), "conv2_1": (64, 128, 3),
    "conv2_2": (128, 128, 3), "conv3_1": (128, 256, 3), "conv3_2": (256, 256, 3),
    "conv3_3": (256, 256, 3), "conv4_1": (256, 512, 3), "conv4_2": (512, 512, 3),
    "conv4_3": (512, 512, 3), "conv5_1": (512, 512, 3), "conv5_2": (512, 512, 3),
    "conv5_3": (512, 512, 3), "fc6": (512, 1024, 3), "fc7": (1024, 1024, 1),
    "conv6_1": (1024, 256, 1), "conv6_2": (256, 512, 3), "conv7_1": (512, 128, 1),
    "conv7_2": (128, 256, 3),
    "conv3_3_norm_mbox_conf": (256, 4, 3), "conv3_3_norm_mbox_loc": (256, 4, 3),
    "conv4_3_norm_mbox_conf": (512, 2, 3), "conv4_3_norm_mbox_loc": (512, 4, 3),
    "conv5_3_norm_mbox_conf": (512, 2, 3), "conv5_3_norm_mbox_loc": (512, 4, 3),
    "fc7_mbox_conf": (1024, 2, 3), "fc7_mbox_loc": (1024, 4, 3),
    "conv6_2_mbox_conf": (512, 2, 3), "conv6_2_mbox_loc": (512, 4, 3),
    "conv7_2_mbox_conf": (256, 2, 3), "conv7_2_mbox_loc": (256, 4, 3),
}  # fmt: skip
S3FD_NORMS = {"conv3_3_norm": (256, 10.0), "conv4_3_norm": (512, 8.0), "conv5_3_norm": (512, 5.0)}

BISENET_SHAPES = {
    "cp.resnet.conv1.weight": (64, 3, 7, 7),
    "cp.resnet.layer1.1.conv2.weight": (64, 64, 3, 3),
    "cp.resnet.layer2.0.downsample.0.weight": (128, 64, 1, 1),
    "cp.resnet.layer2.0.downsample.1.running_var": (128,),
    "cp.resnet.layer4.1.bn2.num_batches_tracked": (),
    "cp.arm16.conv.conv.weight": (128, 256, 3, 3),
    "cp.arm32.conv.conv.weight": (128, 512, 3, 3),
    "cp.arm32.conv_atten.weight": (128, 128, 1, 1),
    "cp.arm32.bn_atten.weight": (128,),
    "cp.conv_head32.conv.weight": (128, 128, 3, 3),
    "cp.conv_avg.conv.weight": (128, 512, 1, 1),
    "ffm.convblk.conv.weight": (256, 256, 1, 1),
    "ffm.conv1.weight": (64, 256, 1, 1),
    "ffm.conv2.weight": (256, 64, 1, 1),
    "conv_out.conv.conv.weight": (256, 256, 3, 3),
    "conv_out.conv_out.weight": (19, 256, 1, 1),
    "conv_out16.conv.conv.weight": (64, 128, 3, 3),
    "conv_out32.conv_out.weight": (19, 64, 1, 1),
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("face-models")
    fw.make_random(root, "tiny", seed=0)
    return root


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    from skimage.data import astronaut

    return np.ascontiguousarray(astronaut()[..., :3], dtype=np.uint8)


def _renamed(state: dict[str, torch.Tensor], old: str, new: str) -> dict[str, torch.Tensor]:
    return {(new if k == old else k): v for k, v in state.items()}


# -- S3FD -------------------------------------------------------------------------------
def test_s3fd_full_has_the_published_layout() -> None:
    state = s3fd.build_s3fd("full").state_dict()
    expected: dict[str, tuple[int, ...]] = {}
    for name, (cin, cout, k) in S3FD_CONVS.items():
        expected[f"{name}.weight"] = (cout, cin, k, k)
        expected[f"{name}.bias"] = (cout,)
    for name, (ch, _) in S3FD_NORMS.items():
        expected[f"{name}.weight"] = (ch,)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    for name, (_, scale) in S3FD_NORMS.items():
        assert torch.all(state[f"{name}.weight"] == scale)
    # 22.46 M float32 parameters: the published file is 89,843,225 bytes with its pickle framing
    assert 0 < fw.FACE_WEIGHTS[0].size - 4 * sum(v.numel() for v in state.values()) < 10_000


def test_s3fd_random_weights_load_strictly_and_detect(
    tiny_dir: Path, astronaut: np.ndarray
) -> None:
    model = s3fd.load_s3fd(tiny_dir / fw.S3FD_FILE, "tiny")
    frames = np.stack([astronaut[::4, ::4], astronaut[::4, ::-4]])  # 128 x 128
    dets = s3fd.detect_faces(model, frames, batch=2)
    assert len(dets) == 2 and any(len(d) for d in dets)
    for d in dets:
        assert d.dtype == np.float32 and d.ndim == 2 and d.shape[1] == 5
        assert np.all(d[:, 4] > s3fd.KEEP_SCORE) and np.all(np.diff(d[:, 4]) <= 0)  # best first
        assert np.all(np.isfinite(d))
        for i in range(len(d)):  # NMS left no pair overlapping more than 0.3
            for j in range(i + 1, len(d)):
                assert _iou_plus1(d[i], d[j]) <= s3fd.NMS_IOU + 1e-6
    one_by_one = s3fd.detect_faces(model, frames, batch=1)
    for a, b in zip(dets, one_by_one, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


def test_s3fd_renamed_key_fails_with_the_names(tiny_dir: Path, tmp_path: Path) -> None:
    state = torch.load(tiny_dir / fw.S3FD_FILE, weights_only=True)
    bad = tmp_path / "s3fd.pth"
    torch.save(_renamed(state, "fc7_mbox_loc.weight", "fc7_mbox_loc.kernel"), bad)
    with pytest.raises(RuntimeError) as err:
        s3fd.load_s3fd(bad, "tiny")
    assert "fc7_mbox_loc.weight" in str(err.value) and "fc7_mbox_loc.kernel" in str(err.value)
    with pytest.raises(RuntimeError, match="size mismatch"):
        s3fd.load_s3fd(tiny_dir / fw.S3FD_FILE, "full")


def _iou_plus1(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
    return float(w * h / (area(a) + area(b) - w * h))


def _reference_detect(olist: list[torch.Tensor], frame: int) -> np.ndarray:
    """MuseTalk's batch_detect + detect_from_batch for one frame, position by position."""
    rows = []
    for i in range(len(olist) // 2):
        cls = torch.softmax(olist[2 * i], dim=1)[frame, 1].numpy()
        reg = olist[2 * i + 1][frame].numpy()
        stride = 2 ** (i + 2)
        for h, w in zip(*np.where(cls > 0.05), strict=True):
            axc, ayc, a = stride / 2 + w * stride, stride / 2 + h * stride, stride * 4.0
            cx, cy = axc + reg[0, h, w] * 0.1 * a, ayc + reg[1, h, w] * 0.1 * a
            bw, bh = a * math.exp(reg[2, h, w] * 0.2), a * math.exp(reg[3, h, w] * 0.2)
            rows.append([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2, cls[h, w]])
    dets = np.array(rows, np.float64).reshape(-1, 5)
    order = dets[:, 4].argsort()[::-1]
    keep: list[int] = []
    for i in order:
        if all(_iou_plus1(dets[i], dets[k]) <= 0.3 for k in keep):
            keep.append(int(i))
    return np.array([dets[k] for k in keep if dets[k, 4] > 0.5]).reshape(-1, 5)


def test_s3fd_decoding_matches_musetalk_position_by_position(astronaut: np.ndarray) -> None:
    torch.manual_seed(1)
    model = s3fd.build_s3fd("tiny").eval()
    frames = np.ascontiguousarray(astronaut[::4, ::4][None])  # 128 x 128
    ours = s3fd.detect_faces(model, frames)[0]
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() - torch.tensor(s3fd.MEAN).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        ref = _reference_detect(model(x), 0)
    assert len(ref) > 0
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-3)


def test_s3fd_bgr_feeds_the_flipped_channels(astronaut: np.ndarray) -> None:
    torch.manual_seed(2)
    model = s3fd.build_s3fd("tiny").eval()
    frame = np.ascontiguousarray(astronaut[::4, ::4][None])
    flipped = np.ascontiguousarray(frame[..., ::-1])
    a = s3fd.detect_faces(model, frame, bgr=True)[0]
    b = s3fd.detect_faces(model, flipped)[0]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_nms_keeps_the_best_of_overlapping_boxes() -> None:
    dets = np.array(
        [
            [0, 0, 9, 9, 0.6],
            [1, 1, 10, 10, 0.9],  # overlaps the first (IoU 0.68): wins
            [50, 50, 60, 60, 0.7],  # apart: kept
            [0, 5, 9, 14, 0.8],  # overlaps the second by 50 of 150 px: IoU 0.33 > 0.3
        ],
        np.float32,
    )
    assert s3fd.nms(dets, 0.3) == [1, 2]
    assert s3fd.nms(dets, 0.5) == [1, 3, 2]
    assert s3fd.nms(np.zeros((0, 5), np.float32)) == []


def test_detect_faces_rejects_bad_frames() -> None:
    model = s3fd.build_s3fd("tiny").eval()
    with pytest.raises(ValueError, match="uint8"):
        s3fd.detect_faces(model, np.zeros((1, 64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="size"):
        s3fd.build_s3fd("huge")


# -- BiSeNet ----------------------------------------------------------------------------
def test_bisenet_full_has_the_published_layout() -> None:
    state = bisenet.build_bisenet("full").state_dict()
    for key, shape in BISENET_SHAPES.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(k.startswith("cp.sp") or ".sp." in k for k in state)  # no spatial path
    # BatchNorms (5 entries each): 20 in the ResNet, 11 after it; bias-free convolutions:
    # 20 in the ResNet, 16 after it
    bns = [k for k in state if k.endswith("running_mean")]
    convs = [k for k in state if k.endswith("weight") and state[k].ndim == 4]
    assert (len(bns), len(convs), len(state)) == (31, 36, 31 * 5 + 36)
    resnet = bisenet.resnet18_file_state(bisenet.build_bisenet("full").cp.resnet)
    assert tuple(resnet["fc.weight"].shape) == (1000, 512) and "layer4.1.bn2.weight" in resnet
    assert not any("num_batches_tracked" in k for k in resnet)
    size = 4 * sum(v.numel() for k, v in resnet.items())
    assert 0 < fw.FACE_WEIGHTS[3].size - size < 40_000  # 46,827,520 bytes published


def test_bisenet_random_weights_load_strictly_and_parse(
    tiny_dir: Path, astronaut: np.ndarray
) -> None:
    model = bisenet.load_bisenet(tiny_dir / fw.BISENET_FILE, "tiny")
    backbone = bisenet.build_bisenet("tiny").cp.resnet
    bisenet.load_resnet18(backbone, torch.load(tiny_dir / fw.RESNET18_FILE, weights_only=True))
    crops = [astronaut[60:260, 150:300], astronaut[:100, :80]]
    maps = bisenet.parse_faces(model, crops, batch=2)
    assert maps.shape == (2, 512, 512) and maps.dtype == np.uint8
    assert maps.max() < bisenet.N_CLASSES and len(np.unique(maps)) > 1
    np.testing.assert_array_equal(maps[1:], bisenet.parse_faces(model, crops[1:], batch=1))


def test_bisenet_renamed_key_fails_with_the_names(tiny_dir: Path, tmp_path: Path) -> None:
    state = torch.load(tiny_dir / fw.BISENET_FILE, weights_only=True)
    bad = tmp_path / "79999_iter.pth"
    torch.save(_renamed(state, "ffm.conv1.weight", "ffm.conv_1.weight"), bad)
    with pytest.raises(RuntimeError) as err:
        bisenet.load_bisenet(bad, "tiny")
    assert "ffm.conv1.weight" in str(err.value) and "ffm.conv_1.weight" in str(err.value)
    resnet = torch.load(tiny_dir / fw.RESNET18_FILE, weights_only=True)
    with pytest.raises(RuntimeError, match=re.escape("layer1.0.bn1.weight")):
        bisenet.load_resnet18(
            bisenet.build_bisenet("tiny").cp.resnet,
            _renamed(resnet, "layer1.0.bn1.weight", "layer1.0.bn1.gamma"),
        )


def test_bisenet_input_is_musetalks_preprocessing(astronaut: np.ndarray) -> None:
    crop = np.ascontiguousarray(astronaut[50:290, 140:320])
    ours = bisenet.preprocess(crop).numpy()
    img = np.asarray(
        Image.fromarray(crop).resize((512, 512), Image.Resampling.BILINEAR), np.float64
    )
    ref = (img / 255 - np.array(bisenet.MEAN)) / np.array(bisenet.STD)
    assert ours.shape == (3, 512, 512)
    np.testing.assert_allclose(ours, ref.transpose(2, 0, 1), atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        bisenet.preprocess(crop.astype(np.float32))


# -- weights ----------------------------------------------------------------------------
def test_face_weights_table_names_the_layout_and_hashes() -> None:
    rels = [f.rel for f in fw.FACE_WEIGHTS]
    assert rels == [fw.S3FD_FILE, fw.DWPOSE_FILE, fw.BISENET_FILE, fw.RESNET18_FILE]
    for f in fw.FACE_WEIGHTS:
        assert re.fullmatch(r"[0-9a-f]{64}", f.sha256) and f.size > 1_000_000
        assert all("/" in repo for repo, _ in f.sources) and len(f.sources) >= 2
        hub_hash = re.search(r"-([0-9a-f]{8,})\.pth$", f.rel)  # torch hub names: a hash prefix
        if hub_hash:
            assert f.sha256.startswith(hub_hash.group(1))


def test_face_weights_problem_and_random_stand_ins(tiny_dir: Path, tmp_path: Path) -> None:
    problem = fw.face_weights_problem(tmp_path)
    assert problem is not None and "lipstream models download" in problem
    assert all(f.rel in problem for f in fw.FACE_WEIGHTS)
    assert fw.face_weights_problem(tiny_dir) is None
    (tmp_path / fw.BISENET_FILE).parent.mkdir(parents=True)
    (tmp_path / fw.BISENET_FILE).write_bytes(b"")
    assert fw.BISENET_FILE in (fw.face_weights_problem(tmp_path) or "")
    with pytest.raises(ValueError, match="tiny"):
        fw.make_random(tmp_path, "medium")


def _spec_for(path: Path, rel: str) -> fw.FaceWeightsFile:
    return fw.FaceWeightsFile(
        rel, path.stat().st_size, fw.sha256_of(path), (("nobody/nothing", "x.pth"),), "here"
    )


def test_download_keeps_published_files_and_checks_them(tmp_path: Path) -> None:
    rel = "face-parse-bisent/x.pth"
    (tmp_path / rel).parent.mkdir(parents=True)
    (tmp_path / rel).write_bytes(b"published bytes" * 100)
    spec = _spec_for(tmp_path / rel, rel)
    assert fw.download(tmp_path, (spec,)) == [tmp_path / rel]  # no network needed
    assert fw.file_problem(tmp_path / rel, spec) is None
    (tmp_path / rel).write_bytes(b"published bytez" * 100)  # same size, other bytes
    assert "SHA-256" in (fw.file_problem(tmp_path / rel, spec) or "")
    (tmp_path / rel).write_bytes(b"short")
    assert "size 5 bytes" in (fw.file_problem(tmp_path / rel, spec) or "")


def test_download_offline_names_every_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    spec = fw.FACE_WEIGHTS[2]
    with pytest.raises(fw.FaceWeightsError) as err:
        fw.download(tmp_path, (spec,))
    msg = str(err.value)
    assert spec.rel in msg and "HF_HUB_OFFLINE is set" in msg
    assert all(repo in msg for repo, _ in spec.sources)
    assert "lipstream models download" in msg and not (tmp_path / spec.rel).exists()


def test_cli_download_offline_keeps_the_stand_ins_and_names_the_sources(
    tiny_models_dir: Path, tiny_dir: Path, tmp_path: Path
) -> None:
    root = tmp_path / "models"
    shutil.copytree(tiny_models_dir, root)  # MuseTalk's files: kept, so the face models come next
    shutil.copytree(tiny_dir, root, dirs_exist_ok=True)
    before = (root / fw.S3FD_FILE).read_bytes()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    code = "from lipstream.commands.models import models_app; models_app()"
    proc = subprocess.run(
        [sys.executable, "-c", code, "download", "--dir", str(root)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 1, proc.stderr
    assert "HF_HUB_OFFLINE is set" in proc.stderr and "Traceback" not in proc.stderr
    assert all(repo in proc.stderr for repo, _ in fw.FACE_WEIGHTS[0].sources)
    assert (root / fw.S3FD_FILE).read_bytes() == before  # not replaced by nothing
