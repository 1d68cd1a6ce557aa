"""The UDP ports of the ICE host candidates, from a fixed range (setting `ice_port_range`).

aioice binds each host candidate's socket with `loop.create_datagram_endpoint(...,
local_addr=(address, 0))`, so the kernel picks the port from its ephemeral range, and it takes
no port or range of its own. `apply(range)` gives `aioice.ice` an `asyncio` whose running loop
binds such a socket to a free port of the range instead (tried from a rotating start, so that
sessions spread over the range); every other call goes to the real module and loop unchanged.
A range with no free port left makes the bind fail as aioice expects (it logs "Could not bind"
and offers no host candidate on that address), and a warning says the range is too small.
One range per process: media processes apply the server's in `make_peer`, as the main one does.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
from typing import Any

from server.ops.log_limit import RateLimitedLog

log = logging.getLogger(__name__)

_applied: tuple[int, int] | None = None
_warnings = RateLimitedLog(log)


class _Ports:
    """The range's ports in turn, from where the last bind stopped."""

    def __init__(self, low: int, high: int) -> None:
        self.low, self.high = low, high
        self._next = itertools.cycle(range(low, high + 1))

    def order(self) -> list[int]:
        first = next(self._next)
        return [*range(first, self.high + 1), *range(self.low, first)]


class _Loop:
    """The running loop, binding port-0 datagram endpoints to the range."""

    def __init__(self, loop: asyncio.AbstractEventLoop, ports: _Ports) -> None:
        self._loop = loop
        self._ports = ports

    async def create_datagram_endpoint(self, factory: Any, *args: Any, **kwargs: Any) -> Any:
        local = kwargs.get("local_addr")
        if args or local is None or local[1] != 0:
            return await self._loop.create_datagram_endpoint(factory, *args, **kwargs)
        for port in self._ports.order():
            try:
                return await self._loop.create_datagram_endpoint(
                    factory, **{**kwargs, "local_addr": (local[0], port)}
                )
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
        _warnings.warning(
            "ice_port_range",
            "every port of ice_port_range is taken: no host candidate on this address "
            "(widen the range: each session takes one port per interface address)",
            {"low": self._ports.low, "high": self._ports.high, "address": local[0]},
        )
        raise OSError(errno.EADDRINUSE, "no free port in ice_port_range")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)


class _Asyncio:
    """`asyncio`, but whose running loop is a `_Loop`."""

    def __init__(self, ports: _Ports) -> None:
        self._ports = ports

    def get_running_loop(self) -> _Loop:
        return _Loop(asyncio.get_running_loop(), self._ports)

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)


def apply(port_range: tuple[int, int] | None) -> None:
    """Bind every ICE host candidate made in this process from now on to `port_range` (None:
    the kernel's choice, aioice untouched)."""
    global _applied
    import aioice.ice as ice

    if port_range == _applied:
        return
    if port_range is None:
        ice.asyncio = asyncio
    else:
        ice.asyncio = _Asyncio(_Ports(*port_range))  # type: ignore[assignment]
        log.info("ice host candidates on ports %d-%d", *port_range)
    _applied = port_range
