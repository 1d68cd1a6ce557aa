"""Which GPU of a host a new session goes to, and which avatars each GPU holds.

A server driving several GPUs (`--devices`) runs one engine and one GPU scheduler per GPU.
`Placer` keeps, per device, its open sessions, its share of `max_sessions`
(`limit_shares`), its lateness reading (`server.session.overload.LateFrames`, fed by the
sessions placed there) and whether it failed. `Placer.place` picks the device with the most
room (`choose_device`): the free fraction of its share, less its late fraction; a device
whose lateness is over the admission limit, that is full, or that failed is never chosen.
A device that faults (`Placer.fail`) gives back the sessions it held, so that only those
fail; new sessions go to the others.

`Residency` is the avatars' refcount per device: an avatar is made resident on a device
when a session there first needs it (`acquire` says "load") and released when no session
on that device uses it any more (`release` says "unload").

`device_list` turns the `devices` setting (`all`, or GPU indices `0,1,...`) into device
names against the GPUs torch sees.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from server.session.overload import LateFrames

log = logging.getLogger(__name__)

DEVICES_PATTERN = re.compile(r"all|\d+(,\d+)*")


class NoRoom(RuntimeError):
    """No device can take a new session; `reason` says why (full, overloaded, failed)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"no device can take a new session: {reason}")
        self.reason = reason


def device_list(spec: str, gpu_count: int) -> tuple[str, ...]:
    """`all` or `0,1,...` -> ("cuda:0", "cuda:1", ...); ValueError for a malformed list, a
    repeated index, an index torch does not see, or no GPU at all."""
    spec = spec.strip()
    if not DEVICES_PATTERN.fullmatch(spec):
        raise ValueError(f"devices must be `all` or GPU indices like 0,1,2, got {spec!r}")
    if gpu_count < 1:
        raise ValueError(f"devices {spec!r} asked for, but torch sees no CUDA GPU")
    if spec == "all":
        return tuple(f"cuda:{i}" for i in range(gpu_count))
    indices = [int(v) for v in spec.split(",")]
    if len(set(indices)) != len(indices):
        raise ValueError(f"devices names a GPU twice: {spec!r}")
    missing = [i for i in indices if i >= gpu_count]
    if missing:
        raise ValueError(
            f"devices {spec!r}: no GPU {missing[0]} (torch sees {gpu_count}: 0..{gpu_count - 1})"
        )
    return tuple(f"cuda:{i}" for i in indices)


def limit_shares(max_sessions: int, devices: int) -> tuple[int, ...]:
    """`max_sessions` split over `devices` as evenly as can be (the first get the rest)."""
    if devices < 1 or max_sessions < 1:
        raise ValueError("limit_shares needs devices >= 1 and max_sessions >= 1")
    base, rest = divmod(max_sessions, devices)
    return tuple(base + (k < rest) for k in range(devices))


@dataclass(frozen=True)
class DeviceLoad:
    """One device's reading for placement."""

    device: str
    sessions: int
    limit: int  # its share of max_sessions
    late: float | None = None  # late fraction over the window (None: too few ticks to judge)
    failed: bool = False

    def room(self) -> float:
        """Free fraction of its share, less its late fraction (<= 0: no room)."""
        if self.failed or self.limit <= 0 or self.sessions >= self.limit:
            return 0.0
        return (self.limit - self.sessions) / self.limit - (self.late or 0.0)


def choose_device(loads: Sequence[DeviceLoad], max_late: float = 0.0) -> str:
    """The device with the most room (ties: fewer sessions, then the order given); NoRoom if
    every device failed, is full or is late beyond `max_late` (0: lateness not checked)."""
    if not loads:
        raise NoRoom("no devices")
    usable = [d for d in loads if not d.failed]
    if not usable:
        raise NoRoom("every device failed")
    open_ = [d for d in usable if d.sessions < d.limit]
    if not open_:
        raise NoRoom("full")
    on_time = [d for d in open_ if max_late <= 0 or d.late is None or d.late <= max_late]
    if not on_time:
        raise NoRoom("overloaded")
    order = {d.device: k for k, d in enumerate(loads)}
    best = max(on_time, key=lambda d: (d.room(), -d.sessions, -order[d.device]))
    return best.device


class Residency:
    """Avatars' refcounts per device (see the module docstring)."""

    def __init__(self) -> None:
        self._counts: dict[str, Counter[str]] = {}

    def acquire(self, device: str, avatar_id: str) -> bool:
        """One more session on `device` uses `avatar_id`; True if the avatar must be loaded."""
        counts = self._counts.setdefault(device, Counter())
        counts[avatar_id] += 1
        return counts[avatar_id] == 1

    def release(self, device: str, avatar_id: str) -> bool:
        """One session fewer uses it; True if none on `device` does now (unload it).
        KeyError if it was not acquired there."""
        counts = self._counts.get(device)
        if counts is None or counts[avatar_id] <= 0:
            raise KeyError(f"avatar {avatar_id!r} is not resident on {device}")
        counts[avatar_id] -= 1
        if counts[avatar_id] == 0:
            del counts[avatar_id]
            return True
        return False

    def resident(self, device: str) -> dict[str, int]:
        """The avatars resident on `device` and how many sessions use each."""
        return dict(self._counts.get(device, {}))

    def forget(self, device: str) -> list[str]:
        """Drop `device`'s bookkeeping (it failed); the avatars that were resident there."""
        return sorted(self._counts.pop(device, {}))


@dataclass(frozen=True)
class Placement:
    """Where `Placer.place` put a session, and whether its avatar must be loaded there."""

    session_id: str
    device: str
    avatar_id: str
    needs_load: bool


@dataclass
class _Device:
    name: str
    limit: int
    late: LateFrames = field(default_factory=LateFrames)
    sessions: set[str] = field(default_factory=set)
    failed: str | None = None  # why, once it faulted


class Placer:
    """Sessions over the devices of a host (see the module docstring)."""

    def __init__(self, devices: Sequence[str], max_sessions: int, max_late: float = 0.0) -> None:
        if not devices or len(set(devices)) != len(devices):
            raise ValueError(f"Placer needs distinct devices, got {list(devices)!r}")
        shares = limit_shares(max_sessions, len(devices))
        self._devices = {d: _Device(d, s) for d, s in zip(devices, shares, strict=True)}
        self.max_late = max_late
        self.residency = Residency()
        self._placed: dict[str, Placement] = {}

    def loads(self, now: float) -> list[DeviceLoad]:
        return [
            DeviceLoad(d.name, len(d.sessions), d.limit, d.late.fraction(now), d.failed is not None)
            for d in self._devices.values()
        ]

    def place(self, session_id: str, avatar_id: str, now: float) -> Placement:
        """Put a new session on the device with the most room; NoRoom if none has any."""
        if session_id in self._placed:
            raise ValueError(f"session {session_id!r} is placed already")
        device = choose_device(self.loads(now), self.max_late)
        self._devices[device].sessions.add(session_id)
        needs_load = self.residency.acquire(device, avatar_id)
        placement = Placement(session_id, device, avatar_id, needs_load)
        self._placed[session_id] = placement
        log.info(
            "session placed",
            extra={"session_id": session_id, "device": device, "load_avatar": needs_load},
        )
        return placement

    def close(self, session_id: str) -> bool:
        """The session ended; True if its avatar is now unused on its device (unload it).
        A session of a failed device, or one not placed, returns False."""
        placement = self._placed.pop(session_id, None)
        if placement is None:
            return False
        dev = self._devices[placement.device]
        dev.sessions.discard(session_id)
        if dev.failed is not None:
            return False
        return self.residency.release(placement.device, placement.avatar_id)

    def tick(self, session_id: str, now: float, speaking: bool, late: bool) -> None:
        """One video tick of a placed session, into its device's lateness reading."""
        placement = self._placed.get(session_id)
        if placement is not None:
            self._devices[placement.device].late.tick(now, speaking, late, session_id)

    def fail(self, device: str, why: str) -> list[str]:
        """`device` faulted: no session goes there again; its sessions (to be failed) are
        returned, the others' go on."""
        dev = self._devices[device]
        dev.failed = why
        self.residency.forget(device)
        lost = sorted(dev.sessions)
        log.error("device failed", extra={"device": device, "why": why, "sessions": len(lost)})
        return lost

    def device_of(self, session_id: str) -> str | None:
        placement = self._placed.get(session_id)
        return None if placement is None else placement.device

    def placement_of(self, session_id: str) -> Placement | None:
        return self._placed.get(session_id)

    def failures(self) -> dict[str, str]:
        """The devices `fail` marked, and why."""
        return {d.name: d.failed for d in self._devices.values() if d.failed is not None}

    def late_window(self, device: str) -> LateFrames:
        """The device's lateness window (the sessions placed there tick into it)."""
        return self._devices[device].late

    def report(self, now: float) -> dict[str, dict[str, object]]:
        """Per device, for /readyz and /metrics: sessions, limit, late, failed (why), avatars."""
        out: dict[str, dict[str, object]] = {}
        for load in self.loads(now):
            dev = self._devices[load.device]
            out[load.device] = {
                "sessions": load.sessions,
                "limit": load.limit,
                "late": load.late,
                "failed": dev.failed,
                "avatars": self.residency.resident(load.device),
            }
        return out
