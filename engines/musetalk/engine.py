"""The MuseTalk v1.5 engine: whisper features -> UNet (t = 0) -> VAE decode -> paste back.

Backend `torch` runs the models eagerly (fp32 on CPU, fp16 on CUDA by default). The avatar's
UNet input latents live on the engine's device; frames, boxes and masks stay in CPU memory,
where `avatars.blend.paste_back` blends each generated 256x256 face into its frame (RGB
throughout: MuseTalk's BGR flips cancel out). Frames without a face are returned unchanged.

Backends `compiled` and `tensorrt` need a CUDA device: `render` then goes through the GPU
pipeline that `pipeline_factory` builds (`engines.backends.create_engine` hands it in; built
and warmed up on first use; GPU paste-back). The engine takes a backend already chosen:
`engines.backends.select_backend` resolves `auto`. The server's GPU scheduler builds its own
pipeline from the same engine.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avatars.avatar import Avatar
from engines.base import Engine, EngineError, FrameJob
from engines.musetalk import weights
from engines.musetalk.audio_features import AudioFeaturizer, FeatureOptions
from engines.musetalk.unet_step import unet_forward
from engines.musetalk.vae import decode_latents, encode_crops

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "compiled", "tensorrt")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LATENT_SHAPE = (8, 32, 32)


@dataclass(frozen=True)
class MuseTalkOptions:
    """How the engine runs. `dtype` None: float32 on CPU, float16 on CUDA. `batch_size`:
    most frames per UNet/VAE call. `encoder_batch`: whisper encoder passes per call; 1 keeps
    features bitwise independent of how frames were grouped (see FeatureOptions)."""

    device: str = "cpu"
    backend: str = "torch"
    dtype: str | None = None
    batch_size: int = 8
    encoder_batch: int = 1

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise EngineError(
                f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)} "
                "(engines.backends.select_backend resolves auto)"
            )
        if self.dtype is not None and self.dtype not in DTYPES:
            raise EngineError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.batch_size < 1 or self.encoder_batch < 1:
            raise EngineError("batch_size and encoder_batch must be >= 1")
        dev = torch.device(self.device)
        if dev.type not in ("cpu", "cuda"):
            raise EngineError(f"device must be cpu or cuda, got {self.device!r}")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise EngineError("device cuda asked for, but torch sees no CUDA GPU")
        if dev.type != "cuda" and self.backend in ("compiled", "tensorrt"):
            raise EngineError(
                f"backend {self.backend} needs a CUDA GPU (device is {self.device}); "
                "use --backend torch (or auto)"
            )

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype is not None:
            return DTYPES[self.dtype]
        return torch.float16 if self.torch_device.type == "cuda" else torch.float32


@dataclass
class _Resident:
    avatar: Avatar
    latents: torch.Tensor  # (N, 8, 32, 32) on the device, model dtype
    key: str


class MuseTalkEngine(Engine):
    """MuseTalk v1.5 on one device; shared by every session there."""

    name = "musetalk"

    def __init__(
        self,
        models_dir: str | Path,
        device: str = "cpu",
        backend: str = "torch",
        dtype: str | None = None,
        batch_size: int = 8,
        options: MuseTalkOptions | None = None,
        pipeline_factory: Callable[[MuseTalkEngine], Any] | None = None,
    ) -> None:
        """`pipeline_factory(engine)`: the GPU pipeline `render` runs through with the
        compiled / tensorrt backend (`engines.backends.render_pipeline`)."""
        self.options = options or MuseTalkOptions(
            device=device, backend=backend, dtype=dtype, batch_size=batch_size
        )
        self.files = weights.check_layout(models_dir)
        self.backend = self.options.backend
        dev, dt = self.options.torch_device, self.options.torch_dtype
        self.device, self.dtype = dev, dt
        self.unet = weights.load_unet(self.files.root, dev, dt)
        self.vae = weights.load_vae(self.files.root, dev, dt)
        encoder, extractor = weights.load_whisper(self.files.root, dev, dt)
        self.features = AudioFeaturizer(
            encoder, extractor, FeatureOptions(batch=self.options.encoder_batch)
        )
        self.latents_key = weights.weights_key(self.files.vae_weights)
        self._avatars: dict[str, _Resident] = {}
        self._lock = threading.Lock()
        self._pipeline: Any = None  # GpuPipeline for `render` with compiled / tensorrt
        self._pipeline_factory = pipeline_factory
        logger.info(
            "musetalk engine ready",
            extra={"device": str(dev), "dtype": str(dt), "backend": self.backend},
        )

    def gpu_pipeline(self) -> Any:
        """The GPU pipeline `render` uses with the compiled / tensorrt backend (built by
        `pipeline_factory` and warmed up on first call)."""
        if self._pipeline is None:
            if self.device.type != "cuda" or self.backend == "torch":
                raise EngineError(f"no GPU pipeline for backend {self.backend} on {self.device}")
            if self._pipeline_factory is None:
                raise EngineError(
                    f"backend {self.backend} renders through a GPU pipeline: build the engine "
                    "with engines.backends.create_engine"
                )
            self._pipeline = self._pipeline_factory(self)
        return self._pipeline

    # -- avatars ------------------------------------------------------------------------
    def encode_latents(self, crops: np.ndarray) -> np.ndarray:
        """(n, 256, 256, 3) uint8 RGB face crops -> (n, 8, 32, 32) float32 UNet input latents."""
        return encode_crops(self.vae, crops, self.options.batch_size).cpu().numpy()

    def avatar_latents(self, avatar: Avatar) -> np.ndarray:
        """(N, 8, 32, 32) float32 latents of every frame's face crop; zero where no face."""
        from avatars.boxes import face_crop

        out = np.zeros((avatar.n_frames, *LATENT_SHAPE), dtype=np.float32)
        with_face = np.flatnonzero(avatar.has_face)
        b = self.options.batch_size
        for start in range(0, len(with_face), b):
            idx = with_face[start : start + b]
            crops = np.stack(
                [face_crop(avatar.frames[i], tuple(avatar.face_boxes[i])) for i in idx]
            )
            out[idx] = self.encode_latents(crops)
        return out

    def load_avatar(self, avatar: Avatar) -> None:
        with self._lock:
            res = self._avatars.get(avatar.id)
            if res is not None and res.avatar is avatar and res.key == avatar.latents_key:
                return
            if avatar.latents is None or avatar.latents_key != self.latents_key:
                logger.info("computing avatar latents", extra={"avatar": avatar.id})
                avatar.latents = self.avatar_latents(avatar)
                avatar.latents_key = self.latents_key
            lat = np.asarray(avatar.latents)
            if lat.shape != (avatar.n_frames, *LATENT_SHAPE):
                raise EngineError(
                    f"avatar {avatar.id} latents have shape {lat.shape}, "
                    f"expected {(avatar.n_frames, *LATENT_SHAPE)}"
                )
            latents = torch.from_numpy(lat).to(device=self.device, dtype=self.dtype)
            self._avatars[avatar.id] = _Resident(avatar, latents, self.latents_key)

    def unload_avatar(self, avatar_id: str) -> None:
        with self._lock:
            self._avatars.pop(avatar_id, None)
        if self._pipeline is not None:
            self._pipeline.unload(avatar_id)

    def _resident(self, avatar_id: str) -> _Resident:
        res = self._avatars.get(avatar_id)
        if res is None:
            raise EngineError(f"avatar {avatar_id} is not loaded on the musetalk engine")
        return res

    # -- features -----------------------------------------------------------------------
    def offline_features(self, audio: np.ndarray) -> torch.Tensor:
        return self.features.offline(audio)

    def stream_features(self, audio: np.ndarray, jobs: Sequence[FrameJob]) -> torch.Tensor:
        return self.features.stream(audio, jobs)

    # -- frames -------------------------------------------------------------------------
    @torch.no_grad()
    def render_faces(self, latents: torch.Tensor, features: torch.Tensor) -> np.ndarray:
        """UNet + VAE decode: (n, 8, 32, 32) latents and (n, 50, 384) features ->
        (n, 256, 256, 3) uint8 RGB faces, in batches of at most `batch_size`."""
        b = self.options.batch_size
        out = []
        for start in range(0, latents.shape[0], b):
            pred = unet_forward(self.unet, latents[start : start + b], features[start : start + b])
            out.append(decode_latents(self.vae, pred))
        if not out:
            return np.zeros((0, 256, 256, 3), dtype=np.uint8)
        return np.concatenate(out)

    def render(self, avatar_id: str, loop_positions: Sequence[int], features) -> np.ndarray:  # type: ignore[no-untyped-def]
        from avatars.blend import paste_back

        res = self._resident(avatar_id)
        avatar = res.avatar
        n = len(loop_positions)
        if len(features) != n:
            raise ValueError(f"{n} loop positions but {len(features)} feature rows")
        if self.backend != "torch":
            feats_t = torch.as_tensor(features).to(device=self.device)
            frames = self.gpu_pipeline().render(avatar_id, list(loop_positions), feats_t)
            h, w = avatar.size
            return np.stack(frames) if frames else np.zeros((0, h, w, 3), np.uint8)
        h, w = avatar.size
        out = np.empty((n, h, w, 3), dtype=np.uint8)
        idx = np.array([avatar.loop_frame(int(p)) for p in loop_positions], dtype=np.int64)
        face_rows = np.flatnonzero(avatar.has_face[idx]) if n else np.zeros(0, np.int64)
        for j in np.setdiff1d(np.arange(n), face_rows):
            out[j] = avatar.frames[idx[j]]
        if face_rows.size:
            rows = torch.from_numpy(face_rows).to(self.device)
            feats = torch.as_tensor(features).to(device=self.device)[rows]
            lat = res.latents[torch.from_numpy(idx[face_rows]).to(self.device)]
            faces = self.render_faces(lat, feats)
            for face, j in zip(faces, face_rows, strict=True):
                f = int(idx[j])
                paste_back(
                    avatar.frames[f],
                    face,
                    avatar.face_boxes[f],
                    avatar.crop_boxes[f],
                    avatar.masks[f],
                    out=out[j],
                )
        return out
