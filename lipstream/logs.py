"""Log lines for people: the static message, then the values passed in `extra={...}`.

The code logs static messages with their values as fields (`log.info("avatar ready",
extra={"avatar_id": ...})`); `FieldsFormatter` prints every such field after the message as
`key=value`, in the order given:

    2026-01-01 12:00:00,000 INFO server.avatar_service: avatar ready avatar_id=av_0123 frames=250

A value with spaces, quotes or `=` in it, or an empty one, is quoted (JSON string rules), so
a line stays one line that a program can split.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any, TextIO

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Every attribute a LogRecord has of its own, and those that Formatter adds: the rest came in
# through `extra`.
STANDARD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}
# Fields other libraries attach for their own formatters (uvicorn: the message with colours).
IGNORED_FIELDS = frozenset({"color_message"})


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields `record` was given through `extra`, in the order given."""
    return {
        key: value
        for key, value in vars(record).items()
        if key not in STANDARD_ATTRIBUTES and key not in IGNORED_FIELDS and not key.startswith("_")
    }


def field_text(value: Any) -> str:
    """`value` as it appears after `key=`: bare where that is unambiguous, else quoted."""
    text = value if isinstance(value, str) else str(value)
    if text and not any(c.isspace() or c in '="' for c in text):
        return text
    return json.dumps(text, ensure_ascii=False)


class FieldsFormatter(logging.Formatter):
    """`logging.Formatter` that appends a record's extra fields as `key=value` after the
    message (before any traceback, which stays on the lines below)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        fields = extra_fields(record)
        if not fields:
            return line
        return line + " " + " ".join(f"{key}={field_text(value)}" for key, value in fields.items())


# uvicorn's `log_config`: its loggers keep no handlers of their own and pass their records to
# the root logger's, so its lines read like ours (uvicorn.error: "Started server process",
# uvicorn.access: one line per request).
UVICORN_LOG_CONFIG: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "loggers": {
        "uvicorn": {"handlers": [], "propagate": True},
        "uvicorn.error": {"handlers": [], "propagate": True},
        "uvicorn.access": {"handlers": [], "propagate": True},
    },
}


def setup(level: int | str = logging.INFO, stream: TextIO | None = None, fmt: str = FORMAT) -> None:
    """Log to `stream` (None: stderr) at `level` through `FieldsFormatter` with `fmt`, as
    `logging.basicConfig` does: nothing changes where the root logger already has a handler."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(FieldsFormatter(fmt))
    logging.basicConfig(level=level, handlers=[handler])


@contextlib.contextmanager
def to_current_stderr() -> Iterator[None]:
    """Inside the block, the root logger's stderr handlers write to whatever `sys.stderr` is
    when the block starts: under a rich progress bar, its proxy, which prints each line above
    the bar instead of through it."""
    swapped = [
        handler
        for handler in logging.getLogger().handlers
        if type(handler) is logging.StreamHandler and handler.stream is sys.__stderr__
    ]
    for handler in swapped:
        handler.setStream(sys.stderr)
    try:
        yield
    finally:
        for handler in swapped:
            handler.setStream(sys.__stderr__)  # type: ignore[arg-type]
