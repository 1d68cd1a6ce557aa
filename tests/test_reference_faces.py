"""Our offline render of an avatar prepared by MuseTalk's face pipeline (S3FD -> DWPose box ->
BiSeNet jaw mask) vs an independent re-implementation of MuseTalk v1.5's inference.

The astronaut (three frames, as `conftest.astronaut_frames`) is prepared through
`avatars.musetalk_faces` with tiny random face weights, and the tiny random MuseTalk weights
the other reference tests use. The reference (`tests/reference_musetalk.py`) gets the same
frames and face boxes; it makes its own blend masks and crop boxes with MuseTalk's
`FaceParsing` ("jaw", cheek widths 90, around the same BiSeNet module) and
`get_image_prepare_material`, then renders with its own audio features, latents, UNet/VAE
passes and PIL blend. Every frame must be within 1/255 per pixel.

Two seeds of the random face weights, both with a box in every frame (the reference needs a
face in every frame) and a 1.5x crop reaching past the frame's edge: with one, DWPose's random
landmarks are unusable and the boxes are S3FD's fallback boxes; with the other, every box is
built from the landmarks (the pipeline's info says which).
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
# random face weights' seed -> where every frame's box comes from
FACE_SEEDS = {5: "detector", 28: "landmarks"}


@pytest.fixture(scope="module", params=sorted(FACE_SEEDS), ids=lambda s: f"{FACE_SEEDS[s]}-boxes")
def face_seed(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture(scope="module")
def models_dir(
    tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory, face_seed: int
) -> Path:
    """A copy of the tiny MuseTalk weights with tiny random face weights added."""
    try:
        from avatars.musetalk_faces.weights import make_random
    except ImportError as exc:
        pytest.skip(f"the face models' weights module is not there ({exc})")
    root = tmp_path_factory.mktemp("face_models") / "models"
    shutil.copytree(tiny_models_dir, root)
    make_random(root, "tiny", seed=face_seed)
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
def parsing_maps(avatar: Avatar, pipeline: Any) -> np.ndarray:
    """BiSeNet's class maps of the 1.5x crops of the avatar's face boxes (MuseTalk's
    `get_crop_box`), parsed in the pipeline's batches as the pipeline parses them."""
    from avatars.boxes import crop_region
    from avatars.musetalk_faces.bisenet import parse_faces

    crops = [ref.get_crop_box([int(v) for v in box], 1.5)[0] for box in avatar.face_boxes]
    regions = [crop_region(f, c) for f, c in zip(avatar.frames, crops, strict=True)]
    return np.asarray(parse_faces(pipeline.bisenet, regions, batch=pipeline.options.batch))


@pytest.fixture(scope="module")
def reference_masks(
    avatar: Avatar, pipeline: Any, parsing_maps: np.ndarray
) -> tuple[list[np.ndarray], np.ndarray]:
    """MuseTalk's blend masks and crop boxes (`get_image_prepare_material`, "jaw", cheek widths
    90) for the avatar's face boxes, from those parsing maps."""
    fp = ref.RefFaceParsing(
        pipeline.bisenet, left_cheek_width=90, right_cheek_width=90, given_maps=list(parsing_maps)
    )
    masks, crops = [], []
    for frame, box in zip(avatar.frames, avatar.face_boxes, strict=True):
        bgr = np.ascontiguousarray(np.asarray(frame)[:, :, ::-1])
        mask, crop = ref.get_image_prepare_material(bgr, [int(v) for v in box], fp=fp, mode="jaw")
        masks.append(mask)
        crops.append(crop)
    assert fp.given_maps == []  # one map per frame, all used
    return masks, np.asarray(crops)


def test_avatar_was_prepared_by_the_musetalk_pipeline(avatar: Avatar, face_seed: int) -> None:
    meta = avatar.meta
    assert meta["face_pipeline"] == "musetalk" and meta["face_pipeline_reason"] is None
    assert meta["detector"] == "s3fd+dwpose" and meta["mask_mode"] == "jaw"
    details = meta["face_details"]
    assert details["face_pipeline"] == "musetalk"
    assert details["model_sizes"] == {"s3fd": "tiny", "dwpose": "tiny", "bisenet": "tiny"}
    n = avatar.n_frames
    assert details["frames_without_face"] == 0 and avatar.has_face.all()
    assert details["boxes_from_landmarks"] + details["boxes_from_detector"] == n
    assert details[f"boxes_from_{FACE_SEEDS[face_seed]}"] == n
    assert avatar.latents is not None
    # the 1.5x crop of at least one frame reaches past the frame (black padding on both sides)
    h, w = avatar.size
    c = avatar.crop_boxes
    assert ((c[:, 0] < 0) | (c[:, 1] < 0) | (c[:, 2] > w) | (c[:, 3] > h)).any()


def test_masks_equal_musetalk(
    avatar: Avatar, reference_masks: tuple[list[np.ndarray], np.ndarray]
) -> None:
    masks, crops = reference_masks
    np.testing.assert_array_equal(avatar.crop_boxes, crops)
    for k in range(avatar.n_frames):
        np.testing.assert_array_equal(avatar.masks[k], masks[k], err_msg=f"mask of frame {k}")
    assert any(m.max() > 0 for m in masks)  # the masks do replace something


def test_parsing_maps_equal_musetalks_face_parsing(
    avatar: Avatar, pipeline: Any, parsing_maps: np.ndarray
) -> None:
    """The maps the masks come from vs MuseTalk's FaceParsing run on its own PIL crop of each
    frame, one image at a time. Batched and single-image convolutions round differently, so an
    argmax between two near-equal random logits may flip: allow 1 pixel in 10,000."""
    fp = ref.RefFaceParsing(pipeline.bisenet, left_cheek_width=90, right_cheek_width=90)
    for frame, box in zip(avatar.frames, avatar.face_boxes, strict=True):
        bgr = np.ascontiguousarray(np.asarray(frame)[:, :, ::-1])
        ref.get_image_prepare_material(bgr, [int(v) for v in box], fp=fp, mode="jaw")
    differ = [
        int((ours != theirs).sum()) for ours, theirs in zip(parsing_maps, fp.maps, strict=True)
    ]
    print(
        f"\nparsing maps vs MuseTalk's FaceParsing (batch 1): pixels differing per frame {differ}"
    )
    assert max(differ) <= parsing_maps[0].size // 10_000


def test_render_matches_musetalk_reference(
    models_dir: Path,
    avatar: Avatar,
    clip_wav: Path,
    reference_masks: tuple[list[np.ndarray], np.ndarray],
) -> None:
    from engines.backends import create_engine

    torch.manual_seed(0)
    engine, _ = create_engine("musetalk", models_dir, "cpu", "torch")
    ours = render_all(
        engine, avatar, load_audio(clip_wav), RenderOptions(batch_size=8, progress=False)
    )
    masks, crops = reference_masks
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
