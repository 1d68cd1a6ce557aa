"""Our offline render of an avatar prepared by MuseTalk's face pipeline (S3FD -> DWPose box ->
BiSeNet jaw mask) vs an independent re-implementation of MuseTalk v1.5's inference.

The astronaut (three frames, as `conftest.astronaut_frames`) is prepared through
`avatars.musetalk_faces` with tiny random face weights, and the tiny random MuseTalk weights
the other reference tests use. The reference (`tests/reference_musetalk.py`) gets the same
frames and face boxes; it makes its own blend masks and crop boxes with MuseTalk's
`FaceParsing` ("jaw", cheek widths 90, around the same BiSeNet module) and
`get_image_prepare_material`, then renders with its own audio features, latents, UNet/VAE
passes and PIL blend. Every frame must be within 1/255 per pixel.

With random weights DWPose's landmarks are not usable, so the boxes are S3FD's fallback boxes
(the pipeline's info says which); the seed is one where S3FD finds a box in every frame (the
reference needs a face in every frame) whose 1.5x crop reaches past the frame's edge.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import reference_musetalk as ref
import torch

from avatars.avatar import Avatar
from engines.render.audio_io import load_audio, write_wav
from engines.render.offline import RenderOptions, render_all

CLIP_SECONDS = 0.4  # 10 frames: the 3-frame avatar's loop forwards, backwards and forwards again
TOLERANCE = 1  # /255 per pixel
FACE_SEED = 5  # S3FD (random) finds a box in all three frames, near the right edge


@pytest.fixture(scope="module")
def models_dir(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny MuseTalk weights with tiny random face weights added."""
    try:
        from avatars.musetalk_faces.weights import make_random
    except ImportError as exc:
        pytest.skip(f"the face models' weights module is not there ({exc})")
    root = tmp_path_factory.mktemp("face_models") / "models"
    shutil.copytree(tiny_models_dir, root)
    make_random(root, "tiny", seed=FACE_SEED)
    return root


@pytest.fixture(scope="module")
def pipeline(models_dir: Path) -> Any:
    from avatars.musetalk_faces.pipeline import FacePipeline, PipelineOptions

    loaded, reason = FacePipeline.load(models_dir, "cpu", PipelineOptions(batch=4))
    assert loaded is not None, reason
    return loaded


@pytest.fixture(scope="module")
def avatar(models_dir: Path, astronaut_frames: np.ndarray, pipeline: Any) -> Avatar:
    from conftest import tiny_encoder

    from avatars.prepare import prepare_avatar

    return prepare_avatar(
        astronaut_frames,
        25.0,
        name="astronaut",
        avatar_id="av_00000000000a5703",
        encode_latents=tiny_encoder(models_dir),
        face_pipeline=pipeline,
    )


@pytest.fixture(scope="module")
def clip_wav(tmp_path_factory: pytest.TempPathFactory, speech_pcm: np.ndarray) -> Path:
    path = tmp_path_factory.mktemp("clip") / "clip.wav"
    write_wav(path, speech_pcm[: int(CLIP_SECONDS * 16000)])
    return path


@pytest.fixture(scope="module")
def reference_masks(avatar: Avatar, pipeline: Any) -> tuple[list[np.ndarray], np.ndarray, Any]:
    """MuseTalk's blend masks and crop boxes for the avatar's face boxes (and its parser)."""
    fp = ref.RefFaceParsing(pipeline.bisenet, left_cheek_width=90, right_cheek_width=90)
    masks, crops = [], []
    for frame, box in zip(avatar.frames, avatar.face_boxes, strict=True):
        bgr = np.ascontiguousarray(np.asarray(frame)[:, :, ::-1])
        mask, crop = ref.get_image_prepare_material(bgr, [int(v) for v in box], fp=fp, mode="jaw")
        masks.append(mask)
        crops.append(crop)
    return masks, np.asarray(crops), fp


def test_avatar_was_prepared_by_the_musetalk_pipeline(avatar: Avatar) -> None:
    meta = avatar.meta
    assert meta["face_pipeline"] == "musetalk" and meta["face_pipeline_reason"] is None
    assert meta["detector"] == "s3fd+dwpose" and meta["mask_mode"] == "jaw"
    details = meta["face_details"]
    assert details["face_pipeline"] == "musetalk"
    assert details["model_sizes"] == {"s3fd": "tiny", "dwpose": "tiny", "bisenet": "tiny"}
    n = avatar.n_frames
    assert details["frames_without_face"] == 0 and avatar.has_face.all()
    assert details["boxes_from_landmarks"] + details["boxes_from_detector"] == n
    assert avatar.latents is not None
    # the 1.5x crop of at least one frame reaches past the frame (black padding on both sides)
    h, w = avatar.size
    c = avatar.crop_boxes
    assert ((c[:, 0] < 0) | (c[:, 1] < 0) | (c[:, 2] > w) | (c[:, 3] > h)).any()


def test_parsing_and_masks_equal_musetalk(
    avatar: Avatar, pipeline: Any, reference_masks: tuple[list[np.ndarray], np.ndarray, Any]
) -> None:
    from avatars.boxes import crop_region
    from avatars.musetalk_faces.bisenet import parse_faces

    masks, crops, fp = reference_masks
    np.testing.assert_array_equal(avatar.crop_boxes, crops)
    ours = parse_faces(
        pipeline.bisenet, [crop_region(f, c) for f, c in zip(avatar.frames, crops, strict=True)]
    )
    for k in range(avatar.n_frames):
        np.testing.assert_array_equal(ours[k], fp.maps[k], err_msg=f"parsing map of frame {k}")
        np.testing.assert_array_equal(avatar.masks[k], masks[k], err_msg=f"mask of frame {k}")
    assert any(m.max() > 0 for m in masks)  # the masks do replace something


def test_render_matches_musetalk_reference(
    models_dir: Path,
    avatar: Avatar,
    clip_wav: Path,
    reference_masks: tuple[list[np.ndarray], np.ndarray, Any],
) -> None:
    from engines.backends import create_engine

    torch.manual_seed(0)
    engine, _ = create_engine("musetalk", models_dir, "cpu", "torch")
    ours = render_all(
        engine, avatar, load_audio(clip_wav), RenderOptions(batch_size=8, progress=False)
    )
    masks, crops, _ = reference_masks
    theirs = ref.reference_render(
        ref.load_models(models_dir),
        clip_wav,
        np.asarray(avatar.frames),
        avatar.face_boxes,
        masks,
        crops,
        batch_size=8,
    )
    n = int(CLIP_SECONDS * 25)
    assert ours.shape == theirs.shape == (n, *avatar.size, 3)
    diff = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
    per_frame = [int(d.max()) for d in diff]
    print(
        f"\nrender (MuseTalk face pipeline) vs MuseTalk reference: max |diff| per frame "
        f"{per_frame} /255, {int((diff > 0).sum())} of {diff.size} values differ"
    )
    assert max(per_frame) <= TOLERANCE, per_frame
    # lip-synced frames, not the avatar's frames passed through
    idle = np.asarray(avatar.frames)[[avatar.loop_frame(i) for i in range(n)]]
    assert (ours != idle).any(axis=(1, 2, 3)).all()
