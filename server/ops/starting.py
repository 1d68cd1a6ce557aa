"""Serving while the server starts: the port opens at once, the parts start behind it.

On a GPU the compiled backend's warm-up takes minutes on a cold start. Rather than keep the
port closed all that time (an orchestrator's liveness probe would call the process dead, and a
user sees only "connection refused"), the lifespan starts the parts in a background task
(`start_in_background`) and uvicorn serves from the first second:

- `/healthz` answers 200 (the process is up);
- `/readyz` answers 503 `starting` with the warm-up's progress (`warm_up`:
  `engines.pipeline.warm_up`), then 200 once every part is up;
- the API (`/v1/...`) and `/metrics` answer 503 `starting` with Retry-After (`StartingGate`;
  a websocket is closed with 1013, "try again later"); the demo page is served.

A start that fails logs the error (CRITICAL), `/readyz` answers 503 `failed` with it, and
`on_failure` runs (`lipstream serve` then shuts uvicorn down and exits with status 1). A
shutdown during the start cancels it: the warm-up stops after the bucket it is compiling.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocketClose

from engines.pipeline.warm_up import progress

log = logging.getLogger(__name__)

RETRY_AFTER_S = 10
GATED_PREFIXES = ("/v1/", "/metrics")
TRY_AGAIN_LATER = 1013  # websocket close code


def start_in_background(app: FastAPI, start: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
    """Run `start()` (which sets `app.state.started` at its end) as a task; its failure goes
    to `app.state.start_error` and `app.state.on_start_failed` (where set)."""
    progress.reset()  # a server started earlier in this process may have cancelled its own
    app.state.started = False
    app.state.start_error = None

    async def run() -> None:
        try:
            await start()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.critical("server start failed: %s", exc, exc_info=exc)
            app.state.start_error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            on_failure = getattr(app.state, "on_start_failed", None)
            if on_failure is not None:
                on_failure()

    return asyncio.create_task(run(), name="lipstream-start")


async def cancel_start(task: asyncio.Task[None]) -> None:
    """A shutdown while the start runs: stop the warm-up at its next step, cancel the task."""
    if not task.done():
        progress.cancel()
        task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def wait_started(app: FastAPI, timeout_s: float = 60.0) -> None:
    """Wait for the start behind the open port to finish (for code that runs the lifespan
    itself); RuntimeError where it failed, TimeoutError past `timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not app.state.started:
        if app.state.start_error is not None:
            raise RuntimeError(f"the server failed to start: {app.state.start_error}")
        if loop.time() > deadline:
            raise TimeoutError("the server did not start in time")
        await asyncio.sleep(0.02)


def starting_body(state: Any) -> dict[str, Any]:
    """What /readyz (and a gated request) says before the server has started."""
    error = getattr(state, "start_error", None)
    if error is not None:
        return {"status": "failed", "error": error}
    body: dict[str, Any] = {"status": "starting"}
    snap = progress.snapshot()
    if snap is not None:
        body["warm_up"] = snap
    return body


class StartingGate:
    """ASGI middleware: until `app.state.started`, the gated paths answer 503 (see the
    module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and scope["path"].startswith(GATED_PREFIXES):
            state = scope["app"].state
            if not getattr(state, "started", True):
                if scope["type"] == "websocket":
                    await WebSocketClose(code=TRY_AGAIN_LATER)(scope, receive, send)
                    return
                body = starting_body(state)
                body["detail"] = (
                    f"the server failed to start: {body['error']}"
                    if body["status"] == "failed"
                    else "the server is starting (its engine is warming up): try again shortly"
                )
                headers = {"Retry-After": str(RETRY_AFTER_S)}
                await JSONResponse(body, status_code=503, headers=headers)(scope, receive, send)
                return
        await self.app(scope, receive, send)
