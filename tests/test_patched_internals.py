"""The library internals the code relies on, checked one by one, so that a new release of
aiortc, diffusers or transformers that moves one fails here with the name of what moved,
not deep inside a session or at weight-loading time. pyproject.toml bounds these libraries
below their next release; raise a bound once this file passes on it.

Who relies on what:
- `server.media.encoder_watch` replaces `aiortc.rtcrtpsender.get_encoder` (the one name the
  sender calls to make its encoder) and wraps the encoders it returns.
- `server.media.encoder_tuning` replaces the `av` module global of `aiortc.codecs.vpx` and
  `aiortc.codecs.h264`, through which those modules open their codec contexts.
- `server.media.ice_ports` replaces the `asyncio` module global of `aioice.ice`, through whose
  running loop `Connection.get_component_candidates` binds its host candidates' sockets.
- `server.media.webrtc` cancels RTCPeerConnection's private `__connect` task and, when
  `close()` fails, finishes its bookkeeping (`__isClosed`, `__update*State`).
- `server.ops.conn_guard` and `server.ops.ws_guard` subclass uvicorn's httptools and
  websockets (sans-I/O) protocols, overriding their parser callbacks and reading their state.
- `engines.pipeline.fold` swaps the VAE decoder's `Upsample2D` children by attribute name.
- `engines.musetalk.weights` loads checkpoints in the layouts their authors published:
  sd-vae-ft-mse's old attention key names (diffusers renames them on load), openai/whisper-tiny
  as a `WhisperForConditionalGeneration` (keys under `model.`), MuseTalk's `unet.pth` as a
  diffusers `UNet2DConditionModel` state dict.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch


def _moved(library: str, what: str, user: str) -> str:
    import importlib.metadata as md

    return (
        f"{library} {md.version(library)}: {what} changed; {user} relies on it "
        "(see tests/test_patched_internals.py and the bound in pyproject.toml)"
    )


# -- aiortc -------------------------------------------------------------------------------
def test_aiortc_sender_makes_its_encoder_through_the_module_global() -> None:
    import aiortc.rtcrtpsender as sender
    from aiortc import codecs

    user = "server.media.encoder_watch"
    assert callable(getattr(sender, "get_encoder", None)), _moved(
        "aiortc", "aiortc.rtcrtpsender.get_encoder", user
    )
    from server.media import encoder_watch

    # the server may already have wrapped it in this process (`encoder_watch.install`)
    assert sender.get_encoder in (codecs.get_encoder, encoder_watch._installed), _moved(
        "aiortc", "where rtcrtpsender's get_encoder comes from", user
    )
    assert "get_encoder(" in inspect.getsource(sender.RTCRtpSender), _moved(
        "aiortc", "RTCRtpSender's call of get_encoder", user
    )


def test_aioice_binds_host_candidates_through_its_asyncio_global() -> None:
    import aioice.ice as ice

    user = "server.media.ice_ports"
    assert hasattr(ice, "asyncio"), _moved("aioice", "aioice.ice's asyncio import", user)
    source = inspect.getsource(ice.Connection.get_component_candidates)
    assert "asyncio.get_running_loop()" in source, _moved(
        "aioice", "how get_component_candidates finds its loop", user
    )
    assert "create_datagram_endpoint(" in source and "local_addr=(address, 0)" in source, _moved(
        "aioice", "how get_component_candidates binds its host sockets", user
    )


@pytest.mark.parametrize(
    ("module_name", "class_name", "codec_name"),
    [
        ("aiortc.codecs.vpx", "Vp8Encoder", "libvpx"),
        ("aiortc.codecs.h264", "H264Encoder", "libx264"),
    ],
)
def test_aiortc_codec_modules_open_their_encoders_through_av(
    module_name: str, class_name: str, codec_name: str
) -> None:
    import importlib

    import av

    module = importlib.import_module(module_name)
    user = "server.media.encoder_tuning"
    from server.media import encoder_tuning

    # the server may already have replaced it in this process (`encoder_tuning.apply`)
    current = getattr(module, "av", None)
    assert current is av or isinstance(current, encoder_tuning._Av), _moved(
        "aiortc", f"{module_name}.av", user
    )
    source = inspect.getsource(getattr(module, class_name))
    assert f'av.CodecContext.create("{codec_name}", "w")' in source, _moved(
        "aiortc", f"how {class_name} opens its {codec_name} context", user
    )


@pytest.mark.parametrize(
    ("module_name", "class_name"), [("vpx", "Vp8Encoder"), ("h264", "H264Encoder")]
)
def test_aiortc_video_encoders_have_what_the_watch_wraps(module_name: str, class_name: str) -> None:
    import importlib

    cls = getattr(importlib.import_module(f"aiortc.codecs.{module_name}"), class_name)
    user = "server.media.encoder_watch.WatchedEncoder"
    params = list(inspect.signature(cls.encode).parameters)
    assert params[:3] == ["self", "frame", "force_keyframe"], _moved(
        "aiortc", f"{class_name}.encode's parameters ({params})", user
    )
    assert list(inspect.signature(cls.pack).parameters)[:2] == ["self", "packet"], _moved(
        "aiortc", f"{class_name}.pack's parameters", user
    )
    bitrate = inspect.getattr_static(cls, "target_bitrate", None)
    assert isinstance(bitrate, property) and bitrate.fset is not None, _moved(
        "aiortc", f"{class_name}.target_bitrate (a property with a setter)", user
    )
    encoder = cls()
    assert hasattr(encoder, "codec") and encoder.codec is None, _moved(
        "aiortc", f"{class_name}.codec (None until the first frame opens it)", user
    )
    assert int(encoder.target_bitrate) > 0


def test_aiortc_peer_connection_privates_used_to_close_it() -> None:
    from aiortc import RTCPeerConnection

    user = "server.media.webrtc.close_peer"
    connect = getattr(RTCPeerConnection, "_RTCPeerConnection__connect", None)
    assert connect is not None and inspect.iscoroutinefunction(connect), _moved(
        "aiortc", "RTCPeerConnection.__connect (an async method)", user
    )
    assert connect.__code__.co_varnames[:1] == ("self",), _moved(
        "aiortc", "RTCPeerConnection.__connect's `self`", user
    )
    for name in ("IceGatheringState", "IceConnectionState", "ConnectionState"):
        assert callable(getattr(RTCPeerConnection, f"_RTCPeerConnection__update{name}", None)), (
            _moved("aiortc", f"RTCPeerConnection.__update{name}", user)
        )
    assert isinstance(inspect.getattr_static(RTCPeerConnection, "sctp", None), property), _moved(
        "aiortc", "RTCPeerConnection.sctp", user
    )

    async def closed_peer() -> tuple[Any, Any, Any]:
        pc = RTCPeerConnection()
        pc.addTransceiver("video", direction="sendonly")
        transport = pc.getTransceivers()[0].receiver.transport
        await pc.close()
        return pc, transport, getattr(pc, "_RTCPeerConnection__isClosed", "missing")

    pc, transport, is_closed = asyncio.run(closed_peer())
    assert isinstance(is_closed, asyncio.Future) and is_closed.done(), _moved(
        "aiortc", "RTCPeerConnection.__isClosed (a future, done once closed)", user
    )
    assert callable(getattr(transport, "stop", None)) and callable(
        getattr(getattr(transport, "transport", None), "stop", None)
    ), _moved("aiortc", "a receiver's DTLS transport and its ICE transport (stop())", user)
    assert pc.connectionState == "closed"


# -- diffusers ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_vae() -> Any:
    from diffusers import AutoencoderKL

    from engines.musetalk.weights import configs

    _, vae_cfg, _ = configs("tiny")
    torch.manual_seed(0)
    return AutoencoderKL(**{k: v for k, v in vae_cfg.items() if not k.startswith("_")}).eval()


def test_diffusers_upsamplers_have_what_fold_reads(tiny_vae: Any) -> None:
    from engines.pipeline.fold import can_fold

    user = "engines.pipeline.fold"
    ups = [m for m in tiny_vae.decoder.modules() if type(m).__name__ == "Upsample2D"]
    assert len(ups) == 3, _moved("diffusers", "the VAE decoder's Upsample2D modules", user)
    for up in ups:
        for attr in ("use_conv", "use_conv_transpose", "interpolate", "norm", "name", "conv"):
            assert hasattr(up, attr), _moved("diffusers", f"Upsample2D.{attr}", user)
        assert can_fold(up), _moved("diffusers", "Upsample2D (nearest 2x + 3x3 conv)", user)


def _old_attention_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The key names of diffusers' attention blocks before 0.14, as sd-vae-ft-mse ships them."""
    renames = {
        ".to_q.": ".query.",
        ".to_k.": ".key.",
        ".to_v.": ".value.",
        ".to_out.0.": ".proj_attn.",
    }
    out = {}
    for key, value in state.items():
        for new, old in renames.items():
            if ".attentions." in key and new in key:
                key = key.replace(new, old)
        out[key] = value
    return out


def _models_copy(tiny_models_dir: Path, tmp_path: Path) -> Path:
    root = tmp_path / "models"
    shutil.copytree(tiny_models_dir, root)
    return root


def test_vae_loads_with_the_old_attention_key_names(tiny_models_dir: Path, tmp_path: Path) -> None:
    from engines.musetalk.weights import VAE_DIR, load_vae

    root = _models_copy(tiny_models_dir, tmp_path)
    reference = load_vae(root, "cpu", torch.float32)
    state = reference.state_dict()
    old = _old_attention_names(state)
    assert any(".query." in k for k in old) and not any(".to_q." in k for k in old)
    target = root / VAE_DIR / "diffusion_pytorch_model.bin"
    target.unlink()  # a new file: the reference's tensors may be mapped from the old one
    torch.save(old, target)
    loaded = load_vae(root, "cpu", torch.float32).state_dict()
    for key, value in state.items():
        assert key in loaded and torch.equal(loaded[key], value), _moved(
            "diffusers", f"the renaming of old attention keys on load ({key})", "load_vae"
        )


# -- transformers -------------------------------------------------------------------------
def test_whisper_loads_from_a_conditional_generation_checkpoint(
    tiny_models_dir: Path, tmp_path: Path
) -> None:
    """openai/whisper-tiny's weights are a WhisperForConditionalGeneration's (keys under
    `model.`, plus `proj_out`); `load_whisper` builds a WhisperModel's encoder from them."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from engines.musetalk.weights import HOP_LENGTH, WHISPER_DIR, load_whisper

    root = _models_copy(tiny_models_dir, tmp_path)
    config = json.loads((root / WHISPER_DIR / "config.json").read_text())
    torch.manual_seed(1)
    full = WhisperForConditionalGeneration(WhisperConfig(**config)).eval()
    state = full.state_dict()
    assert all(k.startswith(("model.", "proj_out.")) for k in state)
    torch.save(state, root / WHISPER_DIR / "pytorch_model.bin")

    encoder, extractor = load_whisper(root, "cpu", torch.float32)
    user = "engines.musetalk.weights.load_whisper"
    loaded = encoder.state_dict()
    for key, value in full.model.encoder.state_dict().items():
        assert key in loaded and torch.equal(loaded[key], value), _moved(
            "transformers", f"loading a WhisperForConditionalGeneration checkpoint ({key})", user
        )
    mel = torch.zeros(1, int(config["num_mel_bins"]), 2 * int(config["max_source_positions"]))
    with torch.no_grad():
        hidden = encoder(mel, output_hidden_states=True).hidden_states
    assert len(hidden) == int(config["encoder_layers"]) + 1, _moved(
        "transformers", "the encoder's hidden_states (embeddings + one per layer)", user
    )
    assert int(extractor.hop_length) == HOP_LENGTH


# -- MuseTalk's UNet checkpoint -----------------------------------------------------------
# Key names and shapes of MuseTalk v1.5's unet.pth (diffusers' UNet2DConditionModel layout
# for musetalk.json: 1x1 convolution projections, 384-d cross attention, 8 input channels).
UNET_KEYS = {
    "conv_in.weight": (320, 8, 3, 3),
    "time_embedding.linear_1.weight": (1280, 320),
    "down_blocks.0.resnets.0.norm1.weight": (320,),
    "down_blocks.0.resnets.0.time_emb_proj.weight": (320, 1280),
    "down_blocks.0.attentions.0.proj_in.weight": (320, 320, 1, 1),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight": (320, 320),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": (320, 384),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0.weight": (320, 320),
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
    "down_blocks.0.downsamplers.0.conv.weight": (320, 320, 3, 3),
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_v.weight": (1280, 384),
    "up_blocks.0.upsamplers.0.conv.weight": (1280, 1280, 3, 3),
    "up_blocks.3.attentions.2.proj_out.weight": (320, 320, 1, 1),
    "conv_norm_out.weight": (320,),
    "conv_out.weight": (4, 320, 3, 3),
}


def test_unet_state_dict_has_musetalks_key_names_and_shapes() -> None:
    from engines.musetalk.weights import UNET_CONFIG_FULL, _unet_from_config

    with torch.device("meta"):
        unet = _unet_from_config(UNET_CONFIG_FULL)
    shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    user = "engines.musetalk.weights.load_unet (MuseTalk's unet.pth)"
    for key, shape in UNET_KEYS.items():
        assert shapes.get(key) == shape, _moved(
            "diffusers", f"UNet2DConditionModel's {key} ({shapes.get(key)}, expected {shape})", user
        )


def test_uvicorn_protocol_internals_the_connection_limits_build_on() -> None:
    """`server.ops.conn_guard` subclasses uvicorn's httptools protocol (its data_received is a
    copy of uvicorn's, and it reads the request cycle's state); `server.ops.ws_guard` subclasses
    the websockets sans-I/O protocol (pings are answered in `handle_ping`)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    user = "server.ops.conn_guard / ws_guard"
    for name in (
        "data_received",
        "on_message_begin",
        "on_headers_complete",
        "on_body",
        "on_message_complete",
        "on_response_complete",
        "handle_websocket_upgrade",
        "send_400_response",
        "_unset_keepalive_if_required",
        "_should_upgrade",
        "_unsupported_upgrade_warning",
        "pause_writing",
        "resume_writing",
    ):
        assert callable(getattr(HttpToolsProtocol, name, None)), _moved(
            "uvicorn", f"HttpToolsProtocol.{name}", user
        )
    cycle = inspect.getsource(RequestResponseCycle)
    for attr in ("disconnected", "waiting_for_100_continue", "message_event", "response_started"):
        assert f"self.{attr}" in cycle, _moved("uvicorn", f"RequestResponseCycle.{attr}", user)
    source = inspect.getsource(HttpToolsProtocol)
    for attr in ("self.cycle", "self.flow", "self.pipeline", "self.parser", "self.client"):
        assert attr in source, _moved("uvicorn", f"HttpToolsProtocol {attr}", user)
    for name in ("data_received", "handle_ping", "handle_pong", "pause_writing", "resume_writing"):
        assert callable(getattr(WebSocketsSansIOProtocol, name, None)), _moved(
            "uvicorn", f"WebSocketsSansIOProtocol.{name}", user
        )
    ws = inspect.getsource(WebSocketsSansIOProtocol)
    for attr in ("self.conn", "self.close_sent", "self.client"):
        assert attr in ws, _moved("uvicorn", f"WebSocketsSansIOProtocol {attr}", user)
