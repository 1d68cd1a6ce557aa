"""MuseTalk weights: layout checks, random weights of both sizes, safe loading, download errors."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from engines.base import EngineError
from engines.musetalk import weights

REPO = Path(__file__).resolve().parents[1]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# -- layout -------------------------------------------------------------------------------
def test_check_layout_names_everything_missing(tmp_path: Path) -> None:
    with pytest.raises(EngineError) as err:
        weights.check_layout(tmp_path)
    msg = str(err.value)
    for rel in (
        "musetalkV15/musetalk.json",
        "musetalkV15/unet.pth",
        "sd-vae/config.json",
        "sd-vae/diffusion_pytorch_model.bin",
        "whisper/config.json",
        "whisper/pytorch_model.bin",
        "whisper/preprocessor_config.json",
    ):
        assert rel in msg
    assert "lipstream models download" in msg


@pytest.mark.parametrize(
    "rel",
    [
        "musetalkV15/unet.pth",
        "sd-vae/diffusion_pytorch_model.bin",
        "whisper/preprocessor_config.json",
    ],
)
def test_check_layout_names_exactly_the_missing_file(
    tiny_models_dir: Path, tmp_path: Path, rel: str
) -> None:
    root = _copy(tiny_models_dir, tmp_path / "m")
    weights.check_layout(root)  # complete
    (root / rel).unlink()
    with pytest.raises(EngineError) as err:
        weights.check_layout(root)
    missing = str(err.value).split("missing ", 1)[1].split(". Run", 1)[0]
    assert missing.startswith(rel)
    assert "," not in missing  # only that one


def test_safetensors_variants_are_accepted(tiny_models_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    root = _copy(tiny_models_dir, tmp_path / "m")
    for folder, old, new in (
        ("sd-vae", "diffusion_pytorch_model.bin", "diffusion_pytorch_model.safetensors"),
        ("whisper", "pytorch_model.bin", "model.safetensors"),
    ):
        state = torch.load(root / folder / old, weights_only=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(root / folder / new))
        (root / folder / old).unlink()
    files = weights.check_layout(root)
    assert files.vae_weights.suffix == files.whisper_weights.suffix == ".safetensors"
    vae_a = weights.load_vae(tiny_models_dir, "cpu", torch.float32)
    vae_b = weights.load_vae(root, "cpu", torch.float32)
    for (ka, a), (kb, b) in zip(
        vae_a.state_dict().items(), vae_b.state_dict().items(), strict=True
    ):
        assert ka == kb and torch.equal(a, b)
    enc_a, _ = weights.load_whisper(tiny_models_dir, "cpu", torch.float32)
    enc_b, _ = weights.load_whisper(root, "cpu", torch.float32)
    assert torch.equal(enc_a.conv1.weight, enc_b.conv1.weight)


# -- random weights -----------------------------------------------------------------------
def test_make_random_tiny_layout_and_configs(tiny_models_dir: Path) -> None:
    files = weights.check_layout(tiny_models_dir)
    unet = json.loads(files.unet_config.read_text())
    assert unet["in_channels"] == 8 and unet["out_channels"] == 4
    assert unet["cross_attention_dim"] == 384 and unet["attention_head_dim"] == 8
    vae = json.loads((files.vae_dir / "config.json").read_text())
    assert vae["latent_channels"] == 4 and len(vae["block_out_channels"]) == 4  # 8x down
    whisper = json.loads((files.whisper_dir / "config.json").read_text())
    assert whisper["d_model"] == 384 and whisper["encoder_layers"] == 4
    pre = json.loads((files.whisper_dir / "preprocessor_config.json").read_text())
    assert pre["n_samples"] == whisper["max_source_positions"] * 2 * 160
    assert pre["nb_max_frames"] == whisper["max_source_positions"] * 2


def test_tiny_models_load_with_the_right_shapes(tiny_models_dir: Path) -> None:
    unet = weights.load_unet(tiny_models_dir, "cpu", torch.float32)
    vae = weights.load_vae(tiny_models_dir, "cpu", torch.float32)
    encoder, extractor = weights.load_whisper(tiny_models_dir, "cpu", torch.float32)
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, 256, 256)).latent_dist.mode()
        assert z.shape == (1, 4, 32, 32)
        out = unet(torch.zeros(1, 8, 32, 32), 0, encoder_hidden_states=torch.zeros(1, 50, 384))
        assert out.sample.shape == (1, 4, 32, 32)
        mel = torch.zeros(1, 80, extractor.nb_max_frames)
        hidden = encoder(mel, output_hidden_states=True).hidden_states
    assert len(hidden) == 5 and hidden[0].shape[-1] == 384
    assert vae.config.scaling_factor == pytest.approx(0.18215)


def test_make_random_is_seeded(tmp_path: Path, tiny_models_dir: Path) -> None:
    weights.make_random(tmp_path / "a", "tiny", seed=0)
    weights.make_random(tmp_path / "b", "tiny", seed=1)
    ref = torch.load(tiny_models_dir / "musetalkV15/unet.pth", weights_only=True)
    same = torch.load(tmp_path / "a/musetalkV15/unet.pth", weights_only=True)
    other = torch.load(tmp_path / "b/musetalkV15/unet.pth", weights_only=True)
    assert all(torch.equal(ref[k], same[k]) for k in ref)
    assert not torch.equal(ref["conv_in.weight"], other["conv_in.weight"])
    key_a = weights.weights_key(tmp_path / "a/sd-vae/diffusion_pytorch_model.bin")
    key_b = weights.weights_key(tmp_path / "b/sd-vae/diffusion_pytorch_model.bin")
    assert key_a != key_b
    assert key_a == weights.weights_key(tmp_path / "a/sd-vae/diffusion_pytorch_model.bin")


def test_weights_key_notices_a_rewritten_file(tmp_path: Path) -> None:
    f = tmp_path / "w.bin"
    f.write_bytes(b"\0" * 300_000)
    k1 = weights.weights_key(f)
    before = f.stat()
    data = bytearray(f.read_bytes())
    data[150_000] = 1  # same size, same mtime (restored): only the sampled bytes differ
    f.write_bytes(bytes(data))
    os.utime(f, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert weights.weights_key(f) != k1


def test_full_configs_have_musetalks_real_shapes() -> None:
    """Built on the meta device: shapes and parameter counts without allocating 3.4 GB."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import WhisperConfig, WhisperModel

    unet_cfg, vae_cfg, whisper_cfg = weights.configs("full")
    assert unet_cfg["block_out_channels"] == [320, 640, 1280, 1280]
    assert unet_cfg["in_channels"] == 8 and unet_cfg["cross_attention_dim"] == 384
    assert unet_cfg["attention_head_dim"] == 8 and unet_cfg["layers_per_block"] == 2
    unet: Any
    vae: Any
    with torch.device("meta"):
        unet = UNet2DConditionModel(**{k: v for k, v in unet_cfg.items() if not k.startswith("_")})
        vae = AutoencoderKL(**{k: v for k, v in vae_cfg.items() if not k.startswith("_")})
        whisper = WhisperModel(WhisperConfig(**whisper_cfg))
    sd = unet.state_dict()
    assert tuple(sd["conv_in.weight"].shape) == (320, 8, 3, 3)
    assert tuple(sd["conv_out.weight"].shape) == (4, 320, 3, 3)
    k = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    assert tuple(sd[k].shape) == (320, 384)
    assert tuple(sd["mid_block.attentions.0.transformer_blocks.0.attn2.to_v.weight"].shape) == (
        1280,
        384,
    )
    n_unet = sum(p.numel() for p in unet.parameters())
    # SD1.5's UNet (859,520,964) with 384-d instead of 768-d keys/values in its 16 cross
    # attentions (sum of their widths: 12,480) and 8 instead of 4 input channels.
    assert n_unet == 859_520_964 - 2 * 384 * 12_480 + 320 * 4 * 9
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863  # sd-vae-ft-mse
    enc = whisper.get_encoder()
    assert enc.config.max_source_positions == 1500  # 30 s windows
    assert tuple(enc.conv1.weight.shape) == (384, 80, 3)
    assert len(enc.layers) == 4 and enc.layers[0].self_attn.num_heads == 6
    assert 37e6 < sum(p.numel() for p in whisper.parameters()) < 38e6  # whisper-tiny


# -- safe loading -------------------------------------------------------------------------
class _Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (print, ("pickled code ran",))


def test_unet_loads_with_weights_only(tiny_models_dir: Path, tmp_path: Path) -> None:
    root = _copy(tiny_models_dir, tmp_path / "m")
    unet = weights.load_unet(root, "cpu", torch.float32)
    state = torch.load(root / "musetalkV15/unet.pth", weights_only=True)
    assert torch.equal(unet.state_dict()["conv_in.weight"], state["conv_in.weight"])
    torch.save({"conv_in.weight": _Evil()}, root / "musetalkV15/unet.pth")
    with pytest.raises(pickle.UnpicklingError):
        weights.load_unet(root, "cpu", torch.float32)


# -- CLI and download ---------------------------------------------------------------------
def test_make_random_cli(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from lipstream.commands.models import models_app

    result = CliRunner().invoke(
        models_app, ["make-random", "--size", "tiny", "--dir", str(tmp_path), "--seed", "3"]
    )
    assert result.exit_code == 0, result.output
    assert "musetalkV15/unet.pth" in result.output
    weights.check_layout(tmp_path)


def test_download_offline_is_a_clear_error(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    code = "import sys; from lipstream.commands.models import models_app; models_app()"
    proc = subprocess.run(
        [sys.executable, "-c", code, "download", "--dir", str(tmp_path / "models")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 1
    assert "HF_HUB_OFFLINE is set" in proc.stderr
    assert "TMElyralab/MuseTalk" in proc.stderr
    assert "Traceback" not in proc.stderr
