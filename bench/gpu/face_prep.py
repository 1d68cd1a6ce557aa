"""Avatar registration time, MuseTalk v1.5's face preparation batched against frame by frame:

    python -m bench.gpu.face_prep OUT.json [--models-dir DIR] [--frames 250] [--batch 16]

A synthetic 720p clip (the astronaut, moving) of `--frames` frames goes through
`avatars.prepare.prepare_avatar` with the face pipeline (S3FD -> DWPose -> box -> crop ->
BiSeNet -> jaw mask) and the VAE latents, twice: batched (`--batch`, as lipstream registers)
and at batch 1 (as MuseTalk's own preprocessing runs), each after a warm-up on a few frames.
Per-stage seconds of both go into the JSON. Without real weights in `--models-dir`, full-size
random weights are written there first (`make-random --size full`): the times are then the
models' costs, except that a random S3FD keeps some 10,000 boxes over 0.5 per 720p frame (a
real one tens), whose NMS alone would take seconds per frame on the CPU; with random weights
(`random_weights` in the JSON) NMS is therefore given only the 50 best-scoring candidates.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np


def clip_frames(n: int, width: int = 1280, height: int = 720) -> np.ndarray:
    """`n` frames of `width` x `height`: the astronaut's face drifting over a grey background."""
    from skimage import data

    face = cv2.resize(data.astronaut(), (400, 400), interpolation=cv2.INTER_AREA)
    frames = np.full((n, height, width, 3), 96, dtype=np.uint8)
    for i in range(n):
        x = 440 + int(20 * np.sin(i / 12.0))
        y = 160 + int(10 * np.cos(i / 9.0))
        frames[i, y : y + 400, x : x + 400] = face
    return frames


NMS_CANDIDATES = 50  # with random weights: what a real S3FD keeps over 0.5, generously


def limit_nms(most: int = NMS_CANDIDATES) -> None:
    """S3FD's NMS sees only the `most` best candidates of a frame (random weights only)."""
    from avatars.musetalk_faces import s3fd

    full_nms = s3fd.nms

    def nms(dets: np.ndarray, thresh: float = s3fd.NMS_IOU) -> list[int]:
        best = np.argsort(-dets[:, 4], kind="stable")[:most]
        return [int(best[k]) for k in full_nms(dets[best], thresh)]

    s3fd.nms = nms  # type: ignore[assignment]


def models_ready(models_dir: Path) -> tuple[Path, bool]:
    """A models folder holding the face models and the MuseTalk VAE (random where missing),
    and whether the face models are random."""
    from avatars.musetalk_faces.pipeline import weights_problem
    from engines.base import EngineError
    from engines.musetalk.weights import check_layout
    from engines.musetalk.weights import make_random as make_engine

    try:
        check_layout(models_dir)
    except EngineError:
        make_engine(models_dir, size="full", seed=0)
    random_faces = weights_problem(models_dir) is not None
    if random_faces:
        from avatars.musetalk_faces.weights import make_random

        make_random(models_dir, "full", seed=0)
    return models_dir, random_faces


def register(frames: np.ndarray, models_dir: Path, batch: int, device: str) -> dict[str, Any]:
    """One registration at `batch`: seconds in all and per stage, after a warm-up."""
    import torch

    from avatars.musetalk_faces.pipeline import FacePipeline, PipelineOptions
    from avatars.prepare import prepare_avatar
    from engines.musetalk.vae import encode_crops
    from engines.musetalk.weights import load_vae

    pipeline, reason = FacePipeline.load(models_dir, device, PipelineOptions(batch=batch))
    if pipeline is None:
        raise SystemExit(f"face pipeline unavailable: {reason}")
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    vae = load_vae(models_dir, device, dtype)

    def encode(crops: np.ndarray) -> np.ndarray:
        return np.asarray(encode_crops(vae, crops, batch_size=batch).float().cpu().numpy())

    def once(clip: np.ndarray) -> tuple[float, dict[str, Any]]:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        avatar = prepare_avatar(
            clip,
            25.0,
            name="bench",
            avatar_id="bench",
            encode_latents=encode,
            face_pipeline=pipeline,
        )
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0, avatar.meta

    once(frames[: max(2, batch)])  # warm-up: cuDNN's algorithm choice, allocator
    seconds, meta = once(frames)
    return {
        "batch": batch,
        "seconds": round(seconds, 3),
        "stage_seconds": meta["stage_seconds"],
        "faces": meta["n_faces"],
        "face_details": meta["face_details"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--models-dir", type=Path, default=None)
    parser.add_argument("--frames", type=int, default=250)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    models, random_faces = models_ready(
        args.models_dir or Path(tempfile.mkdtemp(prefix="face-prep-"))
    )
    if random_faces:
        limit_nms()
    frames = clip_frames(args.frames)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "frames": args.frames,
        "size": [720, 1280],
        "random_weights": random_faces,
        "nms_candidates": NMS_CANDIDATES if random_faces else None,
        "batched": register(frames, models, args.batch, device),
        "batch_1_as_musetalk": register(frames, models, 1, device),
    }
    args.out.write_text(json.dumps(result, indent=1))
    for key in ("batched", "batch_1_as_musetalk"):
        run = result[key]
        print(key, run["batch"], run["seconds"], "s", run["stage_seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
