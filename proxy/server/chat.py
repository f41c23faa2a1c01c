"""POST /v1/chat/completions: the chat wire format on the shared request path (proxy/server/exchange.py).
A blocked choice becomes the refusal with `finish_reason: "content_filter"`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from proxy.protocol import ChatCompletion, ChatRequest
from proxy.screening.collect import Reply
from proxy.screening.completion import completion_replies
from proxy.screening.refusal import is_structured, refusal_completion, replace_choices
from proxy.server.exchange import handle
from proxy.server.json_body import invalid
from proxy.server.wire import Stateless
from proxy.streaming.buffered import HeldStream, refusal_stream, replay
from proxy.streaming.shape import parse_completion


class ChatWire(Stateless):
    path = "/v1/chat/completions"
    upstream_path = "/chat/completions"
    prompt_field = "messages"
    id_prefix = "chatcmpl-"
    incremental = True

    async def read(self, request: web.Request, payload: dict[str, Any]) -> ChatRequest:
        try:
            return ChatRequest.model_validate(payload)
        except ValidationError as exc:
            raise invalid(exc) from exc

    def refusal(self, chat: ChatRequest, refusal: str, *, id_: str, created: int) -> dict[str, Any]:
        return refusal_completion(
            chat.model, refusal, chat.n or 1, id_=id_, created=created, structured=is_structured(chat)
        )

    def refusal_stream(self, chat: ChatRequest, refusal: str, *, id_: str, created: int) -> list[bytes]:
        options = (chat.model_extra or {}).get("stream_options")
        usage = isinstance(options, dict) and options.get("include_usage") is True
        return refusal_stream(
            chat.model, refusal, chat.n or 1, id_=id_, created=created, structured=is_structured(chat), usage=usage
        )

    def reply(self, body: bytes) -> tuple[dict[str, Any], list[Reply]]:
        completion_json = parse_completion(body)
        completion = ChatCompletion.model_validate(completion_json)
        return completion_json, completion_replies(completion)

    def replace(self, chat: ChatRequest, reply: dict[str, Any], blocked: set[int], refusal: str) -> dict[str, Any]:
        return replace_choices(reply, blocked, refusal, structured=is_structured(chat))

    def held(self, *, max_bytes: int, max_events: int) -> HeldStream:
        return HeldStream(max_bytes=max_bytes, max_events=max_events)

    def replay(self, chat: ChatRequest, held: HeldStream, blocked: set[int], refusal: str) -> Iterator[bytes]:
        return replay(held, blocked, refusal, structured=is_structured(chat))


CHAT = ChatWire()


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await handle(request, CHAT)
