"""DWPose (RTMPose-l whole-body) in plain torch: the checkpoint's layout, strict loading, the
top-down affine crop of the whole frame, SimCC decoding and the 68 face landmarks."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from skimage.data import astronaut

from avatars.musetalk_faces.dwpose import (
    FLIP_INDICES,
    build_dwpose,
    crop_frame,
    crop_to_frame,
    decode_simcc,
    face_landmarks,
    frame_box,
    load_dwpose,
    load_dwpose_state,
    warp_matrix,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small convolutions on a shared CPU run faster on one thread than on many."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def full_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_dwpose("full")


@pytest.fixture(scope="module")
def full_state(full_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in full_model.state_dict().items()}


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_dwpose("tiny")


def test_full_layout_matches_rtmpose_l_wholebody(full_state: dict[str, torch.Tensor]) -> None:
    # 75 BatchNorms (3 stem + 4 stage convs + SPP's 2 + per CSP layer 3 + 3 per block x 18
    # blocks) x 5 tensors, 72 convs, 4 attention fcs x 2, and the head's 13 tensors.
    assert len(full_state) == 470
    assert sum(k.endswith("num_batches_tracked") for k in full_state) == 75
    assert {k.split(".")[0] for k in full_state} == {"backbone", "head"}
    shapes = {k: tuple(v.shape) for k, v in full_state.items()}
    assert shapes["backbone.stem.0.conv.weight"] == (32, 3, 3, 3)
    assert shapes["backbone.stem.2.conv.weight"] == (64, 32, 3, 3)
    assert shapes["backbone.stage1.1.blocks.2.conv2.depthwise_conv.conv.weight"] == (64, 1, 5, 5)
    assert shapes["backbone.stage3.1.blocks.5.conv2.pointwise_conv.bn.running_var"] == (256,)
    assert shapes["backbone.stage4.1.conv2.conv.weight"] == (1024, 2048, 1, 1)  # SPP
    assert shapes["backbone.stage4.2.attention.fc.bias"] == (1024,)
    assert shapes["backbone.stage4.2.final_conv.conv.weight"] == (1024, 1024, 1, 1)
    assert "backbone.stage4.2.blocks.3.conv1.conv.weight" not in shapes  # 3 blocks in stage 4
    # Head: 133 keypoints, 1024 -> 133 with a 7x7 conv, a 9x12 feature map flattened to 108,
    # GAU of 256 (e = 512, s = 128), SimCC bins 288 x 2 and 384 x 2.
    assert shapes["head.final_layer.weight"] == (133, 1024, 7, 7)
    assert shapes["head.final_layer.bias"] == (133,)
    assert shapes["head.mlp.0.g"] == (1,)
    assert shapes["head.mlp.1.weight"] == (256, 108)
    assert shapes["head.gau.uv.weight"] == (1152, 256)
    assert shapes["head.gau.o.weight"] == (256, 512)
    assert shapes["head.gau.gamma"] == shapes["head.gau.beta"] == (2, 128)
    assert shapes["head.gau.res_scale.scale"] == (256,)
    assert shapes["head.cls_x.weight"] == (576, 256)
    assert shapes["head.cls_y.weight"] == (768, 256)
    assert not any(k.startswith("head.") and "bias" in k for k in shapes if "final_layer" not in k)


def test_tiny_has_the_same_key_names(full_state: dict[str, torch.Tensor], tiny) -> None:
    assert list(tiny.state_dict()) == list(full_state)
    with pytest.raises(ValueError, match="unknown DWPose size"):
        build_dwpose("huge")


def test_strict_round_trip_both_forms(
    full_model: torch.nn.Module, full_state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    shifted = {k: v + 1 if v.is_floating_point() else v + 7 for k, v in full_state.items()}
    load_dwpose_state(full_model, {"state_dict": shifted, "meta": {"epoch": 270}})
    for key, value in full_model.state_dict().items():
        assert torch.equal(value, shifted[key]), key
    load_dwpose_state(full_model, full_state)  # the bare form
    assert all(torch.equal(full_model.state_dict()[k], v) for k, v in full_state.items())
    torch.manual_seed(1)
    tiny_state = build_dwpose("tiny").state_dict()
    for wrapped in (tiny_state, {"state_dict": tiny_state}):
        path = tmp_path / "dw.pth"
        torch.save(wrapped, path)
        loaded = load_dwpose(path, size="tiny").state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in tiny_state.items())


def test_renamed_or_missing_key_fails_clearly(
    full_model: torch.nn.Module, full_state: dict[str, torch.Tensor]
) -> None:
    renamed = dict(full_state)
    renamed["head.cls_x.weights"] = renamed.pop("head.cls_x.weight")
    with pytest.raises(ValueError, match=r"missing \['head.cls_x.weight'\].*unexpected"):
        load_dwpose_state(full_model, renamed)
    del renamed["head.cls_x.weights"]
    with pytest.raises(ValueError, match=r"missing \['head.cls_x.weight'\] \(1 in all\)"):
        load_dwpose_state(full_model, renamed)
    with pytest.raises(ValueError, match=r"shapes differ.*stem\.0\.conv\.weight \(32, 3, 3, 3\)"):
        load_dwpose_state(build_dwpose("tiny"), full_state)  # right names, wrong shapes
    with pytest.raises(ValueError, match="not a mapping"):
        load_dwpose_state(build_dwpose("tiny"), {"state_dict": [1, 2]})


def test_unreadable_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "dw.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_dwpose(bad, size="tiny")


def _touch(path: str) -> None:
    Path(path).write_text("ran")


class _Runs:
    """An object whose unpickling would call `_touch` (as a hostile checkpoint might)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return _touch, (self.marker,)


class HistoryBuffer:  # stands for mmengine's message-hub classes
    def __init__(self) -> None:
        self.values = [1.0, 2.0]


def test_training_checkpoint_loads_its_tensors_only(tmp_path: Path) -> None:
    """Like the published file: state_dict beside optimizer state, a message hub of foreign
    classes and numpy metadata. Only tensors are built; nothing in the pickle runs."""
    torch.manual_seed(3)
    state = build_dwpose("tiny").state_dict()
    marker = tmp_path / "ran"
    checkpoint = {
        "meta": {"dataset_meta": {"sigmas": np.ones(133, np.float32)}, "epoch": 270},
        "state_dict": state,
        "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 4e-3}]},
        "message_hub": {"log_scalars": {"train/loss": HistoryBuffer()}, "hook": _Runs(marker)},
    }
    path = tmp_path / "dw-ll_ucoco_384.pth"
    torch.save(checkpoint, path)
    with pytest.raises(Exception, match=r"(?i)weights.only|unsupported global"):
        torch.load(path, weights_only=True)
    loaded = load_dwpose(path, size="tiny").state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert not marker.exists()
    torch.save({"meta": {"x": _Runs(marker)}}, path)  # no state dict at all
    with pytest.raises(ValueError, match=r"does not match|no state dict"):
        load_dwpose(path, size="tiny")
    assert not marker.exists()


def test_frame_box_pads_and_fixes_the_aspect() -> None:
    center, scale = frame_box(640, 480)  # 800 x 600 padded; wider than 3:4 -> taller
    assert center.tolist() == [320.0, 240.0]
    assert scale == pytest.approx([800.0, 800.0 / 0.75])
    center, scale = frame_box(480, 640)  # 600 x 800 is exactly 3:4
    assert center.tolist() == [240.0, 320.0]
    assert scale.tolist() == [600.0, 800.0]


def test_warp_matrices_against_hand_computed_values() -> None:
    center, scale = frame_box(640, 480)
    # x' = (x - 320) * 288 / 800 + 144, y' = (y - 240) * 288 / 800 + 192
    forward = warp_matrix(center, scale, (288, 384))
    assert forward == pytest.approx(np.array([[0.36, 0, 28.8], [0, 0.36, 105.6]]), abs=1e-4)
    back = warp_matrix(center, scale, (288, 384), inverse=True)
    assert back == pytest.approx(
        np.array([[1 / 0.36, 0, -80.0], [0, 1 / 0.36, -293.3333]]), abs=1e-3
    )
    center, scale = frame_box(480, 640)
    forward = warp_matrix(center, scale, (288, 384))
    assert forward == pytest.approx(np.array([[0.48, 0, 28.8], [0, 0.48, 38.4]]), abs=1e-4)
    # A 90 degree turn maps the box's "up" onto the output's "up".
    turned = warp_matrix(np.array([0.0, 0.0]), np.array([100.0, 100.0]), (100, 100), rot=90)
    assert turned[:, :2] == pytest.approx(np.array([[0, 1], [-1, 0]]), abs=1e-6)


def test_crop_and_inverse_map_points_exactly() -> None:
    frame = np.zeros((480, 640, 3), dtype=np.uint8)
    frame[240, 320] = 255  # the box centre -> the crop centre (144, 192)
    frame[100:103, 50:53] = 255  # a 3x3 square centred on (51, 101)
    crop, center, scale = crop_frame(frame)
    assert crop.shape == (384, 288, 3)
    assert crop[192, 144].tolist() == [255, 255, 255]
    window = crop[130:155, 35:60, 0].astype(np.float64)  # around (47.16, 141.96)
    rows, cols = np.mgrid[130:155, 35:60]
    centroid = [(window * cols).sum() / window.sum(), (window * rows).sum() / window.sum()]
    assert centroid == pytest.approx([0.36 * 51 + 28.8, 0.36 * 101 + 105.6], abs=0.25)
    points = np.array([[0.0, 0.0], [639.0, 479.0], [51.0, 101.0], [320.0, 240.0]], np.float32)
    matrix = warp_matrix(center, scale, (288, 384))
    in_crop = cv2.transform(points[None], matrix)[0]
    assert crop_to_frame(in_crop, center, scale) == pytest.approx(points, abs=1e-3)
    inverse = warp_matrix(center, scale, (288, 384), inverse=True)
    assert cv2.transform(in_crop[None], inverse)[0] == pytest.approx(points, abs=1e-3)


def test_decode_simcc_argmax_split_ratio_and_invisible() -> None:
    x = np.full((1, 2, 576), -1.0, np.float32)
    y = np.full((1, 2, 768), -1.0, np.float32)
    x[0, 0, 101], y[0, 0, 50] = 3.0, 2.0
    x[0, 1, 7] = 0.5  # y's best is still <= 0: the keypoint is not found
    points, scores = decode_simcc(x, y)
    assert points[0, 0].tolist() == [50.5, 25.0]
    assert scores[0].tolist() == [2.0, -1.0]
    assert points[0, 1].tolist() == [-0.5, -0.5]


def test_flip_indices_mirror_the_wholebody_skeleton() -> None:
    assert len(FLIP_INDICES) == 133
    assert all(FLIP_INDICES[FLIP_INDICES[i]] == i for i in range(133))
    assert FLIP_INDICES[:7] == [0, 2, 1, 4, 3, 6, 5]  # nose, eyes, ears
    assert FLIP_INDICES[17] == 20 and FLIP_INDICES[19] == 22  # big toes, heels
    face = [FLIP_INDICES[23 + k] - 23 for k in range(68)]
    assert face[0] == 16 and face[8] == 8  # jaw ends, chin
    assert face[30] == 30 and face[36] == 45 and face[40] == 47  # nose tip, eye corners
    assert face[48] == 54 and face[57] == 57 and face[65] == 67  # mouth
    assert FLIP_INDICES[91] == 112 and FLIP_INDICES[132] == 111  # hands


def test_face_landmarks_on_the_astronaut(tiny) -> None:
    frame = astronaut()
    frames = np.ascontiguousarray(np.stack([frame, frame[:, ::-1]]))
    points = face_landmarks(tiny, frames, batch=1)
    assert points.shape == (2, 68, 2) and points.dtype == np.float32
    assert np.isfinite(points).all()
    # Random weights may put a point anywhere in the crop, and the crop is the frame padded
    # by 1.25 (as mmpose pads it): every point lies inside that footprint, which is centred
    # on the frame; a point not found decodes to crop pixel -0.5, just left of / above it.
    center, scale = frame_box(frame.shape[1], frame.shape[0])
    low = center - 0.5 * scale - scale / np.array([288, 384]) * 0.5
    assert (points >= low - 1e-3).all() and (points <= center + 0.5 * scale).all()
    assert len(np.unique(points.reshape(-1, 2), axis=0)) > 1
    assert np.array_equal(points, face_landmarks(tiny, frames, batch=2))
    tall = np.ascontiguousarray(frame[:, :300])[None]
    assert face_landmarks(tiny, tall).shape == (1, 68, 2)
    with pytest.raises(ValueError, match="uint8 RGB"):
        face_landmarks(tiny, frames.astype(np.float32))


def test_flip_test_is_mirror_symmetric(tiny) -> None:
    """Averaging a crop with its mirror image: the mirrored crop gives the mirrored answer."""
    torch.manual_seed(2)
    crops = torch.rand(1, 3, 384, 288) * 255
    x, y = tiny.simcc_flip_test(crops)
    x_m, y_m = tiny.simcc_flip_test(crops.flip(-1))
    assert torch.allclose(x_m, x[:, FLIP_INDICES].flip(-1), atol=1e-4)
    assert torch.allclose(y_m, y[:, FLIP_INDICES], atol=1e-4)
    assert x.shape == (1, 133, 576) and y.shape == (1, 133, 768)


@pytest.mark.gpu
def test_gpu_matches_cpu_at_full_size() -> None:
    """The full-size model on the GPU: the SimCC logits of two astronaut crops as on the CPU
    (TF32 off), and face_landmarks in a batch of 8 gives the points of a batch of 1."""
    torch.manual_seed(4)
    model = build_dwpose("full")
    frames = np.ascontiguousarray(np.stack([astronaut()] * 8))
    crops = torch.from_numpy(np.stack([crop_frame(f)[0] for f in frames])).permute(0, 3, 1, 2)
    crops = crops.float()[:2]
    with torch.inference_mode():
        cpu_x, cpu_y = model.simcc_flip_test(crops)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        gpu_model = model.to("cuda")
        with torch.inference_mode():
            gpu_x, gpu_y = gpu_model.simcc_flip_test(crops.cuda())
        assert torch.allclose(gpu_x.cpu(), cpu_x, rtol=1e-3, atol=1e-3)
        assert torch.allclose(gpu_y.cpu(), cpu_y, rtol=1e-3, atol=1e-3)
        batched = face_landmarks(gpu_model, frames, device="cuda", batch=8)
        single = face_landmarks(gpu_model, frames[:1], device="cuda", batch=1)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    assert batched.shape == (8, 68, 2)
    # The same frame eight times, and once alone: the same points but for rare argmax ties.
    close = np.abs(batched - single).max(axis=-1) <= 0.5
    assert close.mean() >= 0.95
