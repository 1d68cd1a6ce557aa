"""MuseTalk v1.5 weights: the on-disk layout, loading, random stand-ins and download.

The layout is the one MuseTalk's `download_weights.sh` makes under `models/`:

    musetalkV15/musetalk.json, musetalkV15/unet.pth      (TMElyralab/MuseTalk)
    sd-vae/config.json, sd-vae/diffusion_pytorch_model.{bin,safetensors}  (stabilityai/sd-vae-ft-mse)
    whisper/config.json, whisper/{pytorch_model.bin,model.safetensors},
    whisper/preprocessor_config.json                     (openai/whisper-tiny)

Everything loads from local files only (no hub access) and with `weights_only=True` or
safetensors. `make_random` writes random weights in the same layout: `full` with the real
configs (for GPU benchmarks), `tiny` with the same structure and small widths (CPU tests).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from engines.base import EngineError

logger = logging.getLogger(__name__)

UNET_DIR = "musetalkV15"
VAE_DIR = "sd-vae"
WHISPER_DIR = "whisper"
VAE_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
WHISPER_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
VAE_SCALING_FACTOR = 0.18215  # diffusers' default; sd-vae-ft-mse's config does not set it
HOP_LENGTH = 160  # whisper's mel hop (10 ms at 16 kHz); the encoder halves the mel rate

Size = Literal["tiny", "full"]

# musetalkV15/musetalk.json as MuseTalk ships it (diffusers 0.6 era keys).
UNET_CONFIG_FULL: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0.dev0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 384,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 8,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
}

# stabilityai/sd-vae-ft-mse config.json.
VAE_CONFIG_FULL: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.4.2",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 256,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# openai/whisper-tiny config.json: the fields that shape the model.
WHISPER_CONFIG_FULL: dict[str, Any] = {
    "architectures": ["WhisperForConditionalGeneration"],
    "model_type": "whisper",
    "activation_function": "gelu",
    "d_model": 384,
    "encoder_layers": 4,
    "encoder_attention_heads": 6,
    "encoder_ffn_dim": 1536,
    "decoder_layers": 4,
    "decoder_attention_heads": 6,
    "decoder_ffn_dim": 1536,
    "num_mel_bins": 80,
    "max_source_positions": 1500,
    "max_target_positions": 448,
    "vocab_size": 51865,
    "scale_embedding": False,
    "bos_token_id": 50257,
    "eos_token_id": 50257,
    "pad_token_id": 50257,
    "decoder_start_token_id": 50258,
}


def _tiny_configs() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The real models' building blocks at small widths (CPU tests): 256 px crops -> 32x32
    latents, 384-d audio tokens, 5 whisper hidden states, 2 s encoder windows."""
    unet = copy.deepcopy(UNET_CONFIG_FULL)
    unet.update(
        block_out_channels=[32, 64],
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        layers_per_block=1,
        sample_size=32,
    )
    vae = copy.deepcopy(VAE_CONFIG_FULL)  # 4 blocks: still 8x down, 256 px -> 32x32 latents
    vae.update(block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=8)
    whisper = copy.deepcopy(WHISPER_CONFIG_FULL)
    whisper.update(
        encoder_attention_heads=4,
        encoder_ffn_dim=256,
        decoder_layers=1,
        decoder_attention_heads=4,
        decoder_ffn_dim=256,
        max_source_positions=100,  # 2 s encoder windows: fast CPU tests, boundaries early
        max_target_positions=32,
        vocab_size=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        decoder_start_token_id=1,
    )
    return unet, vae, whisper


def configs(size: Size) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(unet, vae, whisper) config dicts for a random model of that size."""
    if size == "full":
        return (
            copy.deepcopy(UNET_CONFIG_FULL),
            copy.deepcopy(VAE_CONFIG_FULL),
            copy.deepcopy(WHISPER_CONFIG_FULL),
        )
    if size == "tiny":
        return _tiny_configs()
    raise ValueError(f"size must be 'tiny' or 'full', got {size!r}")


# -- layout -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFiles:
    """The files of one models dir, all checked to exist."""

    root: Path
    unet_config: Path
    unet_weights: Path
    vae_dir: Path
    vae_weights: Path
    whisper_dir: Path
    whisper_weights: Path


def _first_existing(folder: Path, names: tuple[str, ...]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def check_layout(models_dir: str | Path) -> ModelFiles:
    """The model files under `models_dir`; raises EngineError naming every missing one."""
    root = Path(models_dir).expanduser()
    missing: list[str] = []
    required = [
        f"{UNET_DIR}/musetalk.json",
        f"{UNET_DIR}/unet.pth",
        f"{VAE_DIR}/config.json",
        f"{WHISPER_DIR}/config.json",
        f"{WHISPER_DIR}/preprocessor_config.json",
    ]
    missing += [rel for rel in required if not (root / rel).is_file()]
    vae_weights = _first_existing(root / VAE_DIR, VAE_WEIGHT_NAMES)
    if vae_weights is None:
        missing.append(f"{VAE_DIR}/{VAE_WEIGHT_NAMES[1]} (or .safetensors)")
    whisper_weights = _first_existing(root / WHISPER_DIR, WHISPER_WEIGHT_NAMES)
    if whisper_weights is None:
        missing.append(f"{WHISPER_DIR}/{WHISPER_WEIGHT_NAMES[1]} (or {WHISPER_WEIGHT_NAMES[0]})")
    if missing:
        raise EngineError(
            f"MuseTalk weights incomplete in {root}: missing {', '.join(missing)}. "
            "Run `lipstream models download` (or `lipstream models make-random` for tests)."
        )
    assert vae_weights is not None and whisper_weights is not None
    return ModelFiles(
        root=root,
        unet_config=root / UNET_DIR / "musetalk.json",
        unet_weights=root / UNET_DIR / "unet.pth",
        vae_dir=root / VAE_DIR,
        vae_weights=vae_weights,
        whisper_dir=root / WHISPER_DIR,
        whisper_weights=whisper_weights,
    )


def weights_key(path: str | Path) -> str:
    """A cheap identity for a weights file (or folder): sizes, mtimes and sampled bytes.

    Used to tag avatar latents with the VAE that made them. Reads at most 192 KiB per file.
    """
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    h = hashlib.sha256()
    sample = 64 * 1024
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
        with f.open("rb") as fh:
            for offset in (0, max(0, st.st_size // 2 - sample // 2), max(0, st.st_size - sample)):
                fh.seek(offset)
                h.update(fh.read(sample))
    return h.hexdigest()[:20]


# -- loading ----------------------------------------------------------------------------


def _placed(model: Any, device: str | torch.device, dtype: torch.dtype) -> Any:
    """`model` in eval mode without grads on `device` in `dtype` (cast only when needed)."""
    if next(model.parameters()).dtype != dtype:
        model = model.to(dtype=dtype)
    return model.to(device=device).eval().requires_grad_(False)


def _unet_from_config(config: dict[str, Any]) -> Any:
    from diffusers import UNet2DConditionModel

    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    return UNet2DConditionModel(**kwargs)


def load_unet(models_dir: str | Path, device: str | torch.device, dtype: torch.dtype) -> Any:
    """The MuseTalk UNet (diffusers UNet2DConditionModel), eval mode, on `device` in `dtype`."""
    files = check_layout(models_dir)
    config = json.loads(files.unet_config.read_text())
    unet = _unet_from_config(config)
    state = torch.load(files.unet_weights, map_location="cpu", weights_only=True)
    unet.load_state_dict(state)
    return _placed(unet, device, dtype)


def load_vae(models_dir: str | Path, device: str | torch.device, dtype: torch.dtype) -> Any:
    """The sd-vae-ft-mse AutoencoderKL, eval mode; its `config.scaling_factor` is 0.18215."""
    from diffusers import AutoencoderKL

    files = check_layout(models_dir)
    vae = AutoencoderKL.from_pretrained(
        str(files.vae_dir),
        local_files_only=True,
        use_safetensors=files.vae_weights.suffix == ".safetensors",
        low_cpu_mem_usage=False,  # no `accelerate` needed
    )
    if abs(float(vae.config.scaling_factor) - VAE_SCALING_FACTOR) > 1e-9:
        raise EngineError(
            f"VAE scaling_factor is {vae.config.scaling_factor}, MuseTalk needs {VAE_SCALING_FACTOR}"
        )
    return _placed(vae, device, dtype)


def load_whisper(
    models_dir: str | Path, device: str | torch.device, dtype: torch.dtype
) -> tuple[Any, Any]:
    """(whisper encoder, WhisperFeatureExtractor), from local files only.

    The decoder is dropped after loading: MuseTalk only runs `whisper.encoder`.
    """
    from transformers import WhisperFeatureExtractor, WhisperModel

    files = check_layout(models_dir)
    model = WhisperModel.from_pretrained(
        str(files.whisper_dir),
        local_files_only=True,
        use_safetensors=files.whisper_weights.suffix == ".safetensors",
    )
    encoder = model.get_encoder().to(device=device, dtype=dtype).eval().requires_grad_(False)
    del model
    extractor = WhisperFeatureExtractor.from_pretrained(
        str(files.whisper_dir), local_files_only=True
    )
    window = encoder.config.max_source_positions * 2 * extractor.hop_length
    if extractor.n_samples != window:
        raise EngineError(
            f"whisper preprocessor window ({extractor.n_samples} samples) does not match the "
            f"encoder's ({window} samples = max_source_positions x 2 x hop)"
        )
    return encoder, extractor


# -- random weights ---------------------------------------------------------------------


def make_random(models_dir: str | Path, size: Size = "tiny", seed: int = 0) -> list[Path]:
    """Write random weights of `size` in MuseTalk's layout; returns the files written."""
    from diffusers import AutoencoderKL
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    unet_cfg, vae_cfg, whisper_cfg = configs(size)
    root = Path(models_dir).expanduser()
    for sub in (UNET_DIR, VAE_DIR, WHISPER_DIR):
        (root / sub).mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    torch.manual_seed(seed)

    (root / UNET_DIR / "musetalk.json").write_text(json.dumps(unet_cfg, indent=2) + "\n")
    unet = _unet_from_config(unet_cfg)
    torch.save(unet.state_dict(), root / UNET_DIR / "unet.pth")
    written += [root / UNET_DIR / "musetalk.json", root / UNET_DIR / "unet.pth"]
    del unet

    vae: Any = AutoencoderKL(**{k: v for k, v in vae_cfg.items() if not k.startswith("_")})
    # MuseTalk's download fetches the .bin; write the same file (loaded with weights_only).
    vae.save_pretrained(str(root / VAE_DIR), safe_serialization=False)
    (root / VAE_DIR / "config.json").write_text(json.dumps(vae_cfg, indent=2) + "\n")
    written += [root / VAE_DIR / "config.json", root / VAE_DIR / "diffusion_pytorch_model.bin"]
    del vae

    whisper = WhisperModel(WhisperConfig(**whisper_cfg))
    # The same file name openai/whisper-tiny ships (transformers 5 would write safetensors).
    torch.save(whisper.state_dict(), root / WHISPER_DIR / "pytorch_model.bin")
    (root / WHISPER_DIR / "config.json").write_text(json.dumps(whisper_cfg, indent=2) + "\n")
    chunk_s = whisper_cfg["max_source_positions"] * 2 * HOP_LENGTH // 16_000
    WhisperFeatureExtractor(chunk_length=chunk_s).save_pretrained(str(root / WHISPER_DIR))
    written += [
        root / WHISPER_DIR / "config.json",
        root / WHISPER_DIR / "pytorch_model.bin",
        root / WHISPER_DIR / "preprocessor_config.json",
    ]
    del whisper
    check_layout(root)
    logger.info("wrote random MuseTalk weights", extra={"size": size, "dir": str(root)})
    return written


# -- download ---------------------------------------------------------------------------

DOWNLOADS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("TMElyralab/MuseTalk", "", (f"{UNET_DIR}/musetalk.json", f"{UNET_DIR}/unet.pth")),
    ("stabilityai/sd-vae-ft-mse", VAE_DIR, ("config.json", "diffusion_pytorch_model.bin")),
    (
        "openai/whisper-tiny",
        WHISPER_DIR,
        ("config.json", "pytorch_model.bin", "preprocessor_config.json"),
    ),
)


def download(models_dir: str | Path) -> ModelFiles:
    """Fetch MuseTalk v1.5's weights from the Hugging Face hub into `models_dir`
    (the same sources and layout as MuseTalk's download_weights.sh), with progress bars.

    Files already present are kept. Raises EngineError with a clear message when offline.
    """
    from huggingface_hub import snapshot_download

    root = Path(models_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    offline_env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    for repo, sub, patterns in DOWNLOADS:
        target = root / sub if sub else root
        if all((target / p).is_file() for p in patterns):
            logger.info("already present", extra={"repo": repo, "dir": str(target)})
            continue
        logger.info("downloading", extra={"repo": repo, "dir": str(target)})
        try:
            snapshot_download(repo_id=repo, local_dir=str(target), allow_patterns=list(patterns))
        except Exception as exc:
            why = "HF_HUB_OFFLINE is set" if offline_env else "no network or the hub is unreachable"
            raise EngineError(
                f"cannot download {repo} into {target}: {why} ({type(exc).__name__}: {exc}). "
                "Connect to the internet (or unset HF_HUB_OFFLINE) and run "
                "`lipstream models download` again, or copy MuseTalk's models/ folder there."
            ) from exc
        missing = [p for p in patterns if not (target / p).is_file()]
        if missing:
            raise EngineError(f"download of {repo} finished without {', '.join(missing)}")
    return check_layout(root)
