"""The FastAPI application: `create_app(settings, engine=None)`.

The lifespan builds the parts in order (engines -> frame workers -> avatar service -> session
manager) behind an open port (`server.ops.starting`: /readyz says `starting` with the warm-up's
progress meanwhile) and takes them down in reverse: sessions end, preparation stops, the
worker joins.
The frame worker is the GPU scheduler where the engine is MuseTalk on a CUDA device (backend
from the settings), else the synchronous FrameWorker (`server.session.gpu_worker.create_worker`).
With `devices` naming several GPUs there is one engine and one worker per GPU behind the one
front (`server.session.devices`: sessions placed by load, a faulted GPU failing only its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import client_demo
from avatars.store import AvatarStore
from engines.base import Engine, EngineError
from lipstream.paths import avatars_dir, models_dir
from server.api import audio_ws
from server.api import avatars as avatars_api
from server.api import livekit as livekit_api
from server.api import sessions as sessions_api
from server.api import whep as whep_api
from server.api.upload_slots import UploadSlots
from server.auth import install_log_redaction, require_api_key
from server.avatar_service import AvatarService
from server.media.link import LocalHost, MediaHost
from server.media.pictures import IdleFrames
from server.media.pool import MediaPool
from server.metrics import ServerMetrics
from server.ops import malloc_tuning, stall_watch
from server.ops.agent_check import AgentCheck
from server.ops.conn_guard import ConnectionGuard, ConnectionLimits, GuardedHttpProtocol, bound
from server.ops.starting import StartingGate, cancel_start, start_in_background, starting_body
from server.ops.ws_guard import GuardedWebSocketProtocol
from server.session.devices import Devices, Unit, build_units, warm_engines
from server.session.limits import decode_limits
from server.session.manager import SessionManager
from server.session.placement import device_list
from server.settings import Settings

log = logging.getLogger(__name__)

DEMO_AVATAR_NAME = "astronaut"
_STATIC_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,100}")


def build_engine(settings: Settings) -> tuple[Engine, str]:
    """The engine the settings ask for, and why it was chosen (raises EngineError)."""
    from engines.backends import create_engine

    return create_engine(
        settings.engine,
        settings.models_dir,
        settings.device,
        settings.backend,
        download_missing=True,
    )


def build_engines(settings: Settings, names: tuple[str, ...]) -> tuple[dict[str, Engine], str]:
    """One engine per device in `names` (loaded in parallel threads), and why it was chosen."""
    from concurrent.futures import ThreadPoolExecutor

    from engines.backends import create_engine

    def one(name: str) -> tuple[Engine, str]:
        return create_engine(
            settings.engine, settings.models_dir, name, settings.backend, download_missing=True
        )

    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        built = list(pool.map(one, names))
    return {n: e for n, (e, _) in zip(names, built, strict=True)}, built[0][1]


def gpu_count() -> int:
    """How many CUDA GPUs torch sees (0 without torch or CUDA)."""
    try:
        import torch
    except ImportError:
        return 0
    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def engines_for(settings: Settings) -> tuple[dict[str, Engine], str]:
    """The engines the settings ask for: one per GPU of `devices`, else the one of `device`
    (keyed by its device). Raises EngineError."""
    if settings.devices:
        try:
            names = device_list(settings.devices, gpu_count())
        except ValueError as exc:
            raise EngineError(str(exc)) from None
        return build_engines(settings, names)
    engine, reason = build_engine(settings)
    return {device_name(engine, settings): engine}, reason


def device_name(engine: Engine, settings: Settings) -> str:
    """The name one engine's device goes by in /readyz and /metrics."""
    device = getattr(engine, "device", None)
    if device is not None:
        return str(device)
    return "cpu" if settings.device == "auto" else settings.device


def connection_limits(settings: Settings) -> ConnectionLimits:
    return ConnectionLimits(
        max_connections=settings.max_connections,
        max_header_bytes=settings.max_header_bytes,
        header_timeout_s=settings.header_timeout_s,
        body_timeout_s=settings.body_timeout_s,
        body_min_rate=settings.body_min_rate,
        send_timeout_s=settings.send_timeout_s,
        ws_max_send_buffer=settings.ws_max_send_buffer_bytes,
        ws_ping_rate=settings.ws_ping_rate,
    )


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The `uvicorn.Config` arguments every server of this app is run with: the HTTP and
    websocket protocols under the connection limits (server.ops.conn_guard, ws_guard) and
    the websocket message size limit."""
    guard = ConnectionGuard(connection_limits(settings))
    return {
        "http": bound(GuardedHttpProtocol, guard),
        "ws": bound(GuardedWebSocketProtocol, guard),
        "ws_max_size": settings.ws_max_message_bytes,
    }


def create_app(
    settings: Settings | None = None,
    engine: Engine | dict[str, Engine] | None = None,
    reason: str = "",
) -> FastAPI:
    """The app. `engine`: built already (one, or one per device name); None: built from the
    settings behind the open port."""
    settings = settings or Settings.from_env()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # the port opens now; the parts start behind it (server.ops.starting)
        task = start_in_background(app, lambda: _start(app, settings, engine, reason))
        try:
            yield
        finally:
            await cancel_start(task)
            await _stop(app)

    app = FastAPI(title="lipstream", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.ready = False
    app.state.started = False
    app.state.draining = False
    app.add_middleware(
        UploadSlots, limit=settings.max_uploads_in_flight, retry_after_s=settings.retry_after_s
    )
    app.add_middleware(StartingGate)
    if settings.cors_origins:  # outermost: preflights are answered even while starting
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "DELETE", "PATCH", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["Location", "Link", "Retry-After", "Accept-Post", "Allow"],
            max_age=600,
        )
    app.include_router(avatars_api.router)
    app.include_router(sessions_api.router)
    app.include_router(livekit_api.router)  # 501 where the livekit packages are missing
    app.include_router(audio_ws.router)
    app.include_router(whep_api.router)
    _health_routes(app)
    _client_routes(app, settings.client_dir or Path(client_demo.__file__).parent)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=exc, extra={"path": request.url.path})
        return JSONResponse({"detail": "internal error"}, status_code=500)

    return app


async def _start(
    app: FastAPI, settings: Settings, engine: Engine | dict[str, Engine] | None, reason: str
) -> None:
    metrics = ServerMetrics()
    if engine is None:
        engines, reason = await asyncio.to_thread(engines_for, settings)
    elif isinstance(engine, dict):
        engines = dict(engine)
    else:
        engines = {device_name(engine, settings): engine}
    await _start_parts(app, settings, engines, reason, metrics)


async def _start_parts(
    app: FastAPI,
    settings: Settings,
    engines: dict[str, Engine],
    reason: str,
    metrics: ServerMetrics,
) -> None:
    install_log_redaction(settings.api_keys)  # uvicorn's loggers are configured by now
    engine = next(iter(engines.values()))
    log.info(
        "engine chosen",
        extra={"engine": engine.name, "reason": reason, "devices": ",".join(engines)},
    )
    # GPU: builds each pipeline and warms its backend up (compiled: compiles, minutes)
    units = await asyncio.to_thread(build_units, engines, settings, metrics)
    gpu = getattr(units[0].worker, "pipeline", None) is not None  # the GPU scheduler's pipeline
    devices = Devices(units, settings.max_sessions, settings.admit_late_limit(gpu))
    app.state.devices = devices  # now, so that a shutdown during the rest of the start stops them
    metrics.worker_queued.set_function(lambda: sum(u.worker.queued() for u in units))
    await warm_engines(units)
    store = AvatarStore(avatars_dir(settings.avatars_dir))
    idle_frames = IdleFrames()  # the sessions' pictures read it, the avatar service forgets
    avatars = AvatarService(
        store,
        devices,
        metrics,
        decode_limits(settings),
        idle_frames,
        models_dir=models_dir(settings.models_dir),
        device=settings.device,
    )
    await asyncio.to_thread(avatars.startup)
    media = media_host(settings)
    await media.start()  # media processes, where configured
    app.state.media = media
    sessions = SessionManager(
        settings, metrics, late_limit=settings.admit_late_limit(gpu), devices=devices
    )
    sessions.unload = _unloader(avatars, devices, settings.idle_avatars)
    sessions.start()
    metrics.speech_backlog.set_function(sessions.largest_backlog_s)
    metrics.worker_turnaround.set_function(sessions.turnaround_need_s)
    app.state.metrics = metrics
    app.state.engine = engine
    app.state.engine_reason = reason
    app.state.avatars = avatars
    app.state.idle_frames = idle_frames
    app.state.sessions = sessions
    if settings.demo_avatar:
        await asyncio.to_thread(register_demo_avatar, avatars)
    _watch_stalls(app, settings, metrics)
    if settings.agent_port:  # a fleet's balancer reads the free capacity (server.ops.agent_check)
        app.state.agent_check = await AgentCheck(app, settings.host, settings.agent_port).start()
    app.state.ready = True
    app.state.started = True
    log.info(
        "server ready",
        extra={
            "avatars_dir": str(store.root),
            "max_sessions": settings.max_sessions,
            **media.info(),
        },
    )


def _unloader(avatars: AvatarService, devices: Devices, idle_avatars: int) -> Any:
    """The session manager's `unload`, once no session on a unit uses an avatar: with several
    devices the avatar leaves that unit; with one, the least recently used unused avatars
    beyond `idle_avatars` leave it. Whether one is in use is re-read under its lock, so a
    session placed meanwhile keeps it."""
    keep = 0 if devices.several else idle_avatars

    async def unload(avatar_id: str, unit: Unit) -> None:
        def in_use() -> set[str]:
            return set(devices.placer.residency.resident(unit.device))

        await avatars.trim(unit, keep, in_use)

    return unload


def _watch_stalls(app: FastAPI, settings: Settings, metrics: ServerMetrics) -> None:
    """Loop lag, collector pauses and trim times into /metrics; the startup heap frozen."""
    if settings.gc_freeze:
        frozen = stall_watch.freeze_heap()
        log.info("startup heap frozen", extra={"objects": frozen})
    gc_pauses = stall_watch.GcPauses(metrics.gc_pause).install()
    app.state.gc_pauses = gc_pauses
    app.state.loop_lag = stall_watch.LoopLag(metrics.loop_lag, gc_pauses).start()
    malloc_tuning.observe_with(metrics.malloc_trim.observe)


def media_host(settings: Settings) -> MediaHost:
    """Where sessions' peer connections live: this process, or `media_processes` others."""
    n = settings.media_process_count()
    return MediaPool(settings, n) if n > 0 else LocalHost(settings)


async def _stop(app: FastAPI) -> None:
    app.state.ready = False
    app.state.draining = True
    agent: AgentCheck | None = getattr(app.state, "agent_check", None)
    if agent is not None:
        await agent.stop()
    sessions: SessionManager | None = getattr(app.state, "sessions", None)
    if sessions is not None:
        sessions.draining = True
        await sessions.stop()
    media: MediaHost | None = getattr(app.state, "media", None)
    if media is not None:
        await media.stop()
    loop_lag: stall_watch.LoopLag | None = getattr(app.state, "loop_lag", None)
    if loop_lag is not None:
        await loop_lag.stop()
    gc_pauses: stall_watch.GcPauses | None = getattr(app.state, "gc_pauses", None)
    if gc_pauses is not None:
        gc_pauses.uninstall()
    avatars: AvatarService | None = getattr(app.state, "avatars", None)
    if avatars is not None:
        avatars.shutdown()
    devices: Devices | None = getattr(app.state, "devices", None)
    if devices is not None:
        await asyncio.to_thread(devices.stop)


def register_demo_avatar(avatars: AvatarService) -> str | None:
    """Register scikit-image's astronaut as avatar "astronaut" unless one exists already."""
    if any(
        a.get("name") == DEMO_AVATAR_NAME and a.get("status") != "failed" for a in avatars.list()
    ):
        return None
    import cv2
    from skimage import data

    avatars.uploads_dir.mkdir(parents=True, exist_ok=True)
    path = avatars.uploads_dir / "demo-astronaut"
    ok, png = cv2.imencode(".png", cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("could not encode the demo avatar")
    path.write_bytes(png.tobytes())
    info = avatars.submit(path, DEMO_AVATAR_NAME, 0)
    log.info("demo avatar registered", extra={"avatar_id": info["id"]})
    return str(info["id"])


def _health_routes(app: FastAPI) -> None:
    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz(request: Request) -> Response:
        state = request.app.state
        if not state.started:  # the port is open, the parts are still starting (or failed)
            return JSONResponse(starting_body(state), status_code=503)
        devices: Devices = state.devices
        ok = bool(state.ready) and not state.draining and devices.alive
        status = "ready" if ok else ("draining" if state.draining else "starting")
        if ok and not state.media.available():
            ok, status = False, "media_down"  # every media process is down (being restarted)
        failed = devices.failed
        if failed and not devices.alive:
            ok, status = False, "engine_failed"  # a GPU error: the process must be restarted
        elif failed and ok:
            status = "degraded"  # a GPU failed: its sessions ended, the others serve on
        body: dict[str, Any] = {"status": status}
        if state.ready:
            now = asyncio.get_running_loop().time()
            body.update(
                engine=state.engine.name,
                engine_reason=state.engine_reason,
                sessions=len(state.sessions.sessions),
                max_sessions=state.settings.max_sessions,
                # speaking frames of the last 10 s made too late and video frames dropped
                # before the encoders (None: too few to judge), and the fraction above which
                # new sessions are refused (0: never; server.session.overload)
                engine_late_fraction=state.sessions.late.fraction(now),
                video_drop_fraction=state.sessions.late.drop_fraction(now),
                admit_max_late=state.sessions.late_limit,
                **state.media.info(),
            )
            if devices.several:
                body["devices"] = devices.report(now)
        if failed and not devices.several:
            body["engine_error"] = next(iter(failed.values()))
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        require_api_key(request)  # behind the key where one is set (Prometheus can send it)
        return Response(
            generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST
        )


def _client_routes(app: FastAPI, folder: Path) -> None:
    folder = folder.resolve()

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        page = folder / "index.html"
        if not page.is_file():
            return JSONResponse({"detail": "the client demo is not installed"}, status_code=404)
        return FileResponse(page, media_type="text/html")

    @app.get("/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        path = folder / name
        if not _STATIC_NAME.fullmatch(name) or name.endswith(".py") or not path.is_file():
            return JSONResponse({"detail": "not found"}, status_code=404)
        media = "text/javascript" if name.endswith(".js") else None
        return FileResponse(path, media_type=media)
