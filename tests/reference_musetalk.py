"""An independent re-implementation of MuseTalk v1.5's own offline inference, for tests.

It follows MuseTalk's code step by step (scripts/inference.py and scripts/realtime_inference.py,
musetalk/utils/{audio_processor.py,blending.py,utils.py}, musetalk/models/{unet.py,vae.py}),
in its order and with its libraries (cv2 + PIL, BGR frames, the HF feature extractor), and
imports nothing from our engines' feature, latent or blend code. The one deliberate change is
the one DESIGN.md names: the VAE latent is the distribution's mode instead of a sample.

Inputs are what MuseTalk's realtime avatar keeps: frames, face boxes (with v1.5's extra margin
already applied), blend masks and their crop boxes. Output frames come back RGB.
"""

from __future__ import annotations

import json
import math
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

SR = 16000
AUDIO_FPS = 50
PAD_LEFT = 2  # audio_padding_length_left
PAD_RIGHT = 2  # audio_padding_length_right


# ---- models (musetalk/utils/utils.py::load_all_model, models/unet.py, models/vae.py) ----------
class RefPositionalEncoding(torch.nn.Module):
    """musetalk/models/unet.py::PositionalEncoding, written out again."""

    def __init__(self, d_model: int = 384, max_len: int = 5000) -> None:
        super().__init__()
        pe = torch.zeros(max_len, d_model)
        position = torch.arange(0, max_len, dtype=torch.float).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2).float() * (-math.log(10000.0) / d_model))
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)
        self.pe: torch.Tensor
        self.register_buffer("pe", pe.unsqueeze(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, seq_len, _ = x.size()
        return x + self.pe[:, :seq_len, :].to(x.device)


@dataclass
class RefModels:
    unet: Any
    vae: Any
    whisper: Any
    feature_extractor: Any
    pe: RefPositionalEncoding


def load_models(models_dir: str | Path) -> RefModels:
    """Load the weights as MuseTalk does (fp32, CPU)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoFeatureExtractor, WhisperModel

    root = Path(models_dir)
    with open(root / "musetalkV15" / "musetalk.json") as f:
        unet_config = json.load(f)
    unet: Any
    try:
        unet = UNet2DConditionModel(**unet_config)
    except TypeError:  # a config carrying diffusers' private keys
        unet = UNet2DConditionModel.from_config(unet_config)
    unet.load_state_dict(
        torch.load(root / "musetalkV15" / "unet.pth", map_location="cpu", weights_only=True)
    )
    vae = AutoencoderKL.from_pretrained(str(root / "sd-vae"))
    whisper = WhisperModel.from_pretrained(str(root / "whisper"))
    fe = AutoFeatureExtractor.from_pretrained(str(root / "whisper"))
    models: list[Any] = [unet, vae, whisper]
    for m in models:
        m.eval().requires_grad_(False)
    return RefModels(unet, vae, whisper, fe, RefPositionalEncoding(384))


# ---- audio (musetalk/utils/audio_processor.py) -------------------------------------------
def librosa_like_load(wav_path: str | Path) -> np.ndarray:
    """librosa.load(path, sr=16000) for a 16 kHz PCM16 wav: int16 / 32768 as float32, mono."""
    with wave.open(str(wav_path), "rb") as w:
        if w.getframerate() != SR or w.getsampwidth() != 2:
            raise ValueError("the reference reads 16 kHz PCM16 wav only (no resampler here)")
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        channels = w.getnchannels()
    x = data.astype(np.float32) / 32768.0
    if channels > 1:
        x = x.reshape(-1, channels).mean(axis=1)
    return x


def get_audio_feature(models: RefModels, audio: np.ndarray) -> tuple[list[torch.Tensor], int]:
    # MuseTalk writes `30 * sampling_rate`: whisper's window. Our tiny random whisper has a
    # shorter window (its preprocessor's n_samples), so use the window the model was built for;
    # with the real whisper-tiny this is exactly 30 s.
    segment_length = int(models.feature_extractor.n_samples)
    segments = [audio[i : i + segment_length] for i in range(0, len(audio), segment_length)]
    features = [
        models.feature_extractor(seg, return_tensors="pt", sampling_rate=SR).input_features
        for seg in segments
    ]
    return features, len(audio)


@torch.no_grad()
def get_whisper_chunk(
    models: RefModels, input_features: list[torch.Tensor], librosa_length: int, fps: int = 25
) -> torch.Tensor:
    per_frame = 2 * (PAD_LEFT + PAD_RIGHT + 1)
    feats = []
    for inp in input_features:
        hidden = models.whisper.encoder(inp, output_hidden_states=True).hidden_states
        feats.append(torch.stack(hidden, dim=2))
    whisper_feature = torch.cat(feats, dim=1)
    multiplier = AUDIO_FPS / fps
    num_frames = math.floor((librosa_length / SR) * fps)
    actual_length = math.floor((librosa_length / SR) * AUDIO_FPS)
    whisper_feature = whisper_feature[:, :actual_length, ...]
    padding_nums = math.ceil(multiplier)
    whisper_feature = torch.cat(
        [
            torch.zeros_like(whisper_feature[:, : padding_nums * PAD_LEFT]),
            whisper_feature,
            torch.zeros_like(whisper_feature[:, : padding_nums * 3 * PAD_RIGHT]),
        ],
        1,
    )
    prompts = []
    for frame_index in range(num_frames):
        audio_index = math.floor(frame_index * multiplier)
        clip = whisper_feature[:, audio_index : audio_index + per_frame]
        assert clip.shape[1] == per_frame
        prompts.append(clip)
    out = torch.cat(prompts, dim=0)  # (T, 10, 5, 384)
    b, c, h, w = out.shape
    return out.reshape(b, c * h, w)  # rearrange 'b c h w -> b (c h) w'


# ---- VAE (musetalk/models/vae.py, with the latent's mode) ---------------------------------
def _preprocess_img(img_bgr: np.ndarray, half_mask: bool) -> torch.Tensor:
    img = cv2.cvtColor(img_bgr, cv2.COLOR_BGR2RGB)
    x = np.asarray([img]) / 255.0
    x = np.transpose(x, (3, 0, 1, 2))
    t = torch.squeeze(torch.FloatTensor(x))
    if half_mask:
        mask = torch.zeros((256, 256))
        mask[:128, :] = 1
        t = t * (mask > 0.5)
    t = (t - 0.5) / 0.5  # transforms.Normalize(mean=0.5, std=0.5)
    return t.unsqueeze(0)


@torch.no_grad()
def get_latents_for_unet(models: RefModels, crop_bgr_256: np.ndarray) -> torch.Tensor:
    sf = models.vae.config.scaling_factor

    def encode(t: torch.Tensor) -> torch.Tensor:
        return sf * models.vae.encode(t).latent_dist.mode()

    masked = encode(_preprocess_img(crop_bgr_256, half_mask=True))
    ref = encode(_preprocess_img(crop_bgr_256, half_mask=False))
    return torch.cat([masked, ref], dim=1)


@torch.no_grad()
def decode_latents(models: RefModels, latents: torch.Tensor) -> np.ndarray:
    sf = models.vae.config.scaling_factor
    image = models.vae.decode(latents / sf).sample
    image = (image / 2 + 0.5).clamp(0, 1)
    arr = image.detach().cpu().permute(0, 2, 3, 1).float().numpy()
    arr = (arr * 255).round().astype("uint8")
    return arr[..., ::-1]  # RGB -> BGR


# ---- blending (musetalk/utils/blending.py::get_image_blending) ----------------------------
def get_image_blending(
    image: np.ndarray,
    face: np.ndarray,
    face_box: list[int],
    mask_array: np.ndarray,
    crop_box: list[int],
) -> np.ndarray:
    body = Image.fromarray(np.ascontiguousarray(image[:, :, ::-1]))
    face_img = Image.fromarray(np.ascontiguousarray(face[:, :, ::-1]))
    x, y, x1, y1 = face_box
    x_s, y_s = crop_box[0], crop_box[1]
    x_e, y_e = crop_box[2], crop_box[3]
    face_large = body.crop((x_s, y_s, x_e, y_e))
    mask_image = Image.fromarray(mask_array).convert("L")
    face_large.paste(face_img, (x - x_s, y - y_s, x1 - x_s, y1 - y_s))
    body.paste(face_large, (x_s, y_s), mask_image)
    return np.array(body)[:, :, ::-1]


# ---- the whole thing (scripts/realtime_inference.py::Avatar.inference) --------------------
@torch.no_grad()
def reference_render(
    models: RefModels,
    wav_path: str | Path,
    frames_rgb: np.ndarray,
    face_boxes: np.ndarray,
    masks: list[np.ndarray],
    crop_boxes: np.ndarray,
    batch_size: int = 8,
    fps: int = 25,
) -> np.ndarray:
    """MuseTalk v1.5 frames for `wav_path` over the avatar, (n, H, W, 3) uint8 RGB.

    Every frame must have a face (MuseTalk skips face-less frames' latents, shifting the
    cycle; our tests use avatars where every frame has one)."""
    frame_list = [np.ascontiguousarray(f[:, :, ::-1]) for f in frames_rgb]  # BGR, as cv2.imread
    coord_list = [[int(v) for v in b] for b in face_boxes]
    audio = librosa_like_load(wav_path)
    input_features, librosa_length = get_audio_feature(models, audio)
    whisper_chunks = get_whisper_chunk(models, input_features, librosa_length, fps=fps)

    input_latent_list = []
    for (x1, y1, x2, y2), frame in zip(coord_list, frame_list, strict=True):
        crop = frame[y1:y2, x1:x2]
        crop = cv2.resize(crop, (256, 256), interpolation=cv2.INTER_LANCZOS4)
        input_latent_list.append(get_latents_for_unet(models, crop))

    frame_cycle = frame_list + frame_list[::-1]
    coord_cycle = coord_list + coord_list[::-1]
    latent_cycle = input_latent_list + input_latent_list[::-1]
    mask_cycle = list(masks) + list(masks)[::-1]
    mask_coords_cycle = [[int(v) for v in b] for b in crop_boxes]
    mask_coords_cycle = mask_coords_cycle + mask_coords_cycle[::-1]

    timesteps = torch.tensor([0])
    res_frames: list[np.ndarray] = []
    n = len(whisper_chunks)
    for start in range(0, n, batch_size):  # utils.py::datagen with delay_frame 0
        idx = range(start, min(n, start + batch_size))
        whisper_batch = torch.stack([whisper_chunks[i] for i in idx])
        latent_batch = torch.cat([latent_cycle[i % len(latent_cycle)] for i in idx], dim=0)
        audio_feature_batch = models.pe(whisper_batch)
        pred = models.unet(
            latent_batch, timesteps, encoder_hidden_states=audio_feature_batch
        ).sample
        res_frames.extend(decode_latents(models, pred))

    out = []
    for i, res_frame in enumerate(res_frames):
        x1, y1, x2, y2 = coord_cycle[i % len(coord_cycle)]
        ori_frame = frame_cycle[i % len(frame_cycle)].copy()
        res = cv2.resize(res_frame.astype(np.uint8), (x2 - x1, y2 - y1))
        mask = mask_cycle[i % len(mask_cycle)]
        mask_crop_box = mask_coords_cycle[i % len(mask_coords_cycle)]
        combined = get_image_blending(ori_frame, res, [x1, y1, x2, y2], mask, mask_crop_box)
        out.append(np.ascontiguousarray(combined[:, :, ::-1]))
    return np.stack(out)


@torch.no_grad()
def reference_features(models: RefModels, wav_path: str | Path) -> torch.Tensor:
    """Whisper chunks + positional encoding for each frame: (n, 50, 384)."""
    audio = librosa_like_load(wav_path)
    feats, length = get_audio_feature(models, audio)
    return models.pe(get_whisper_chunk(models, feats, length))


# ---- blend masks from face parsing (musetalk/utils/face_parsing/__init__.py::FaceParsing, ----
# ---- musetalk/utils/blending.py::get_crop_box, face_seg, get_image_prepare_material) -------
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RefFaceParsing:
    """MuseTalk's FaceParsing around a given BiSeNet module (its weights are the only thing
    taken from outside): the same preprocessing (PIL bilinear resize to 512, ToTensor's /255,
    ImageNet normalisation, written out as torchvision does it), the net's first output, numpy's
    argmax, and the same "jaw" / "neck" / "raw" masks with the same kernels. `maps` keeps every
    class map it used (before the mode masks), in call order.

    With `given_maps` (class maps (512, 512), one per call, in order) the net is not run: each
    call takes the next map instead, so the masks come from exactly those parsing maps."""

    def __init__(
        self,
        net: Any,
        left_cheek_width: int = 80,
        right_cheek_width: int = 80,
        given_maps: list[np.ndarray] | None = None,
    ) -> None:
        self.net = net
        self.given_maps = None if given_maps is None else list(given_maps)
        self.maps: list[np.ndarray] = []
        cone_height = 21
        tail_height = 12
        total_size = cone_height + tail_height
        kernel = np.zeros((total_size, total_size), dtype=np.uint8)
        center_x = total_size // 2
        for row in range(cone_height):
            if row < cone_height // 2:
                continue
            width = int(2 * (row - cone_height // 2) + 1)
            start = int(center_x - (width // 2))
            end = int(center_x + (width // 2) + 1)
            kernel[row, start:end] = 1
        base_width = int(kernel[cone_height - 1].sum())
        for row in range(cone_height, total_size):
            start = max(0, int(center_x - (base_width // 2)))
            end = min(total_size, int(center_x + (base_width // 2) + 1))
            kernel[row, start:end] = 1
        self.kernel = kernel
        self.cheek_kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (35, 3))
        self.cheek_mask = self._create_cheek_mask(left_cheek_width, right_cheek_width)

    @staticmethod
    def _create_cheek_mask(left_cheek_width: int = 80, right_cheek_width: int = 80) -> np.ndarray:
        mask = np.zeros((512, 512), dtype=np.uint8)
        center = 512 // 2
        cv2.rectangle(mask, (0, 0), (center - left_cheek_width, 512), 255, -1)
        cv2.rectangle(mask, (center + right_cheek_width, 0), (512, 512), 255, -1)
        return mask

    @staticmethod
    def _preprocess(image: Image.Image) -> torch.Tensor:
        x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def __call__(
        self, image: Image.Image, size: tuple[int, int] = (512, 512), mode: str = "raw"
    ) -> Image.Image:
        image = image.resize(size, Image.BILINEAR)  # type: ignore[attr-defined]
        if self.given_maps is not None:
            parsing = np.asarray(self.given_maps.pop(0)).astype(np.int64)
            assert parsing.shape == (size[1], size[0])
        else:
            img = torch.unsqueeze(self._preprocess(image), 0)
            out = self.net(img)[0]
            parsing = out.squeeze(0).cpu().numpy().argmax(0)
        self.maps.append(parsing.astype(np.uint8))
        if mode == "neck":
            parsing[np.isin(parsing, [1, 11, 12, 13, 14])] = 255
            parsing[np.where(parsing != 255)] = 0
        elif mode == "jaw":
            face_region = (np.isin(parsing, [1]) * 255).astype(np.uint8)
            original_dilated = cv2.dilate(face_region, self.kernel, iterations=1)
            eroded = cv2.erode(original_dilated, self.cheek_kernel, iterations=2)
            face_region = cv2.bitwise_and(eroded, self.cheek_mask)
            face_region = cv2.bitwise_or(
                face_region, cv2.bitwise_and(original_dilated, ~self.cheek_mask)
            )
            parsing[(face_region == 255) & (~np.isin(parsing, [10]))] = 255
            parsing[np.isin(parsing, [11, 12, 13])] = 255
            parsing[np.where(parsing != 255)] = 0
        else:
            parsing[np.isin(parsing, [1, 11, 12, 13])] = 255
            parsing[np.where(parsing != 255)] = 0
        return Image.fromarray(parsing.astype(np.uint8))


def get_crop_box(box: list[int], expand: float) -> tuple[list[int], int]:
    x, y, x1, y1 = box
    x_c, y_c = (x + x1) // 2, (y + y1) // 2
    w, h = x1 - x, y1 - y
    s = int(max(w, h) // 2 * expand)
    return [x_c - s, y_c - s, x_c + s, y_c + s], s


def face_seg(image: Image.Image, mode: str = "raw", fp: Any = None) -> Image.Image:
    seg_image = fp(image, mode=mode)
    return seg_image.resize(image.size)  # PIL's default filter (bicubic), as MuseTalk


def get_image_prepare_material(
    image: np.ndarray,
    face_box: list[int],
    upper_boundary_ratio: float = 0.5,
    expand: float = 1.5,
    fp: Any = None,
    mode: str = "raw",
) -> tuple[np.ndarray, list[int]]:
    """(blend mask over the crop box, crop box) for a BGR frame, as realtime_inference.py's
    prepare_material calls it (v1.5: `fp = FaceParsing(90, 90)`, mode "jaw")."""
    body = Image.fromarray(np.ascontiguousarray(image[:, :, ::-1]))
    x, y, x1, y1 = face_box
    crop_box, _ = get_crop_box(face_box, expand)
    x_s, y_s, _x_e, _y_e = crop_box
    face_large = body.crop(tuple(crop_box))
    ori_shape = face_large.size
    mask_image = face_seg(face_large, mode=mode, fp=fp)
    mask_small = mask_image.crop((x - x_s, y - y_s, x1 - x_s, y1 - y_s))
    mask_image = Image.new("L", ori_shape, 0)
    mask_image.paste(mask_small, (x - x_s, y - y_s, x1 - x_s, y1 - y_s))
    width, height = mask_image.size
    top_boundary = int(height * upper_boundary_ratio)
    modified_mask_image = Image.new("L", ori_shape, 0)
    modified_mask_image.paste(mask_image.crop((0, top_boundary, width, height)), (0, top_boundary))
    blur_kernel_size = int(0.1 * ori_shape[0] // 2 * 2) + 1
    mask_array = cv2.GaussianBlur(
        np.array(modified_mask_image), (blur_kernel_size, blur_kernel_size), 0
    )
    return mask_array, crop_box
