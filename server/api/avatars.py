"""REST for avatars: POST (202, prepared in the background), GET list/one, DELETE."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from avatars.store import (
    AvatarNotFoundError,
    AvatarStoreError,
    AvatarStoreFullError,
    validate_name,
)
from avatars.store_io import NO_SPACE
from server.api.uploads import UploadError, receive_upload
from server.auth import require_api_key
from server.avatar_service import AvatarService
from server.session.manager import SessionManager

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/avatars", tags=["avatars"], dependencies=[Depends(require_api_key)])

BBOX_SHIFT_RANGE = (-100, 100)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


def _service(request: Request) -> AvatarService:
    return request.app.state.avatars  # type: ignore[no-any-return]


@router.post("", status_code=202)
async def create_avatar(request: Request) -> Response:
    service = _service(request)
    settings = request.app.state.settings
    refused = _refuse_upload(request, service)
    if refused is not None:
        return refused
    try:
        upload = await receive_upload(request, service.uploads_dir, settings.max_upload_bytes)
    except UploadError as exc:
        return _error(exc.status, str(exc))
    try:
        name = validate_name(upload.fields.get("name") or "avatar")
        shift_text = upload.fields.get("bbox_shift", "0").strip() or "0"
        try:
            bbox_shift = int(shift_text)
        except ValueError:
            raise ValueError(f"bbox_shift must be an integer, got {shift_text[:20]!r}") from None
        lo, hi = BBOX_SHIFT_RANGE
        if not lo <= bbox_shift <= hi:
            raise ValueError(f"bbox_shift must be in {lo}..{hi}")
        info = service.submit(upload.path, name, bbox_shift)  # type: ignore[arg-type]
    except ValueError as exc:
        upload.discard()
        return _error(400, str(exc))
    except AvatarStoreFullError:
        upload.discard()
        log.warning("no space for a new avatar", extra={"avatars_dir": str(service.store.root)})
        return _error(507, f"{NO_SPACE}: the avatar cannot be stored")
    except AvatarStoreError as exc:
        upload.discard()
        log.error("avatar store refused a new avatar", extra={"error": str(exc)})
        return _error(503, "the avatar store is unavailable")
    return JSONResponse(info, status_code=202, headers={"Location": f"/v1/avatars/{info['id']}"})


def _refuse_upload(request: Request, service: AvatarService) -> Response | None:
    """503 before the body is read while draining or with too many preparations queued."""
    settings = request.app.state.settings
    if getattr(request.app.state, "draining", False):
        reason, message = "draining", "the server is shutting down"
    elif service.pending() >= settings.max_pending_avatars:
        reason = "busy"
        message = f"{settings.max_pending_avatars} avatars are being prepared already; retry later"
    else:
        return None
    request.app.state.metrics.uploads_refused.labels(reason).inc()
    return _error(503, message, headers={"Retry-After": str(settings.retry_after_s)})


@router.get("")
async def list_avatars(request: Request) -> dict[str, Any]:
    return {"avatars": _service(request).list()}


@router.get("/{avatar_id}")
async def get_avatar(avatar_id: str, request: Request) -> Response:
    try:
        return JSONResponse(_service(request).get(avatar_id))
    except AvatarNotFoundError as exc:
        return _error(404, str(exc))


@router.delete("/{avatar_id}")
async def delete_avatar(avatar_id: str, request: Request) -> Response:
    service = _service(request)
    sessions: SessionManager = request.app.state.sessions
    try:
        # from here on a session being opened for it is refused (404) or, if it was added
        # before, is among the sessions ended next: no await in between
        service.begin_delete(avatar_id)
    except AvatarNotFoundError as exc:
        return _error(404, str(exc))
    ended = await sessions.end_where("avatar_deleted", avatar_id=avatar_id)
    try:
        await service.delete(avatar_id)
    except AvatarNotFoundError as exc:
        return _error(404, str(exc))
    except OSError:
        log.exception("could not remove an avatar's files", extra={"avatar_id": avatar_id})
        return _error(503, "the avatar's files could not be removed; see the server log")
    return JSONResponse({"id": avatar_id, "deleted": True, "sessions_ended": ended})
