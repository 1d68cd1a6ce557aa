"""GPU paste-back + I420 against the CPU reference (`avatars.blend.paste_back`, cv2).

The torch code is device-agnostic: it runs here on the CPU (CI) and, marked `gpu`, on CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from avatars.blend import paste_back as cpu_paste_back
from bench.gpu.measure import synthetic_avatar
from engines.pipeline import paste

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
        ],
    ),
]


def _faces(n: int, seed: int) -> np.ndarray:
    import cv2

    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (n * 256, 256, 3), dtype=np.uint8)
    return cv2.GaussianBlur(raw, (5, 5), 1.5).reshape(n, 256, 256, 3)  # noise + edges


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", [(360, 640), (361, 641)])
def test_paste_back_matches_cpu_reference(device: str, size: tuple[int, int]) -> None:
    av = synthetic_avatar(6, *size, seed=size[0])
    av.face_boxes[4] = -1  # a frame with no face stays unchanged
    av.crop_boxes[4] = -1
    av.masks[4] = np.zeros((0, 0), np.uint8)
    gav = paste.upload_avatar(av, device)
    faces = _faces(8, seed=1)
    idx = np.array([0, 1, 2, 3, 4, 5, 1, 0])
    got = (
        paste.paste_back(
            gav, torch.from_numpy(idx), torch.from_numpy(faces).permute(0, 3, 1, 2).to(device)
        )
        .cpu()
        .numpy()
    )
    for row, i in enumerate(idx):
        want = cpu_paste_back(
            av.frames[i], faces[row], av.face_boxes[i], av.crop_boxes[i], av.masks[i]
        )
        diff = np.abs(got[row].astype(int) - want.astype(int))
        assert diff.max() <= 2, f"row {row} frame {i}: max diff {diff.max()}"
        assert (diff > 1).mean() < 1e-3
    np.testing.assert_array_equal(got[4], av.frames[4])
    # the face region really changed (not a no-op)
    x1, _, x2, y2 = av.face_boxes[0]
    assert np.abs(got[0, y2 - 5, x1:x2].astype(int) - av.frames[0, y2 - 5, x1:x2]).max() > 20


@pytest.mark.parametrize("device", DEVICES)
def test_float_faces_are_rounded_like_musetalk(device: str) -> None:
    av = synthetic_avatar(2, 240, 320)
    gav = paste.upload_avatar(av, device)
    faces = _faces(2, seed=3)
    as_float = torch.from_numpy(faces).permute(0, 3, 1, 2).float().div(255).to(device)
    a = paste.paste_back(gav, torch.tensor([0, 1]), as_float)
    b = paste.paste_back(
        gav, torch.tensor([0, 1]), torch.from_numpy(faces).permute(0, 3, 1, 2).to(device)
    )
    assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", [(360, 640), (121, 203)])
def test_rgb_to_i420_matches_cv2(device: str, size: tuple[int, int]) -> None:
    import cv2

    h, w = size
    av = synthetic_avatar(2, max(h, 64), max(w, 64))
    frames = np.ascontiguousarray(av.frames[:, :h, :w])
    got = paste.rgb_to_i420(torch.from_numpy(frames).to(device)).cpu().numpy()
    assert got.shape == (2, paste.i420_size(h, w))
    if h % 2 == 0 and w % 2 == 0:
        for k in range(2):
            want = cv2.cvtColor(frames[k], cv2.COLOR_RGB2YUV_I420).reshape(-1)
            assert np.abs(got[k].astype(int) - want.astype(int)).max() <= 1
    y, u, v = paste.i420_planes(got[0], h, w)
    assert y.shape == (h, w) and u.shape == v.shape == ((h + 1) // 2, (w + 1) // 2)
    assert y.flags["C_CONTIGUOUS"] and u.flags["C_CONTIGUOUS"] and v.flags["C_CONTIGUOUS"]
    # planes are what PyAV / aiortc reads back as the same picture (within rounding)
    if h % 2 == 0 and w % 2 == 0:
        from av import VideoFrame

        rgb = VideoFrame.from_ndarray(got[0].reshape(h * 3 // 2, w), format="yuv420p").to_ndarray(
            format="rgb24"
        )
        assert np.abs(rgb.astype(int) - frames[0].astype(int)).mean() < 6


def test_upload_copies_read_only_frames_without_a_warning() -> None:
    import warnings

    av = synthetic_avatar(4, 64, 96)
    original = av.frames.copy()
    av.frames.flags.writeable = False  # as a memory-mapped avatar file is
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gav = paste.upload_avatar(av, "cpu")
    gav.frames[0] += 1  # a copy: the read-only frames are untouched
    assert (av.frames == original).all()
    assert not (gav.frames[0].numpy() == original[0]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", [(360, 640), (240, 322)])
def test_region_i420_is_the_whole_frame_conversion_bit_for_bit(
    device: str, size: tuple[int, int]
) -> None:
    """The I420 stage converts only each face region of the avatar's pre-converted frames;
    its bytes must equal converting the whole pasted frame: boxes on odd rows and columns,
    one box in the frame's corner, one reaching the top-left edge, a frame with no face,
    repeated frames and an empty batch."""
    av = synthetic_avatar(6, *size, seed=7)
    height, width = size
    x1, y1, x2, y2 = (int(v) for v in av.face_boxes[2])
    av.face_boxes[2] = [x1 | 1, y1 | 1, x2 | 1, y2 | 1]  # odd origin and far edge
    w, h = x2 - x1, y2 - y1
    av.face_boxes[3] = [0, 0, w, h]  # the top-left edge (its crop box leaves the frame)
    av.face_boxes[4] = -1  # no face: the avatar frame as it is
    av.crop_boxes[4] = -1
    av.masks[4] = np.zeros((0, 0), np.uint8)
    gav = paste.upload_avatar(av, device)
    assert gav.i420 is not None and gav.i420.shape == (6, paste.i420_size(height, width))
    origin = gav.origin.cpu().numpy()
    assert (origin % 2 == 0).all(), "regions start on even rows and columns"
    rh, rw = gav.region
    assert rh % 2 == 0 and rw % 2 == 0
    for i in np.flatnonzero(av.has_face):  # every face box lies inside its region
        bx1, by1, bx2, by2 = av.face_boxes[i]
        assert origin[i, 0] <= by1 and by2 <= origin[i, 0] + rh
        assert origin[i, 1] <= bx1 and bx2 <= origin[i, 1] + rw
    faces = torch.from_numpy(_faces(9, seed=5)).permute(0, 3, 1, 2).to(device)
    idx = torch.tensor([0, 1, 2, 3, 4, 5, 2, 1, 0], device=device)
    want = paste.rgb_to_i420(paste.paste_back(gav, idx, faces))
    got = paste.paste_i420(gav, idx, faces)
    assert got.dtype == torch.uint8 and torch.equal(got, want)
    assert torch.equal(paste.paste_flat(gav, idx, faces, True), want)  # the pipeline's stage
    assert not torch.equal(got[0], gav.i420[0])  # the face really changed the picture
    assert torch.equal(got[4], gav.i420[4])  # no face: unchanged
    assert paste.paste_i420(gav, idx[:0], faces[:0]).shape == (0, want.shape[1])


@pytest.mark.parametrize("device", DEVICES)
def test_i420_only_avatars_keep_no_rgb_frames_and_paste_the_same_bytes(device: str) -> None:
    """The server's pipeline (I420 output) uploads avatars with `keep_frames=False`: the I420
    frames and the regions' pixels only. The stage's bytes are the same as from an avatar
    that keeps its RGB frames, in a fraction of the memory; RGB paste-back says why it
    cannot run."""
    av = synthetic_avatar(5, 360, 640, seed=3)
    full = paste.upload_avatar(av, device)
    lean = paste.upload_avatar(av, device, keep_frames=False)
    assert lean.frames is None and full.frames is not None
    assert torch.equal(lean.i420, full.i420) and torch.equal(lean.regions, full.regions)
    assert lean.nbytes < 0.5 * full.nbytes
    faces = torch.from_numpy(_faces(7, seed=4)).permute(0, 3, 1, 2).to(device)
    idx = torch.tensor([4, 3, 2, 1, 0, 0, 2], device=device)
    want = paste.rgb_to_i420(paste.paste_back(full, idx, faces))
    assert torch.equal(paste.paste_flat(lean, idx, faces, True), want)
    with pytest.raises(ValueError, match="I420 output only"):
        paste.paste_flat(lean, idx, faces, False)


def test_odd_frames_convert_whole_frames() -> None:
    """An odd frame size cannot align regions to the 2x2 chroma blocks: no I420 frames are
    kept, the stage converts whole frames, and paste_i420 says why it cannot run."""
    av = synthetic_avatar(3, 121, 203)
    gav = paste.upload_avatar(av, "cpu", keep_frames=False)  # kept anyway: needed here
    assert gav.i420 is None and gav.frames is not None
    faces = torch.from_numpy(_faces(3, seed=2)).permute(0, 3, 1, 2)
    idx = torch.arange(3)
    want = paste.rgb_to_i420(paste.paste_back(gav, idx, faces))
    assert torch.equal(paste.paste_flat(gav, idx, faces, True), want)
    with pytest.raises(ValueError, match="even frame size"):
        paste.paste_i420(gav, idx, faces)
