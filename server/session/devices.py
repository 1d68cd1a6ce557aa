"""The server's engines and frame workers: one per GPU with `--devices`, else the one.

A `Unit` is one device's engine and its frame worker (on a GPU the scheduler, with its own CUDA
streams, compiled steps and pinned buffers). `Devices` holds the units with the `Placer`
(`server.session.placement`): `place` puts a new session on the unit with the most room, `close`
says when an avatar is no longer used on a unit (the avatar service then unloads it there), and
`check` notices a unit whose worker stopped on a device error: that device is marked failed, is
never chosen again, and the sessions it held are returned to be ended; the other units go on.

`build_units` makes the workers: with several units the first warms up alone (it fills the
inductor and Triton caches), then the others in parallel threads, whose compiles mostly hit
those caches; dynamo's tracing holds a process-wide lock, so what is not cached compiles one at
a time whatever the order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from engines.base import Engine
from engines.pipeline.scheduler import bind_device
from server.metrics import ServerMetrics
from server.session.gpu_worker import create_worker
from server.session.overload import LateFrames
from server.session.placement import Placer
from server.session.worker import Worker
from server.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Unit:
    """One device: its name, its engine and the frame worker that alone touches the engine."""

    device: str
    engine: Engine
    worker: Worker

    @property
    def failure(self) -> BaseException | None:
        """The device error that stopped this unit's worker, if one did."""
        return getattr(self.worker, "failure", None)

    @property
    def usable(self) -> bool:
        return self.worker.alive and self.failure is None


class Devices:
    """The units of a server and where sessions go (see the module docstring)."""

    def __init__(self, units: Sequence[Unit], max_sessions: int, max_late: float = 0.0) -> None:
        if not units:
            raise ValueError("Devices needs at least one unit")
        self.units = {u.device: u for u in units}
        if len(self.units) != len(units):
            raise ValueError(f"units name a device twice: {[u.device for u in units]}")
        self.placer = Placer(list(self.units), max_sessions, max_late)
        self._lost: dict[str, list[str]] = {}  # failed devices' sessions not yet ended

    @property
    def several(self) -> bool:
        return len(self.units) > 1

    @property
    def primary(self) -> Unit:
        """The unit that prepares avatars (latents): the first still usable, else the first."""
        return next((u for u in self.units.values() if u.usable), next(iter(self.units.values())))

    @property
    def alive(self) -> bool:
        """Whether any unit can still make frames."""
        return any(u.usable for u in self.units.values())

    @property
    def failed(self) -> dict[str, str]:
        """Devices that faulted (or whose worker stopped), and why: the error's first line."""
        out = self.placer.failures()
        for unit in self.units.values():
            if unit.device not in out and not unit.usable:
                out[unit.device] = _why(unit)
        return out

    def place(self, session_id: str, avatar_id: str, now: float) -> Unit:
        """The unit a new session goes to; `placement.NoRoom` where none has room."""
        self._mark_failures()  # a device that faulted since the reaper looked is not chosen
        return self.units[self.placer.place(session_id, avatar_id, now).device]

    def close(self, session_id: str) -> tuple[Unit, str] | None:
        """The session ended: (unit, avatar id) where no session on that unit uses the avatar
        any more (the caller unloads it there), else None."""
        placement = self.placer.placement_of(session_id)
        if placement is None or not self.placer.close(session_id):
            return None
        return self.units[placement.device], placement.avatar_id

    def late_window(self, session_id: str) -> LateFrames | None:
        """The lateness window of the session's device (None where it is not placed)."""
        device = self.placer.device_of(session_id)
        return None if device is None else self.placer.late_window(device)

    def check(self) -> dict[str, list[str]]:
        """Units whose worker stopped since the last check: device -> its sessions, to end
        (each device's sessions are returned once, whoever noticed the fault first)."""
        self._mark_failures()
        lost, self._lost = self._lost, {}
        return lost

    def _mark_failures(self) -> None:
        marked = self.placer.failures()
        for unit in self.units.values():
            if unit.device not in marked and not unit.usable:
                self._lost[unit.device] = self.placer.fail(unit.device, _why(unit))

    def report(self, now: float) -> dict[str, dict[str, Any]]:
        """Per device, for /readyz: engine, sessions, limit, late fraction, failed, avatars."""
        out, failed = self.placer.report(now), self.failed
        for device, row in out.items():
            row["engine"] = self.units[device].engine.name
            row["failed"] = failed.get(device)
        return out

    def stop(self) -> None:
        """Stop every unit's worker (in parallel: each waits for its thread)."""
        with ThreadPoolExecutor(max_workers=len(self.units)) as pool:
            list(pool.map(lambda u: u.worker.stop(), self.units.values()))


def _why(unit: Unit) -> str:
    error = unit.failure
    if error is None:
        return "its frame worker stopped"
    return (str(error).splitlines() or [type(error).__name__])[0][:300]


def build_units(
    engines: dict[str, Engine], settings: Settings, metrics: ServerMetrics
) -> list[Unit]:
    """A started worker for each engine (see the module docstring for the warm-up order)."""
    items = list(engines.items())

    def worker_for(engine: Engine) -> Worker:
        bind_device(engine)  # this thread's CUDA work (compiles, graph captures) on its GPU
        return create_worker(engine, settings, metrics)

    t0 = time.perf_counter()
    first = Unit(items[0][0], items[0][1], worker_for(items[0][1]))
    units = [first]
    if len(items) > 1:
        with ThreadPoolExecutor(max_workers=len(items) - 1) as pool:
            workers = list(pool.map(lambda kv: worker_for(kv[1]), items[1:]))
        units += [Unit(d, e, w) for (d, e), w in zip(items[1:], workers, strict=True)]
        log.info(
            "devices ready",
            extra={"devices": ",".join(engines), "warm_up_s": round(time.perf_counter() - t0, 1)},
        )
    for unit in units:
        unit.worker.start()
    return units


async def warm_engines(units: Sequence[Unit]) -> None:
    """Each engine's own warm-up (where it has one), on its worker thread, all at once."""
    warm_ups = [(u, getattr(u.engine, "warmup", None)) for u in units]
    await asyncio.gather(*(u.worker.acall(fn) for u, fn in warm_ups if callable(fn)))
