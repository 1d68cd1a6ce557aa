"""One session's playout: 25 times a second, which picture to show and which audio to play.

`Playout` is a plain state machine (no asyncio, no threads; the session's clock drives it):

- `push`/`end`/`clear` take the websocket's audio and control messages. Audio is cut into
  utterances (one `SpeechStream` each); audio after `end` begins the next utterance.
- `take` hands out the frame jobs whose audio is complete (at most `max_ahead` frames made
  but not yet played, so a client pushing faster than real time costs audio memory, not
  frame memory). The first job of an utterance fixes where in the idle loop it sits: a few
  frames (`lead`) past the current loop position, so speech continues the loop instead of
  jumping back to its start.
- `deliver` takes the frames the engine made.
- `tick` returns one (picture, 640 audio samples) pair: the next speaking frame with its
  own audio if it is ready and the loop has reached its position, else the idle frame at the
  current loop position with silence. A speaking frame that is late repeats the previous one
  (`hold` times at most, with silence, so audio and video keep their pairing), then idle.

Every speaking frame carries exactly the audio it was made from (samples [640 i, 640 i + 640)
of its utterance), so lips and sound leave together on the same tick.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from engines.base import FPS, SAMPLES_PER_FRAME, FrameJob
from engines.stream import SpeechStream

log = logging.getLogger(__name__)

SILENCE = np.zeros(SAMPLES_PER_FRAME, dtype=np.int16)
TickKind = Literal["idle", "speech", "hold"]


def float_to_pcm16(samples: np.ndarray) -> np.ndarray:
    """float32 in [-1, 1) -> int16 (exact inverse of `pcm16_to_float`)."""
    return np.clip(np.round(samples * 32768.0), -32768, 32767).astype(np.int16)


@dataclass
class Utterance:
    """Speech between two `end`s (or an `end` and a `clear`)."""

    id: int
    # every sample sent before `end` is played: the last partial frame is padded with silence
    stream: SpeechStream = field(default_factory=lambda: SpeechStream(pad_end=True))
    arrivals: deque[tuple[int, float]] = field(default_factory=deque)  # (first sample, time)
    first_arrival: float | None = None
    first_taken: float | None = None  # frame 0 handed to the engine
    first_made: float | None = None  # frame 0 back from the engine
    base: int | None = None  # loop position of frame 0, fixed when frame 0 is taken
    taken: int = 0
    played: int = 0

    def push(self, samples: np.ndarray, now: float) -> None:
        self.stream.push(samples)  # raises OverflowError past the utterance limit
        self.arrivals.append((self.stream.n_samples - samples.size, now))
        if self.first_arrival is None:
            self.first_arrival = now

    @property
    def finished(self) -> bool:
        total = self.stream.total_frames
        return total is not None and self.played >= total

    def latencies(self, horizon: int, now: float) -> list[float]:
        """Latency of the chunks a frame with this horizon is the first to read."""
        out = []
        while self.arrivals and self.arrivals[0][0] < horizon:
            out.append(now - self.arrivals.popleft()[1])
        return out


@dataclass(frozen=True)
class Made:
    """A frame the engine made: picture and the 640 samples it was made from."""

    utterance: int
    index: int
    loop_position: int
    horizon: int
    image: np.ndarray
    pcm: np.ndarray


@dataclass(frozen=True)
class TakenJobs:
    """Jobs of one utterance to send to the engine, with their audio."""

    utterance: int
    audio: np.ndarray  # the utterance so far (float32); never modified afterwards
    jobs: list[FrameJob]
    pcm: list[np.ndarray]


@dataclass(frozen=True)
class Tick:
    kind: TickKind
    image: np.ndarray
    pcm: np.ndarray
    loop_position: int  # the idle-loop position the picture shows
    events: list[dict[str, Any]]
    latencies: list[float]
    first_frame: float | None = None
    # where first_frame went: (audio: first sample in -> frame 0 handed to the engine, made:
    # -> back from it, wait: -> shown); None where a part was not seen
    first_parts: tuple[float, float, float] | None = None
    late_start: bool = False
    # a frame of the utterance being played was handed to the engine and is not back in time
    # (not: its audio has not come yet); what the server's overload check counts
    engine_late: bool = False


class Playout:
    """See the module docstring. Not thread-safe: call it from one thread (the event loop)."""

    def __init__(
        self,
        idle_image: Callable[[int], np.ndarray],
        *,
        lead: int = 2,
        hold: int = 3,
        max_ahead: int = 25,
    ) -> None:
        if lead < 0 or hold < 0 or max_ahead < 1:
            raise ValueError("lead and hold must be >= 0, max_ahead >= 1")
        self._idle_image = idle_image
        self.lead = lead
        self.hold = hold
        self.max_ahead = max_ahead
        self.loop_position = 0  # the idle-loop position of the next idle frame
        self.utterances: deque[Utterance] = deque()
        self.ready: dict[tuple[int, int], Made] = {}
        self._next_id = 0
        self._in_run = False  # the last tick showed a speaking frame (or held one)
        self._held = 0
        self._last: Made | None = None

    # -- input ---------------------------------------------------------------------------
    def push(self, samples: np.ndarray, now: float) -> Utterance:
        """Append float32 audio to the open utterance (opening one if needed)."""
        if not self.utterances or self.utterances[-1].stream.ended:
            self.utterances.append(Utterance(self._next_id))
            self._next_id += 1
        utt = self.utterances[-1]
        utt.push(np.asarray(samples, dtype=np.float32).reshape(-1), now)
        return utt

    def end(self) -> bool:
        """Complete the open utterance; False if there was none."""
        if not self.utterances or self.utterances[-1].stream.ended:
            return False
        self.utterances[-1].stream.end()
        return True

    def clear(self) -> list[dict[str, Any]]:
        """Drop every utterance and made frame; the idle loop goes on from where it is. An
        utterance that started playing ends with `playback_finished` (interrupted); one that had
        not started ends without events."""
        events: list[dict[str, Any]] = []
        if self.utterances and self.utterances[0].played > 0:
            head = self.utterances[0]
            events.append(
                {"type": "playback_finished", "position": head.played / FPS, "interrupted": True}
            )
        self.utterances.clear()
        self.ready.clear()
        self._in_run = False
        self._held = 0
        self._last = None
        return events

    @property
    def speaking(self) -> bool:
        """Something is queued or playing."""
        return bool(self.utterances)

    @property
    def backlog_s(self) -> float:
        """Speech received and not yet played, in seconds (grows when the engine or the
        client's pace falls behind real time)."""
        samples = sum(
            max(0, u.stream.n_samples - u.played * SAMPLES_PER_FRAME) for u in self.utterances
        )
        return samples / (SAMPLES_PER_FRAME * FPS)

    def state(self) -> dict[str, Any]:
        """Where the playout stands (GET /v1/sessions/{id} shows it as `playout`)."""
        return {
            "loop_position": self.loop_position,
            "utterances_queued": len(self.utterances),
            "frames_outstanding": self.outstanding,
            "frames_ready": len(self.ready),
            "backlog_s": round(self.backlog_s, 3),
            "lead_frames": self.lead,
        }

    @property
    def outstanding(self) -> int:
        """Frames taken (sent to the engine or made) but not yet played."""
        return sum(u.taken - u.played for u in self.utterances)

    # -- engine side ---------------------------------------------------------------------
    def take(self, now: float | None = None) -> list[TakenJobs]:
        """Jobs ready to be made, oldest utterance first, within `max_ahead` (`now`: when
        they are handed to the engine, for the first frame's breakdown)."""
        budget = self.max_ahead - self.outstanding
        out: list[TakenJobs] = []
        prev: Utterance | None = None
        for utt in self.utterances:
            if budget <= 0:
                break
            stream = utt.stream
            if stream.pending > 0:
                self._place(utt, prev)
                jobs = stream.take(limit=budget)
                if jobs:
                    audio = stream.audio
                    pcm = [
                        float_to_pcm16(
                            audio[j.index * SAMPLES_PER_FRAME : (j.index + 1) * SAMPLES_PER_FRAME]
                        )
                        for j in jobs
                    ]
                    if jobs[0].index == 0 and now is not None:
                        utt.first_taken = now
                    utt.taken += len(jobs)
                    budget -= len(jobs)
                    out.append(TakenJobs(utt.id, audio, jobs, pcm))
            if not (stream.ended and utt.taken >= (stream.total_frames or 0)):
                break  # later utterances wait until this one is handed out whole
            prev = utt
        return out

    def _place(self, utt: Utterance, prev: Utterance | None) -> None:
        """Fix (or, after a stall, move) where in the idle loop the next jobs sit."""
        if utt.base is None:
            if prev is not None and prev.base is not None:
                utt.base = prev.base + (prev.stream.total_frames or 0)
            else:
                utt.base = self.loop_position + self.lead
            utt.stream.start_loop_position = utt.base
        elif (
            not self._in_run
            and utt is self.utterances[0]
            and utt.taken == utt.played
            and utt.played > 0
        ):
            # the utterance stalled and the idle loop went on: continue from there
            utt.stream.start_loop_position = self.loop_position + self.lead - utt.taken

    def deliver(self, made: list[Made], now: float | None = None) -> int:
        """Store made frames; frames of utterances dropped meanwhile are discarded (`now`:
        when they came back, for the first frame's breakdown)."""
        live = {u.id: u for u in self.utterances}
        kept = 0
        for m in made:
            if m.utterance in live:
                self.ready[(m.utterance, m.index)] = m
                kept += 1
                if m.index == 0 and now is not None:
                    live[m.utterance].first_made = now
        return kept

    def due_in(self, loop_position: int) -> int:
        """Ticks until a frame at this loop position would be shown (0: the next tick)."""
        return max(0, loop_position - self.loop_position)

    # -- clock ---------------------------------------------------------------------------
    def tick(self, now: float) -> Tick:
        events: list[dict[str, Any]] = []
        self._retire(events)
        head = self.utterances[0] if self.utterances else None
        engine_late = False
        if head is not None:
            made = self.ready.get((head.id, head.played))
            if made is not None and self.loop_position >= made.loop_position:
                return self._speak(head, made, now, events)
            engine_late = made is None and 0 < head.played < head.taken
            if (
                made is None
                and self._in_run
                and head.played > 0
                and self._held < self.hold
                and self._last is not None
            ):
                self._held += 1
                last = self._last
                return Tick(
                    "hold",
                    last.image,
                    SILENCE,
                    last.loop_position,
                    events,
                    [],
                    engine_late=engine_late,
                )
        self._in_run = False
        self._last = None
        pos = self.loop_position
        self.loop_position += 1
        return Tick(
            "idle", self._idle_image(pos), SILENCE, pos, events, [], engine_late=engine_late
        )

    def _speak(self, head: Utterance, made: Made, now: float, events: list[dict[str, Any]]) -> Tick:
        del self.ready[(head.id, head.played)]
        late = not self._in_run and self.loop_position > made.loop_position
        if late:
            log.debug(
                "late utterance start", extra={"behind": self.loop_position - made.loop_position}
            )
        head.played += 1
        first = parts = None
        if made.index == 0:
            events.append({"type": "playback_started"})
            if head.first_arrival is not None:
                first = now - head.first_arrival
                if head.first_taken is not None and head.first_made is not None:
                    parts = (
                        head.first_taken - head.first_arrival,
                        head.first_made - head.first_taken,
                        now - head.first_made,
                    )
        latencies = head.latencies(made.horizon, now)
        self.loop_position = made.loop_position + 1
        self._in_run = True
        self._held = 0
        self._last = made
        self._retire(events)
        return Tick(
            "speech",
            made.image,
            made.pcm,
            made.loop_position,
            events,
            latencies,
            first,
            parts,
            late,
        )

    def _retire(self, events: list[dict[str, Any]]) -> None:
        while self.utterances and self.utterances[0].finished:
            done = self.utterances.popleft()
            if done.played == 0:  # nothing was played, so no playback_started either
                continue
            events.append(
                {"type": "playback_finished", "position": done.played / FPS, "interrupted": False}
            )
