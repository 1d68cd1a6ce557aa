"""API key check for REST (a bearer token). No key configured: everything is allowed.

Issue 5 (hardening) builds on this: refusing to start on a non-loopback address without a key,
keys never logged. Session websockets use their own per-session token (see audio_ws).
"""

from __future__ import annotations

import secrets

from fastapi import HTTPException, Request


def require_api_key(request: Request) -> None:
    """FastAPI dependency: 401 unless the request carries the configured key."""
    key: str | None = request.app.state.settings.api_key
    if key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(
        given.strip().encode(), key.encode()
    ):
        raise HTTPException(
            status_code=401,
            detail="missing or wrong API key (Authorization: Bearer <key>)",
            headers={"WWW-Authenticate": "Bearer"},
        )
