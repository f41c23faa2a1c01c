"""What an OpenAI endpoint adds to the shared request path (proxy/server/exchange.py): how its request
reads as chat turns for the guards, how its reply's text is read, and what a refusal looks like.

Chat completions, legacy completions and the Responses API are each one `WireFormat`; the path from
authentication through the checks to the answer is the same for all of them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from aiohttp import web

from proxy.protocol import ChatRequest
from proxy.screening.collect import Reply
from proxy.streaming.buffered import HeldStream


class WireFormat(Protocol):
    path: str
    """The client's path; routes are resolved on it."""
    upstream_path: str
    """Relative to the upstream's base_url."""
    prompt_field: str
    """The request field `server.log_content` records."""
    id_prefix: str
    """Of the ids the proxy makes for its own refusals."""
    incremental: bool
    """Whether `stream: incremental` applies; streams of other formats are always held."""

    async def read(self, request: web.Request, payload: dict[str, Any]) -> ChatRequest:
        """The request as the guards read it (a chat request, its turns in order); a BadRequest when it
        cannot be screened."""
        ...

    def refusal(self, chat: ChatRequest, refusal: str, *, id_: str, created: int) -> dict[str, Any]:
        """The whole answer to a blocked input, not streamed."""
        ...

    def refusal_stream(self, chat: ChatRequest, refusal: str, *, id_: str, created: int) -> list[bytes]:
        """The whole answer to a blocked input, as SSE events."""
        ...

    def reply(self, body: bytes) -> tuple[dict[str, Any], list[Reply]]:
        """A 200 reply read: its JSON and each choice's text (MalformedReply when it cannot be read)."""
        ...

    def replace(self, chat: ChatRequest, reply: dict[str, Any], blocked: set[int], refusal: str) -> dict[str, Any]:
        """The reply with its blocked choices refused."""
        ...

    def held(self, *, max_bytes: int, max_events: int) -> HeldStream:
        """An empty held stream that reads this format's events."""
        ...

    def replay(self, chat: ChatRequest, held: HeldStream, blocked: set[int], refusal: str) -> Iterator[bytes]:
        """The held stream's events as they came, or with its blocked choices refused."""
        ...

    async def answered(
        self, request: web.Request, chat: ChatRequest, reply_id: str | None, replies: list[Reply]
    ) -> None:
        """The reply passed its checks and is on its way to the client."""
        ...

    async def withheld(self, request: web.Request, chat: ChatRequest, reply_id: str | None) -> None:
        """The reply was blocked, or its check failed: the client does not get it (the upstream may
        still keep it)."""
        ...


class Stateless:
    """The two hooks of a wire format whose upstream keeps nothing between requests (chat and legacy
    completions): nothing to remember of a reply that passed, nothing to mark of one withheld."""

    async def answered(
        self, request: web.Request, chat: ChatRequest, reply_id: str | None, replies: list[Reply]
    ) -> None:
        return None

    async def withheld(self, request: web.Request, chat: ChatRequest, reply_id: str | None) -> None:
        return None
