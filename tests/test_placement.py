"""Sessions over the GPUs of a host (`server.session.placement`, CPU only): the device with
the most room is chosen, limits hold, a failed device is never chosen and fails only its own
sessions, avatars load and unload once per device, and two modelled GPUs behind the real
scheduler share a load evenly and both keep up."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import pytest

from server.session.placement import (
    DeviceLoad,
    NoRoom,
    Placer,
    Residency,
    choose_device,
    device_list,
    limit_shares,
)
from server.settings import Settings, SettingsError


def test_the_device_with_most_room_is_chosen() -> None:
    loads = [DeviceLoad("cuda:0", 3, 4), DeviceLoad("cuda:1", 1, 4), DeviceLoad("cuda:2", 2, 4)]
    assert choose_device(loads) == "cuda:1"
    # a late device has less room than its free slots say
    late = [DeviceLoad("cuda:0", 1, 4, late=0.5), DeviceLoad("cuda:1", 2, 4, late=0.0)]
    assert choose_device(late) == "cuda:1"
    # ties: the first given
    assert choose_device([DeviceLoad("cuda:1", 0, 4), DeviceLoad("cuda:0", 0, 4)]) == "cuda:1"


def test_limits_and_lateness_refuse() -> None:
    with pytest.raises(NoRoom, match="full"):
        choose_device([DeviceLoad("cuda:0", 4, 4), DeviceLoad("cuda:1", 2, 2)])
    over = [DeviceLoad("cuda:0", 1, 4, late=0.1), DeviceLoad("cuda:1", 0, 4, late=0.05)]
    with pytest.raises(NoRoom, match="overloaded"):
        choose_device(over, max_late=0.02)
    assert choose_device(over, max_late=0.0) == "cuda:1"  # 0: lateness not checked
    assert limit_shares(9, 2) == (5, 4) and limit_shares(8, 4) == (2, 2, 2, 2)
    placer = Placer(["cuda:0", "cuda:1"], max_sessions=3)
    got = [placer.place(f"p{k}", "av", now=0.0).device for k in range(3)]
    assert sorted(got) == ["cuda:0", "cuda:0", "cuda:1"]  # shares 2 + 1
    with pytest.raises(NoRoom):
        placer.place("p3", "av", now=0.0)


def test_a_failed_device_fails_only_its_own_sessions() -> None:
    placer = Placer(["cuda:0", "cuda:1"], max_sessions=8)
    for k in range(4):
        placer.place(f"p{k}", "av", now=0.0)
    on0 = sorted(s for s in (f"p{k}" for k in range(4)) if placer.device_of(s) == "cuda:0")
    assert len(on0) == 2
    assert placer.fail("cuda:0", "CUDA error: an illegal memory access") == on0
    assert choose_device([DeviceLoad("cuda:0", 0, 4, failed=True), DeviceLoad("cuda:1", 3, 4)]) == (
        "cuda:1"
    )
    # new sessions all go to the one left, up to its share; the failed one is never chosen
    for k in range(4, 6):
        assert placer.place(f"p{k}", "av", now=0.0).device == "cuda:1"
    with pytest.raises(NoRoom, match="full"):
        placer.place("p6", "av", now=0.0)
    report = placer.report(0.0)
    assert report["cuda:0"]["failed"] == "CUDA error: an illegal memory access"
    assert report["cuda:1"]["failed"] is None and report["cuda:1"]["sessions"] == 4
    assert placer.close(on0[0]) is False  # its device is gone: nothing to unload
    placer.fail("cuda:1", "lost")
    with pytest.raises(NoRoom, match="every device failed"):
        placer.place("p7", "av", now=0.0)


def test_residency_loads_and_unloads_once_per_device() -> None:
    r = Residency()
    assert r.acquire("cuda:0", "a") is True
    assert r.acquire("cuda:0", "a") is False
    assert r.acquire("cuda:1", "a") is True  # each device holds its own copy
    assert r.resident("cuda:0") == {"a": 2}
    assert r.release("cuda:0", "a") is False
    assert r.release("cuda:0", "a") is True
    assert r.resident("cuda:0") == {}
    with pytest.raises(KeyError):
        r.release("cuda:0", "a")
    placer = Placer(["cuda:0"], max_sessions=4)
    loads = [placer.place(s, "a", now=0.0).needs_load for s in ("x", "y", "z")]
    assert loads == [True, False, False]
    assert [placer.close(s) for s in ("x", "y", "z")] == [False, False, True]


def test_late_ticks_steer_new_sessions_away() -> None:
    placer = Placer(["cuda:0", "cuda:1"], max_sessions=8, max_late=0.02)
    placer.place("a", "av", now=0.0)  # cuda:0
    placer.place("b", "av", now=0.0)  # cuda:1
    for t in range(500):
        late = t % 5 == 0  # a fifth of cuda:0's speaking frames late
        placer.tick("a", now=t / 25, speaking=not late, late=late)
        placer.tick("b", now=t / 25, speaking=True, late=False)
    assert placer.loads(19.9)[0].late == pytest.approx(0.2, abs=0.01)
    assert placer.loads(19.9)[1].late == 0.0
    assert [placer.place(s, "av", now=19.9).device for s in ("c", "d")] == ["cuda:1", "cuda:1"]


def test_device_lists_and_the_setting() -> None:
    assert device_list("all", 2) == ("cuda:0", "cuda:1")
    assert device_list("1", 2) == ("cuda:1",)
    for spec, count, words in (
        ("0,0", 2, "twice"),
        ("2", 2, "no GPU 2"),
        ("0", 0, "no CUDA GPU"),
        ("x", 2, "indices"),
    ):
        with pytest.raises(ValueError, match=words):
            device_list(spec, count)
    assert Settings().devices == ""  # one device, as before
    with pytest.raises(SettingsError, match="devices"):
        Settings(devices="0;1")
    with pytest.raises(SettingsError, match="not both"):
        Settings(devices="0", device="cuda:1")


def test_serve_resolves_one_device_or_several() -> None:
    from lipstream.commands.serve import resolve_devices

    plain = Settings()
    assert resolve_devices(plain, None, lambda: 0) == (plain, ())
    one, names = resolve_devices(Settings(), "1", lambda: 2)
    assert one.device == "cuda:1" and not one.devices and names == ("cuda:1",)
    assert resolve_devices(Settings(devices="all"), None, lambda: 1)[0].device == "cuda:0"
    several, names = resolve_devices(Settings(devices="all"), None, lambda: 2)
    assert names == ("cuda:0", "cuda:1") and several.devices == "all"
    with pytest.raises(SettingsError, match="no CUDA GPU"):
        resolve_devices(Settings(devices="0"), None, lambda: 0)


def test_cli_refuses_a_device_it_does_not_see(monkeypatch: pytest.MonkeyPatch) -> None:
    import typer
    from typer.testing import CliRunner

    from lipstream.commands import serve as serve_cmd

    cli = typer.Typer()
    cli.callback()(lambda: None)  # a group, so that `serve` is a sub-command
    serve_cmd.register(cli)
    monkeypatch.setattr(serve_cmd, "_gpu_count", lambda: 2)
    res = CliRunner().invoke(cli, ["serve", "--devices", "0,5"])
    assert res.exit_code == 2
    assert "no GPU 5" in res.output and "torch sees 2" in res.output


def _run_device(sched: Any, n: int, out: dict[str, Any], key: str) -> None:
    from bench.simulation import simulate

    out[key] = simulate(sched, "modelled", n, 2.0, None)


def test_two_modelled_gpus_share_the_sessions_evenly() -> None:
    """8 sessions placed over 2 modelled GPUs (the H200 calibration, each behind the real
    scheduler) land 4 and 4, and each GPU delivers every frame of its own."""
    from bench.modelled_gpu import CALIBRATIONS, ModelledPipeline
    from engines.pipeline.scheduler import GpuScheduler, SchedulerOptions
    from engines.preview import PreviewEngine

    devices = ["cuda:0", "cuda:1"]
    placer = Placer(devices, max_sessions=16)
    placed = [placer.place(f"m{k}", "modelled", now=0.0) for k in range(8)]
    counts = {d: sum(p.device == d for p in placed) for d in devices}
    assert counts == {"cuda:0": 4, "cuda:1": 4}
    assert [p.needs_load for p in placed[:2]] == [True, True]  # once per device
    assert not any(p.needs_load for p in placed[2:])
    model = CALIBRATIONS["h200-2026-12-01"]()
    pipes = {d: ModelledPipeline(model) for d in devices}
    scheds = {
        d: GpuScheduler(PreviewEngine(), SchedulerOptions(max_batch=48), pipeline=pipes[d])
        for d in devices
    }
    results: dict[str, Any] = {}
    for s in scheds.values():
        s.start()
    try:
        threads = [
            threading.Thread(target=_run_device, args=(scheds[d], counts[d], results, d))
            for d in devices
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        for d in devices:
            scheds[d].stop()
            pipes[d].close()
    for d in devices:
        r = results[d]
        assert r["frames_delivered"] == r["frames_expected"] > 4 * 40
        assert r["errors"] == 0
    busy = [pipes[d].gpu_busy_s for d in devices]
    assert min(busy) > 0.6 * max(busy)  # the work split, not piled on one GPU


def test_one_modelled_gpu_failing_leaves_the_other_running() -> None:
    """Device 0's scheduler stops (its GPU faulted): its sessions are the ones returned to be
    failed and it takes no more work; new sessions go to device 1, whose sessions (old and
    new) get every frame."""
    from bench.modelled_gpu import CALIBRATIONS, ModelledPipeline
    from engines.pipeline.scheduler import GpuScheduler, SchedulerOptions, SchedulerStopped
    from engines.preview import PreviewEngine

    devices = ["cuda:0", "cuda:1"]
    placer = Placer(devices, max_sessions=8)
    for k in range(4):
        placer.place(f"f{k}", "modelled", now=0.0)
    model = CALIBRATIONS["h200-2026-12-01"]()
    pipes = {d: ModelledPipeline(model) for d in devices}
    scheds = {
        d: GpuScheduler(PreviewEngine(), SchedulerOptions(), pipeline=pipes[d]) for d in devices
    }
    for s in scheds.values():
        s.start()
    try:
        scheds["cuda:0"].stop()  # the fault
        lost = placer.fail("cuda:0", "modelled fault")
        assert lost == sorted(
            s for s in ("f0", "f1", "f2", "f3") if placer.device_of(s) == "cuda:0"
        )
        assert len(lost) == 2
        with pytest.raises(SchedulerStopped):
            scheds["cuda:0"].submit(SimpleNamespace(key=lost[0], jobs=[0], deadline=0.0))
        new = [placer.place(f"g{k}", "modelled", now=0.0) for k in range(2)]
        assert {p.device for p in new} == {"cuda:1"}
        assert placer.report(0.0)["cuda:1"]["sessions"] == 4
        results: dict[str, Any] = {}
        _run_device(scheds["cuda:1"], 4, results, "cuda:1")
    finally:
        for d in devices:
            scheds[d].stop()
            pipes[d].close()
    r = results["cuda:1"]
    assert r["frames_delivered"] == r["frames_expected"] > 4 * 40
    assert r["errors"] == 0
