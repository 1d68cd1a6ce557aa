"""The playout state machine: pairing of pictures and audio, the idle loop, clear, holds."""

from __future__ import annotations

import numpy as np
import pytest

from engines.base import LOOKAHEAD_SAMPLES, SAMPLES_PER_FRAME
from server.session.playout import SILENCE, Made, Playout, Tick, float_to_pcm16


def idle_image(pos: int) -> np.ndarray:
    return np.full((2, 2, 3), pos % 200, np.uint8)


def speech_image(utt: int, index: int) -> np.ndarray:
    img = np.zeros((2, 2, 3), np.uint8)
    img[0, 0] = (250, utt, index % 256)
    return img


def ramp(n: int, offset: int = 0) -> np.ndarray:
    """float32 audio whose every sample is distinct (so pairing errors show)."""
    return ((np.arange(offset, offset + n) % 30000) / 32768.0).astype(np.float32)


def make_all(p: Playout) -> int:
    """Take every ready job and deliver its frame at once (an infinitely fast engine)."""
    made = 0
    for taken in p.take():
        p.deliver(
            [
                Made(
                    taken.utterance,
                    j.index,
                    j.loop_position,
                    j.horizon,
                    speech_image(taken.utterance, j.index),
                    pcm,
                )
                for j, pcm in zip(taken.jobs, taken.pcm, strict=True)
            ]
        )
        made += len(taken.jobs)
    return made


def run(p: Playout, n: int, now: float = 0.0, engine: bool = True) -> list[Tick]:
    ticks = []
    for k in range(n):
        if engine:
            make_all(p)
        ticks.append(p.tick(now + k * 0.04))
    return ticks


def test_idle_ticks_walk_the_loop_with_silence() -> None:
    p = Playout(idle_image)
    ticks = run(p, 5)
    assert [t.kind for t in ticks] == ["idle"] * 5
    assert [t.loop_position for t in ticks] == [0, 1, 2, 3, 4]
    assert all(t.pcm is SILENCE for t in ticks)
    assert all(int(t.image[0, 0, 0]) == t.loop_position for t in ticks)


def test_speech_frames_carry_their_own_audio_and_continue_the_loop() -> None:
    p = Playout(idle_image, lead=2)
    run(p, 7)  # idle at 0..6
    audio = ramp(SAMPLES_PER_FRAME * 20 + 100)
    p.push(audio, now=0.3)
    p.end()
    ticks = run(p, 30)
    kinds = [t.kind for t in ticks]
    speech = [t for t in ticks if t.kind == "speech"]
    assert len(speech) == 21  # the last 100 samples too, padded with silence to a frame
    # the pairing: frame i plays exactly samples [640 i, 640 i + 640) of the utterance
    padded = np.concatenate([audio, np.zeros(SAMPLES_PER_FRAME - 100, np.float32)])
    for i, t in enumerate(speech):
        assert int(t.image[0, 0, 2]) == i
        np.testing.assert_array_equal(t.pcm, float_to_pcm16(padded[i * 640 : (i + 1) * 640]))
    # no jump: the shown loop positions step by one through idle -> speech -> idle
    positions = [t.loop_position for t in ticks]
    assert positions == list(range(7, 7 + 30)), positions
    first = kinds.index("speech")
    assert first == 2  # `lead` frames of idle before the first speaking frame
    assert kinds[first : first + 21] == ["speech"] * 21
    assert kinds[first + 21 :] == ["idle"] * (30 - first - 21)
    events = [e for t in ticks for e in t.events]
    assert events == [
        {"type": "playback_started"},
        {"type": "playback_finished", "position": 21 / 25, "interrupted": False},
    ]


def test_audio_is_exact_inverse_of_pcm16() -> None:
    pcm = np.array([-32768, -1, 0, 1, 32767], dtype=np.int16)
    np.testing.assert_array_equal(float_to_pcm16(pcm.astype(np.float32) / 32768.0), pcm)


def test_frames_wait_for_their_lookahead() -> None:
    p = Playout(idle_image, lead=0)
    p.push(ramp(LOOKAHEAD_SAMPLES - 1), now=0.0)
    assert make_all(p) == 0
    p.push(ramp(1), now=0.01)
    assert make_all(p) == 1  # frame 0 needs 120 ms of audio past its start


def test_clear_returns_to_idle_on_the_next_tick() -> None:
    p = Playout(idle_image, lead=1)
    p.push(ramp(SAMPLES_PER_FRAME * 50), now=0.0)  # not ended: more may come
    ticks = run(p, 10)
    assert ticks[-1].kind == "speech"
    last_pos = ticks[-1].loop_position
    events = p.clear()
    assert events == [
        {"type": "playback_finished", "position": pytest.approx(9 / 25), "interrupted": True}
    ]
    assert not p.speaking and not p.ready
    nxt = run(p, 3)
    assert [t.kind for t in nxt] == ["idle"] * 3
    assert [t.loop_position for t in nxt] == [last_pos + 1, last_pos + 2, last_pos + 3]
    assert all(t.pcm is SILENCE for t in nxt)


def test_frames_of_a_cleared_utterance_are_discarded() -> None:
    p = Playout(idle_image, lead=0)
    p.push(ramp(SAMPLES_PER_FRAME * 10), now=0.0)
    taken = p.take()
    assert taken
    p.clear()
    late = [
        Made(t.utterance, j.index, j.loop_position, j.horizon, speech_image(0, j.index), SILENCE)
        for t in taken
        for j in t.jobs
    ]
    assert p.deliver(late) == 0
    assert [t.kind for t in run(p, 3, engine=False)] == ["idle"] * 3


def test_clear_with_nothing_queued_sends_no_event() -> None:
    p = Playout(idle_image)
    run(p, 2)
    assert p.clear() == []


def test_a_late_frame_is_held_then_idle_then_speech_goes_on() -> None:
    p = Playout(idle_image, lead=0, hold=2)
    p.push(ramp(SAMPLES_PER_FRAME * 5 + LOOKAHEAD_SAMPLES), now=0.0)
    ticks = run(p, 6)  # frames 0..5 ready and played
    assert [t.kind for t in ticks] == ["speech"] * 6
    ticks = run(p, 4)  # nothing more ready: hold twice, then idle
    assert [t.kind for t in ticks] == ["hold", "hold", "idle", "idle"]
    assert ticks[0].pcm is SILENCE and ticks[0].image is ticks[1].image
    resume_at = p.loop_position
    p.push(ramp(SAMPLES_PER_FRAME * 3, offset=5000), now=0.5)
    ticks = run(p, 4)
    speech = [t for t in ticks if t.kind == "speech"]
    assert speech, [t.kind for t in ticks]
    # the stalled utterance was re-placed where the loop had got to: no jump back
    assert speech[0].loop_position >= resume_at
    assert not any(t.late_start for t in ticks)


def test_only_frames_the_engine_has_and_not_made_are_engine_late() -> None:
    """Held because the audio has not come (a slow client): not the engine's lateness. Held
    because the frame was handed out and is not back: engine-late (server.session.overload counts it)."""
    p = Playout(idle_image, lead=0, hold=2)
    p.push(ramp(SAMPLES_PER_FRAME * 5 + LOOKAHEAD_SAMPLES), now=0.0)
    run(p, 6)
    starved = run(p, 3)  # audio ran out: nothing was handed to the engine
    assert [t.kind for t in starved] == ["hold", "hold", "idle"]
    assert not any(t.engine_late for t in starved)

    p = Playout(idle_image, lead=0, hold=2)
    p.push(ramp(SAMPLES_PER_FRAME * 10 + LOOKAHEAD_SAMPLES), now=0.0)
    (taken,) = p.take()  # all ten handed to the engine; it makes only the first four
    p.deliver(
        [
            Made(
                taken.utterance, j.index, j.loop_position, j.horizon, speech_image(0, j.index), pcm
            )
            for j, pcm in list(zip(taken.jobs, taken.pcm, strict=True))[:4]
        ]
    )
    ticks = run(p, 7, engine=False)
    assert [t.kind for t in ticks] == ["speech"] * 4 + ["hold", "hold", "idle"]
    assert [t.engine_late for t in ticks] == [False] * 4 + [True] * 3


def test_max_ahead_bounds_frames_in_flight() -> None:
    p = Playout(idle_image, lead=0, max_ahead=5)
    p.push(ramp(SAMPLES_PER_FRAME * 100), now=0.0)
    taken = p.take()
    assert sum(len(t.jobs) for t in taken) == 5
    assert p.take() == []
    assert p.outstanding == 5
    p.deliver(
        [
            Made(
                t.utterance, j.index, j.loop_position, j.horizon, speech_image(0, j.index), SILENCE
            )
            for t in taken
            for j in t.jobs
        ]
    )
    run(p, 2, engine=False)
    assert sum(len(t.jobs) for t in p.take()) == 2


def test_utterances_play_back_to_back_in_order() -> None:
    p = Playout(idle_image, lead=1)
    a, b = ramp(SAMPLES_PER_FRAME * 6), ramp(SAMPLES_PER_FRAME * 4, offset=9000)
    p.push(a, now=0.0)
    p.end()
    p.push(b, now=0.01)  # a new utterance, queued behind the first
    p.end()
    ticks = run(p, 14)
    speech = [t for t in ticks if t.kind == "speech"]
    assert len(speech) == 10
    np.testing.assert_array_equal(
        np.concatenate([t.pcm for t in speech]), float_to_pcm16(np.concatenate([a, b]))
    )
    positions = [t.loop_position for t in ticks]
    assert positions == list(range(positions[0], positions[0] + 14))
    events = [e["type"] for t in ticks for e in t.events]
    assert events == [
        "playback_started",
        "playback_finished",
        "playback_started",
        "playback_finished",
    ]


def test_an_utterance_shorter_than_a_frame_plays_as_one_padded_frame() -> None:
    p = Playout(idle_image, lead=0)
    audio = ramp(100)
    p.push(audio, now=0.0)
    p.end()
    ticks = run(p, 2)
    assert [t.kind for t in ticks] == ["speech", "idle"]
    expected = np.concatenate([float_to_pcm16(audio), np.zeros(SAMPLES_PER_FRAME - 100, np.int16)])
    np.testing.assert_array_equal(ticks[0].pcm, expected)
    assert ticks[0].events == [
        {"type": "playback_started"},
        {"type": "playback_finished", "position": 1 / 25, "interrupted": False},
    ]
    assert not p.speaking


def test_latency_of_each_chunk_is_measured_at_the_first_frame_reading_it() -> None:
    p = Playout(idle_image, lead=0)
    # 20 ms chunks arriving at real time from t=0
    for k in range(20):
        p.push(ramp(320, offset=320 * k), now=0.02 * k)
    ticks = []
    for i in range(3):
        make_all(p)
        ticks.append(p.tick(0.5 + 0.04 * i))
    assert ticks[0].kind == "speech"
    assert ticks[0].first_frame == pytest.approx(0.5)
    # frame 0 reads samples [0, 1920): chunks 0..5, which arrived at 0, 0.02, ..., 0.1
    assert ticks[0].latencies == pytest.approx([0.5 - 0.02 * k for k in range(6)])
    # frame 1 reads up to 2560: chunks 6 and 7
    assert ticks[1].latencies == pytest.approx([0.54 - 0.12, 0.54 - 0.14])


def test_the_first_frame_is_split_into_audio_made_and_wait() -> None:
    """`first_parts`: first sample in -> frame 0 handed to the engine (its lookahead) ->
    back from the engine -> shown; the three add up to `first_frame`."""
    p = Playout(idle_image, lead=1)
    for k in range(10):  # 20 ms chunks from t=0 (frame 0 reads [0, 1920): complete at 0.1 s)
        p.push(ramp(320, offset=320 * k), now=0.02 * k)
    taken = p.take(now=0.2)
    assert taken and taken[0].jobs[0].index == 0
    made = [
        Made(t.utterance, j.index, j.loop_position, j.horizon, speech_image(0, j.index), pcm)
        for t in taken
        for j, pcm in zip(t.jobs, t.pcm, strict=True)
    ]
    p.deliver(made, now=0.23)
    ticks = [p.tick(0.24 + 0.04 * i) for i in range(2)]
    first = next(t for t in ticks if t.first_frame is not None)
    assert first.first_parts == pytest.approx((0.2, 0.03, first.first_frame - 0.23))
    assert sum(first.first_parts) == pytest.approx(first.first_frame)
    assert first.first_parts[2] >= 0
    # without the times (a caller that does not pass them) there is no breakdown
    q = Playout(idle_image, lead=0)
    q.push(ramp(4000), now=0.0)
    make_all(q)
    tick = q.tick(0.3)
    assert tick.first_frame == pytest.approx(0.3) and tick.first_parts is None


def test_utterance_length_limit_raises() -> None:
    p = Playout(idle_image)
    p.utterances.clear()
    utt = p.push(ramp(10), now=0.0)
    utt.stream._max_samples = 100
    with pytest.raises(OverflowError):
        p.push(ramp(200), now=0.1)
