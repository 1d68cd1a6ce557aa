"""At most `max_uploads_in_flight` uploads (`POST /v1/avatars`) being received at once.

An upload holds its connection for as long as its body takes (a slow client's can take minutes
within the body rate limit, `server.ops.conn_guard`). `UploadSlots`, an ASGI middleware,
answers the next one 503 with `Retry-After` and reason `uploads` before its body is read, logs
that (one line per 10 s) and counts it in `lipstream_uploads_refused_total{reason="uploads"}`.
"""

from __future__ import annotations

import logging

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from server.ops.log_limit import RateLimitedLog

log = logging.getLogger(__name__)

UPLOAD_PATHS = ("/v1/avatars", "/v1/avatars/")


class UploadSlots:
    def __init__(self, app: ASGIApp, limit: int, retry_after_s: int) -> None:
        self.app = app
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.in_flight = 0
        self.log = RateLimitedLog(log)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not (
            scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in UPLOAD_PATHS
        ):
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            self._refuse(scope)
            body = {
                "detail": f"{self.limit} uploads are being received already; retry later",
                "reason": "uploads",
            }
            headers = {"Retry-After": str(self.retry_after_s)}
            await JSONResponse(body, status_code=503, headers=headers)(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    def _refuse(self, scope: Scope) -> None:
        client = scope.get("client")
        self.log.warning(
            "uploads",
            "upload limit reached: upload refused",
            {"client": f"{client[0]}:{client[1]}" if client else "", "limit": self.limit},
        )
        metrics = getattr(scope["app"].state, "metrics", None) if "app" in scope else None
        if metrics is not None:
            metrics.uploads_refused.labels("uploads").inc()
