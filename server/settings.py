"""Server settings: one frozen, self-validating dataclass, from flags and `LIPSTREAM_*` variables.

Precedence: an explicit keyword (a CLI flag) > the environment variable `LIPSTREAM_<NAME>` >
the default below. `Settings.from_env(**overrides)` builds one; `Settings(...)` takes values as
they are (tests).

`EncoderTuning` is the part of the settings that sets up the video codecs (threads, speed,
denoiser, x264 preset), checked here; `server.media.encoder_tuning` applies it to the codecs
aiortc opens.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engines.pipeline.scheduler import GATHER_S
from server.ops.malloc_tuning import MAX_INTERVAL_S

ENV_PREFIX = "LIPSTREAM_"
ENGINE_KINDS = ("auto", "musetalk", "preview")
ADMIT_MAX_LATE_GPU = 0.02  # `admit_max_late`'s auto value with the GPU scheduler


class SettingsError(ValueError):
    """A setting has a value the server cannot run with."""


X264_PRESETS = (
    "ultrafast",
    "superfast",
    "veryfast",
    "faster",
    "fast",
    "medium",
    "slow",
    "slower",
    "veryslow",
)
MAX_ENCODER_THREADS = 16
# EncoderTuning's fields and the server settings they come from
ENCODER_SETTING_NAMES = {
    "vp8_threads": "video_encoder_threads",
    "vp8_cpu_used": "vp8_cpu_used",
    "vp8_noise_sensitivity": "vp8_noise_sensitivity",
    "h264_threads": "h264_encoder_threads",
    "h264_preset": "h264_preset",
}


@dataclass(frozen=True)
class EncoderTuning:
    """The settings video_encoder_threads, vp8_cpu_used, vp8_noise_sensitivity,
    h264_encoder_threads and h264_preset, checked; the defaults are the server's. Threads 0:
    the library's own choice (aiortc's for VP8: 2 at 720p on 3+ cores; FFmpeg's for H.264)."""

    vp8_threads: int = 1
    vp8_cpu_used: int = -6
    vp8_noise_sensitivity: int = 0
    h264_threads: int = 1
    h264_preset: str = "superfast"

    def __post_init__(self) -> None:
        for name, value in (
            ("video_encoder_threads", self.vp8_threads),
            ("h264_encoder_threads", self.h264_threads),
        ):
            if not 0 <= value <= MAX_ENCODER_THREADS:
                raise ValueError(
                    f"{name} must be in 0..{MAX_ENCODER_THREADS} (0: the codec library's choice), "
                    f"got {value}"
                )
        if not -16 <= self.vp8_cpu_used <= 16:
            raise ValueError(
                f"vp8_cpu_used must be in -16..16 (further from 0: faster), got {self.vp8_cpu_used}"
            )
        if not 0 <= self.vp8_noise_sensitivity <= 6:
            raise ValueError(
                f"vp8_noise_sensitivity must be in 0..6 (0: no denoiser), "
                f"got {self.vp8_noise_sensitivity}"
            )
        if self.h264_preset not in X264_PRESETS:
            raise ValueError(
                f"h264_preset must be one of {', '.join(X264_PRESETS)}, got {self.h264_preset!r}"
            )

    @classmethod
    def aiortc(cls) -> EncoderTuning:
        """What aiortc does left alone (the bench's baseline)."""
        return cls(
            vp8_threads=0,
            vp8_cpu_used=-6,
            vp8_noise_sensitivity=4,
            h264_threads=0,
            h264_preset="medium",
        )

    @classmethod
    def from_settings(cls, settings: Any) -> EncoderTuning:
        return cls(**{f: getattr(settings, name) for f, name in ENCODER_SETTING_NAMES.items()})

    def as_settings(self) -> dict[str, Any]:
        """The server settings that give this tuning."""
        return {name: getattr(self, f) for f, name in ENCODER_SETTING_NAMES.items()}

    def as_dict(self) -> dict[str, Any]:
        """For a media process's "open" message (`from_dict` reads it back)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderTuning:
        """`as_dict`'s output back (missing fields: the defaults); ValueError if malformed."""
        if not isinstance(d, dict) or not set(d) <= set(ENCODER_SETTING_NAMES):
            raise ValueError(f"not an encoder tuning: {d!r:.200}")
        defaults = cls()
        if not all(isinstance(v, type(getattr(defaults, k))) for k, v in d.items()):
            raise ValueError(f"encoder tuning of the wrong types: {d!r:.200}")
        return cls(**d)


@dataclass(frozen=True)
class Settings:
    """Everything `lipstream serve` can be told. Times in seconds, sizes in bytes."""

    host: str = "127.0.0.1"
    port: int = 8000
    engine: str = "auto"
    models_dir: Path | None = None  # None: lipstream.paths default
    avatars_dir: Path | None = None  # None: lipstream.paths default
    device: str = "auto"
    # several GPUs (server.session.placement): "" = the one `device`; `all` or indices `0,1`
    devices: str = ""
    backend: str = "auto"  # on a GPU: compiled (tensorrt where it imports); on CPU: torch
    demo_avatar: bool = False
    # sessions
    max_sessions: int = 8
    # avatars kept resident on the GPU with no session using them, the most recently used
    # (one device; with several an avatar leaves a GPU as soon as no session there uses it)
    idle_avatars: int = 8
    retry_after_s: int = 5
    idle_timeout_s: float = 300.0  # no audio or control message for this long -> session ends
    connect_timeout_s: float = 30.0  # peer not connected within this long -> session ends
    ice_servers: tuple[str, ...] = ()  # e.g. ("stun:stun.l.google.com:19302",); none by default
    # the TURN servers' long-term credentials (docs/operations.md "WebRTC through NAT")
    ice_username: str | None = None
    ice_credential: str | None = field(default=None, repr=False)
    # behind 1:1 NAT (a container with its UDP ports published): the address the answer's host
    # candidates name instead of the local one ("": as found; server.media.advertise)
    ice_advertise_address: str = ""
    # "LOW-HIGH": the UDP ports the host candidates bind to ("": the kernel's ephemeral range;
    # server.media.ice_ports)
    ice_port_range: str = ""
    # browser pages on other origins allowed to call /v1 and /whep (CORS): e.g.
    # ("https://app.example.com",), or ("*",) for any; none by default (same origin only)
    cors_origins: tuple[str, ...] = ()
    # a fleet behind a load balancer (docs/operations.md "A fleet"): this server's name, in its
    # session ids (se_<server_id>-...) so the balancer routes by it; a TCP port answering
    # HAProxy's agent-check with the free capacity (server.ops.agent_check; 0: off)
    server_id: str = ""
    agent_port: int = 0
    # playout
    # an utterance starts this many frames after its first frame is taken (at least; more
    # while the engine's steps take longer than a frame)
    start_lead_frames: int = 1
    # ...and far enough ahead to cover this quantile of the frame worker's recent turnarounds
    # (frames handed over -> back on the event loop, all sessions, last 5 s; server.session.turnaround),
    # so an utterance does not start with less slack than the worker is taking. 0: off
    lead_quantile: float = 0.98
    max_ahead_frames: int = 25  # frames made ahead of playback per session (memory bound)
    hold_frames: int = 3  # a late frame repeats the previous one this many times, then idle
    track_queue_frames: int = 10  # frames waiting for the encoder before the oldest is dropped
    # WebRTC in media processes (0: in the server process; -1: auto, one per 6 sessions
    # beyond 8, at most half the cores; README "Configuration")
    media_processes: int = -1
    # worker
    max_batch: int = 16  # frames per engine step, across sessions
    # GPU scheduler: wait up to this long for more frames when a GPU slot frees while another
    # batch still runs (fewer, larger batches; 0: off). README "Benchmarks"
    gather_ms: float = GATHER_S * 1e3
    # a new session is refused (503, reason "overloaded") while more than this fraction of the
    # speaking frames of the last 10 s came back from the engine too late, or of the video
    # frames were dropped before the encoders (server.session.overload).
    # -1: auto, 0.02 with the GPU scheduler, off on the CPU; 0: off
    admit_max_late: float = -1.0
    # input limits
    max_upload_bytes: int = 100 * 1024 * 1024
    max_sdp_bytes: int = 64 * 1024
    max_sdp_media: int = 4  # m= lines in an offer
    ws_max_message_bytes: int = 1024 * 1024
    # connections, under the app (server.ops.conn_guard, server.ops.ws_guard): open HTTP and
    # websocket connections (at the cap the longest-idle one is closed, else 503), request
    # headers (size; time from connecting), a body's time (body_timeout_s, plus a second per
    # body_min_rate bytes), a client not taking what is sent (send_timeout_s), uploads being
    # received at once (503 past it), a websocket's unsent bytes and the pings it may send
    max_connections: int = 2048
    max_header_bytes: int = 64 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    body_min_rate: int = 8 * 1024
    send_timeout_s: float = 30.0
    max_uploads_in_flight: int = 4
    ws_max_send_buffer_bytes: int = 1024 * 1024
    ws_ping_rate: float = 2.0  # a second, 10 at once
    # hardening (README "Security and limits")
    max_pending_avatars: int = 4  # uploads queued or being prepared; more -> 503
    avatar_max_side: int = 1920  # width and height of an uploaded picture or video
    avatar_max_seconds: float = 30.0
    avatar_max_frames: int = 750
    avatar_max_decoded_bytes: int = 2 * 1024**3  # frames x height x width x 3
    avatar_decode_timeout_s: float = 120.0
    audio_burst_s: float = 30.0  # audio a client may send ahead of real time
    audio_rate: float = 1.1  # then at most this many seconds of audio per second
    # a session's audio-websocket budget, whatever the messages hold; past it the socket closes
    # with 1008 (server.session.limits.MessageBudget). A browser sends 50 messages a second
    ws_messages_per_s: float = 250.0
    ws_message_burst: int = 2000
    ws_bytes_per_s: int = 256 * 1024  # 8x real-time PCM16 at 16 kHz
    ws_byte_burst: int = 4 * 1024 * 1024  # at least ws_max_message_bytes
    peer_silence_s: float = 10.0  # a connected peer sending nothing this long has vanished
    drain_grace_s: float = 30.0  # SIGTERM: live sessions may run this long, then exit
    # free heap pages go back to the kernel this often (server.ops.malloc_tuning; 0: never)
    malloc_trim_interval_s: float = 5.0
    # video encoders: only congestion or a limiting target move the bitrate (server.media.encoder_watch);
    # off: every bandwidth estimate reaches aiortc's encoder as aiortc does it
    steady_bitrate: bool = True
    # the video codecs aiortc opens (server.media.encoder_tuning; README *Video encoders*).
    # Threads per VP8 encoder (0: aiortc's choice, 2 at 720p): the sessions are the
    # parallelism, and libvpx's threads spin on a busy host
    video_encoder_threads: int = 1
    vp8_cpu_used: int = -6  # libvpx speed, -16..16 (aiortc's -6)
    vp8_noise_sensitivity: int = 0  # libvpx's denoiser, 0..6 (aiortc's 4: a camera's)
    # threads per H.264 (libx264) encoder, 1 for the same reason (0: FFmpeg's choice, as
    # aiortc leaves it: 1.5 per core, for every encoder)
    h264_encoder_threads: int = 1
    h264_preset: str = "superfast"  # x264 preset (aiortc leaves x264's medium: 3x the CPU)
    # once ready, move the startup heap out of the garbage collector's walks (server.ops.stall_watch)
    gc_freeze: bool = True
    # auth: None = no key asked for; several keys are separated by commas
    api_key: str | None = field(default=None, repr=False)
    insecure: bool = False  # allow a non-loopback host with no api_key
    # client demo folder served at / (None: the packaged client_demo)
    client_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.engine not in ENGINE_KINDS:
            raise SettingsError(
                f"engine must be one of {', '.join(ENGINE_KINDS)}, got {self.engine!r}"
            )
        if not 0 <= self.port <= 65535:
            raise SettingsError(f"port must be in 0..65535, got {self.port}")
        positive = (
            "max_sessions",
            "retry_after_s",
            "idle_timeout_s",
            "connect_timeout_s",
            "max_ahead_frames",
            "track_queue_frames",
            "max_batch",
            "max_upload_bytes",
            "max_sdp_bytes",
            "max_sdp_media",
            "ws_max_message_bytes",
            "max_pending_avatars",
            "avatar_max_side",
            "avatar_max_seconds",
            "avatar_max_frames",
            "avatar_max_decoded_bytes",
            "avatar_decode_timeout_s",
            "audio_burst_s",
            "audio_rate",
            "ws_messages_per_s",
            "ws_message_burst",
            "ws_bytes_per_s",
            "ws_byte_burst",
            "peer_silence_s",
            "drain_grace_s",
            "max_connections",
            "max_header_bytes",
            "header_timeout_s",
            "body_timeout_s",
            "body_min_rate",
            "send_timeout_s",
            "max_uploads_in_flight",
            "ws_max_send_buffer_bytes",
            "ws_ping_rate",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise SettingsError(f"{name} must be > 0, got {getattr(self, name)!r}")
        _check_fleet(self)
        _check_devices(self)
        port_range(self.ice_port_range)
        _check_origins(self.cors_origins)
        if self.idle_avatars < 0:
            raise SettingsError(f"idle_avatars must be >= 0, got {self.idle_avatars}")
        if self.ws_byte_burst < self.ws_max_message_bytes:
            raise SettingsError(
                f"ws_byte_burst ({self.ws_byte_burst}) must be at least ws_max_message_bytes "
                f"({self.ws_max_message_bytes}), or the largest message could never pass"
            )
        if self.media_processes < -1 or self.media_processes > 64:
            raise SettingsError(
                f"media_processes must be -1 (auto), 0 or up to 64, got {self.media_processes}"
            )
        if not 0 <= self.malloc_trim_interval_s <= MAX_INTERVAL_S:
            raise SettingsError(
                f"malloc_trim_interval_s must be in 0..{MAX_INTERVAL_S:g} (0: off), "
                f"got {self.malloc_trim_interval_s}"
            )
        if not 0 <= self.gather_ms <= 200:
            raise SettingsError(f"gather_ms must be in 0..200 (0: off), got {self.gather_ms}")
        if not (self.admit_max_late == -1 or 0 <= self.admit_max_late <= 1):
            raise SettingsError(
                f"admit_max_late must be -1 (auto) or in 0..1 (0: off), got {self.admit_max_late}"
            )
        try:
            self.encoder_tuning()
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
        if not 0 <= self.lead_quantile < 1:
            raise SettingsError(
                f"lead_quantile must be in [0, 1) (0: off), got {self.lead_quantile}"
            )
        for name in ("start_lead_frames", "hold_frames"):
            if getattr(self, name) < 0:
                raise SettingsError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.api_key is not None and any(len(k) < 8 for k in self.api_keys):
            raise SettingsError("every api_key must be at least 8 characters")
        if not self.api_keys and not self.insecure and not is_loopback(self.host):
            raise SettingsError(
                f"refusing to serve on {self.host!r} (not loopback) without an API key: set "
                "--api-key / LIPSTREAM_API_KEY, or pass --insecure to serve unauthenticated"
            )

    def encoder_tuning(self) -> EncoderTuning:
        """How the video codecs are set up (server.media.encoder_tuning applies it)."""
        return EncoderTuning.from_settings(self)

    def admit_late_limit(self, gpu: bool) -> float:
        """`admit_max_late`, with auto (-1) resolved: on with the GPU scheduler, where a
        session too many makes every session late, off on the CPU (0)."""
        if self.admit_max_late >= 0:
            return self.admit_max_late
        return ADMIT_MAX_LATE_GPU if gpu else 0.0

    def media_process_count(self) -> int:
        """`media_processes`, with auto (-1) resolved for this machine."""
        if self.media_processes >= 0:
            return self.media_processes
        if self.max_sessions <= 8:
            return 0
        return max(1, min(math.ceil(self.max_sessions / 6), (os.cpu_count() or 2) // 2))

    @property
    def api_keys(self) -> tuple[str, ...]:
        """The accepted API keys (`api_key` split at commas; empty: none asked for)."""
        if self.api_key is None:
            return ()
        return tuple(k.strip() for k in self.api_key.split(",") if k.strip()) or ("",)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then `LIPSTREAM_*` variables, then `overrides` whose value is not None."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = _parse(f.name, f.type, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        for name in ("models_dir", "avatars_dir", "client_dir"):
            if values.get(name) is not None:
                values[name] = Path(values[name]).expanduser()
        for name in ("ice_servers", "cors_origins"):
            if isinstance(values.get(name), list):
                values[name] = tuple(values[name])
        return cls(**values)

    def public(self) -> dict[str, Any]:
        """The settings as plain values, secrets left out (for logs and /readyz)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in ("api_key", "ice_credential"):
                out[f"{f.name}_set"] = getattr(self, f.name) is not None
                continue
            v = getattr(self, f.name)
            out[f.name] = str(v) if isinstance(v, Path) else v
        return out


def _check_fleet(s: Settings) -> None:
    if not re.fullmatch(r"[a-z0-9]{0,16}", s.server_id):
        raise SettingsError(f"server_id must be 0-16 of a-z, 0-9, got {s.server_id!r}")
    if not 0 <= s.agent_port <= 65535:
        raise SettingsError(f"agent_port must be in 0..65535 (0: off), got {s.agent_port}")
    if s.ice_advertise_address:
        try:
            ipaddress.ip_address(s.ice_advertise_address)
        except ValueError:
            raise SettingsError(
                f"ice_advertise_address must be an IP address, got {s.ice_advertise_address!r}"
            ) from None


def port_range(spec: str) -> tuple[int, int] | None:
    """`ice_port_range` as (low, high), None where unset; SettingsError unless LOW-HIGH with
    1024 <= LOW <= HIGH <= 65535."""
    if not spec:
        return None
    m = re.fullmatch(r"\s*(\d{1,5})\s*-\s*(\d{1,5})\s*", spec)
    low, high = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    if not 1024 <= low <= high <= 65535:
        raise SettingsError(
            f"ice_port_range must be LOW-HIGH within 1024-65535, e.g. 40000-40099, got {spec!r}"
        )
    return low, high


def _check_origins(origins: tuple[str, ...]) -> None:
    for origin in origins:
        if origin != "*" and not re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+", origin):
            raise SettingsError(
                "cors_origins must be `*` or origins like https://app.example.com (scheme, "
                f"host, optional port; no path), got {origin!r}"
            )


def _check_devices(s: Settings) -> None:
    if s.devices and not re.fullmatch(r"all|\d+(,\d+)*", s.devices):
        raise SettingsError(f"devices must be `all` or GPU indices like 0,1,2, got {s.devices!r}")
    if s.devices and s.device != "auto":
        raise SettingsError("set device or devices, not both (devices names the GPUs)")


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """`["name=value", ...]` (the CLI's `--set`) -> typed overrides for `Settings.from_env`."""
    fields = {f.name: f.type for f in dataclasses.fields(Settings)}
    out: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        name = name.strip().lower().replace("-", "_")
        if not sep or name not in fields:
            raise SettingsError(f"--set wants NAME=VALUE with a setting's name, got {item!r}")
        out[name] = _parse(name, fields[name], raw.strip())
    return out


def is_loopback(host: str) -> bool:
    """Whether binding `host` serves this machine only (127.0.0.0/8, ::1, localhost)."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # another host name: assume it is reachable from elsewhere


def _parse(name: str, annotation: Any, raw: str) -> Any:
    text = str(annotation)
    try:
        if text.startswith("bool"):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if text.startswith("int"):
            return int(raw)
        if text.startswith("float"):
            return float(raw)
        if text.startswith("tuple"):
            return tuple(s.strip() for s in raw.split(",") if s.strip())
    except ValueError:
        raise SettingsError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid {text}") from None
    return raw
