"""Warnings that a client can trigger at will, at most one line per kind per period.

`RateLimitedLog(logger).warning(key, message, extra)` logs the first line of `key` at once,
then nothing for that key until `every_s` has passed; the next line carries `suppressed=N`, the
lines left out in between. A flood of refused connections costs the log one line every few
seconds, not one per connection.
"""

from __future__ import annotations

import logging
import time
from typing import Any

DEFAULT_EVERY_S = 10.0


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, every_s: float = DEFAULT_EVERY_S) -> None:
        self.logger = logger
        self.every_s = every_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, key: str, message: str, extra: dict[str, Any] | None = None) -> bool:
        """Log `message` unless a line of `key` went out less than `every_s` ago; whether it
        was logged."""
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.every_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        self._last[key] = now
        fields = dict(extra or {})
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            fields["suppressed"] = suppressed
        self.logger.warning(message, extra=fields)
        return True
