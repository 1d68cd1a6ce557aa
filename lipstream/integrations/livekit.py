"""The agent side of lipstream as a LiveKit avatar, written the way LiveKit's provider plugins
(`livekit-plugins-bey`, `-tavus`, ...) write theirs.

    avatar = AvatarSession(base_url="http://lipstream:8000", avatar_id="av_...")
    await avatar.start(session, room=ctx.room)   # before session.start(...)

`start` mints an access token for the avatar worker (its own participant in the room, allowed to
publish on behalf of this agent), asks the lipstream server to join the room with it
(`POST /v1/livekit/sessions`), and routes the agent's TTS audio to the worker
(`DataStreamAudioOutput`: `lk.audio_stream` byte streams, 16 kHz).

Needs `pip install 'lipstream[livekit]'`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import aiohttp
from livekit import api, rtc
from livekit.agents import AgentSession, get_job_context
from livekit.agents.voice.avatar import AvatarSession as BaseAvatarSession
from livekit.agents.voice.avatar import DataStreamAudioOutput
from livekit.agents.voice.room_io import ATTRIBUTE_PUBLISH_ON_BEHALF

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000  # what the lipstream session takes; the agent resamples to it
DEFAULT_IDENTITY = "lipstream-avatar"


class LipstreamError(Exception):
    """The avatar could not be started (with the server's or LiveKit's reason)."""


@dataclass(frozen=True)
class LiveKitCredentials:
    """Where the room is and the key that signs tokens for it (LIVEKIT_* by default)."""

    url: str
    api_key: str
    api_secret: str

    def __post_init__(self) -> None:
        if not self.url or not self.api_key or not self.api_secret:
            raise LipstreamError(
                "the LiveKit url, api key and api secret must be given "
                "(or LIVEKIT_URL, LIVEKIT_API_KEY, LIVEKIT_API_SECRET set)"
            )
        if not self.url.startswith(("ws://", "wss://", "http://", "https://")):
            raise LipstreamError(
                f"the LiveKit url must be ws(s):// or http(s)://, got {self.url!r}"
            )

    @classmethod
    def from_env(
        cls, url: str | None = None, api_key: str | None = None, api_secret: str | None = None
    ) -> LiveKitCredentials:
        return cls(
            url or os.environ.get("LIVEKIT_URL", ""),
            api_key or os.environ.get("LIVEKIT_API_KEY", ""),
            api_secret or os.environ.get("LIVEKIT_API_SECRET", ""),
        )


def worker_token(
    credentials: LiveKitCredentials,
    room: str,
    identity: str,
    on_behalf_of: str | None,
    name: str | None = None,
    ttl_s: int = 3600,
) -> str:
    """The avatar worker's access token: join `room` as `identity` (kind agent), publish, and
    publish on behalf of the agent participant `on_behalf_of`."""
    token = (
        api.AccessToken(api_key=credentials.api_key, api_secret=credentials.api_secret)
        .with_kind("agent")
        .with_identity(identity)
        .with_name(name or identity)
        .with_ttl(timedelta(seconds=ttl_s))
        .with_grants(
            api.VideoGrants(
                room_join=True,
                room=room,
                can_publish=True,
                can_subscribe=True,
                can_publish_data=True,
            )
        )
    )
    if on_behalf_of:
        token = token.with_attributes({ATTRIBUTE_PUBLISH_ON_BEHALF: on_behalf_of})
    return token.to_jwt()


async def request_join(
    base_url: str,
    avatar_id: str,
    url: str,
    token: str,
    api_key: str | None = None,
    timeout_s: float = 30.0,
) -> dict[str, Any]:
    """`POST /v1/livekit/sessions`: the lipstream server joins the room. Returns its answer
    (`session_id`, `room`, `identity`); raises LipstreamError with the server's reason."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {"avatar_id": avatar_id, "url": url, "token": token}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as http,
            http.post(
                f"{base_url.rstrip('/')}/v1/livekit/sessions", json=body, headers=headers
            ) as r,
        ):
            if r.status != 201:
                text = await r.text()
                raise LipstreamError(f"the lipstream server answered {r.status}: {text[:500]}")
            answer: dict[str, Any] = await r.json()
            return answer
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise LipstreamError(f"could not reach the lipstream server at {base_url}: {exc}") from None


class AvatarSession(BaseAvatarSession):
    """A lipstream avatar in a LiveKit room (see the module docstring)."""

    def __init__(
        self,
        base_url: str,
        avatar_id: str,
        api_key: str | None = None,
        *,
        avatar_participant_identity: str = DEFAULT_IDENTITY,
        avatar_participant_name: str = "lipstream avatar",
    ) -> None:
        super().__init__()
        if not base_url.startswith(("http://", "https://")):
            raise LipstreamError(f"base_url must be http(s)://, got {base_url!r}")
        if not avatar_id:
            raise LipstreamError("avatar_id must be a lipstream avatar id")
        self.base_url = base_url
        self.avatar_id = avatar_id
        self.api_key = api_key or os.environ.get("LIPSTREAM_API_KEY") or None
        self._identity = avatar_participant_identity
        self._name = avatar_participant_name
        self.session_id: str | None = None

    @property
    def avatar_identity(self) -> str:
        return self._identity

    @property
    def provider(self) -> str:
        return "lipstream"

    async def start(
        self,
        agent_session: AgentSession,
        room: rtc.Room,
        *,
        livekit_url: str | None = None,
        livekit_api_key: str | None = None,
        livekit_api_secret: str | None = None,
    ) -> None:
        await super().start(agent_session, room)
        credentials = LiveKitCredentials.from_env(livekit_url, livekit_api_key, livekit_api_secret)
        job = get_job_context(required=False)
        agent_identity = (
            job.local_participant_identity if job is not None else room.local_participant.identity
        )
        token = worker_token(credentials, room.name, self._identity, agent_identity, self._name)
        log.debug("starting lipstream avatar", extra={"room": room.name, "avatar": self.avatar_id})
        answer = await request_join(
            self.base_url, self.avatar_id, credentials.url, token, self.api_key
        )
        self.session_id = answer.get("session_id")
        agent_session.output.replace_audio_tail(
            DataStreamAudioOutput(
                room=room,
                destination_identity=self._identity,
                wait_remote_track=rtc.TrackKind.KIND_VIDEO,
                sample_rate=SAMPLE_RATE,
            )
        )
