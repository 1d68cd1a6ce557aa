"""Authentication: API keys (bearer) for REST, per-session tokens for websockets, no secrets in logs.

- `require_api_key` (a FastAPI dependency on the `/v1` routers) answers 401 unless the request
  carries one of the configured keys. It runs before the endpoint reads the body, so an
  unauthenticated upload or offer costs no body read, decode, WebRTC or engine work.
  No key configured: everything is allowed (the settings refuse a non-loopback host then,
  unless `insecure`).
- `token_matches` compares a session token in constant time (the audio websocket uses it).
- `install_log_redaction` keeps secrets out of logs: uvicorn logs request lines with their query
  string (`?token=...`), so a filter on the uvicorn loggers rewrites `token=`, `key=` and
  `Bearer ...` values; the configured keys themselves are replaced wherever they appear.
"""

from __future__ import annotations

import logging
import re
import secrets

from fastapi import HTTPException, Request

log = logging.getLogger(__name__)

REDACTED = "<redacted>"
_SECRET_PARAM = re.compile(r"((?:token|api_key|key|access_token)=)[^&\s\"']+", re.IGNORECASE)
_BEARER = re.compile(r"(bearer\s+)[^\s\"']+", re.IGNORECASE)
LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "")


def key_matches(given: str, keys: tuple[str, ...]) -> bool:
    """Whether `given` is one of `keys`; every key is compared, each in constant time."""
    ok = False
    for key in keys:
        ok |= secrets.compare_digest(given.encode(), key.encode())
    return ok


def token_matches(given: str, token: str) -> bool:
    return secrets.compare_digest(given.encode("utf-8", "surrogatepass"), token.encode())


def require_api_key(request: Request) -> None:
    """FastAPI dependency: 401 unless the request carries a configured key."""
    keys: tuple[str, ...] = request.app.state.settings.api_keys
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not key_matches(given.strip(), keys):
        request.app.state.metrics.auth_refused.inc()
        raise HTTPException(
            status_code=401,
            detail="missing or wrong API key (Authorization: Bearer <key>)",
            headers={"WWW-Authenticate": "Bearer"},
        )


def redact(text: str, keys: tuple[str, ...] = ()) -> str:
    """`text` with secret query parameters, bearer credentials and `keys` replaced."""
    for key in keys:
        if key:
            text = text.replace(key, REDACTED)
    text = _SECRET_PARAM.sub(rf"\1{REDACTED}", text)
    return _BEARER.sub(rf"\1{REDACTED}", text)


class RedactingFilter(logging.Filter):
    """Rewrites a record's message template and each of its string arguments with `redact`.

    The arguments keep their number and types: formatters may read them (uvicorn's access
    formatter unpacks exactly five). Only where a secret would still show in the formatted
    message (it came from a non-string argument) is the message replaced by its redacted text
    and the arguments dropped."""

    def __init__(self, keys: tuple[str, ...] = ()) -> None:
        super().__init__("lipstream-redact")
        self.keys = keys

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to the handler's own error path
            return True
        if redact(message, self.keys) == message:
            return True
        if isinstance(record.msg, str):
            record.msg = redact(record.msg, self.keys)
        args = record.args
        if isinstance(args, tuple):
            record.args = tuple(self._clean(a) for a in args)
        elif isinstance(args, dict):
            record.args = {k: self._clean(v) for k, v in args.items()}
        try:
            leaked = redact(record.getMessage(), self.keys) != record.getMessage()
        except Exception:
            leaked = True
        if leaked:
            record.msg, record.args = redact(message, self.keys), ()
        return True

    def _clean(self, value: object) -> object:
        return redact(value, self.keys) if isinstance(value, str) else value


def install_log_redaction(keys: tuple[str, ...]) -> RedactingFilter:
    """Put one `RedactingFilter` on uvicorn's loggers, the root logger and their handlers
    (replacing an earlier one); returns it."""
    flt = RedactingFilter(keys)
    for name in LOGGERS:
        logger = logging.getLogger(name)
        for target in (logger, *logger.handlers):
            for old in [f for f in target.filters if isinstance(f, RedactingFilter)]:
                target.removeFilter(old)
            target.addFilter(flt)
    return flt
