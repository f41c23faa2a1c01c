"""POST /v1/completions: legacy completions as a wire format on the shared request path
(proxy/server/exchange.py). Each prompt (and the `suffix`) is screened as user text; each choice's
`text` is checked with the prompt it completes; a blocked choice becomes the refusal with
`finish_reason: "content_filter"`. Streams are always held (`stream: incremental` is chat's only)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from aiohttp import web
from pydantic import PrivateAttr, ValidationError

from proxy.errors import BadRequest
from proxy.protocol import ChatRequest
from proxy.screening.collect import Reply
from proxy.server.exchange import handle
from proxy.server.json_body import invalid
from proxy.server.wire import Stateless
from proxy.streaming.buffered import HeldStream, replay
from proxy.streaming.completions import (
    CompletionStream,
    read_completion,
    refusal_completion,
    refusal_stream,
    replace_choices,
)
from proxy.streaming.shape import MAX_CHOICES

# Request fields the proxy cannot screen: token ids and embeddings (vLLM) are no text a guard reads,
# and a chat `messages` list is not what a completion reads, so it would go upstream unscreened.
_UNSCREENABLE = {
    "prompt_embeds": "'prompt_embeds' cannot be screened: send the prompt as text.",
    "messages": "A completion request takes 'prompt', not 'messages' (use /v1/chat/completions).",
}


class PromptsRequest(ChatRequest):
    """A completion request as the guards read it: one user turn per prompt, then the `suffix`. With
    several prompts, choice i completes prompt i // n, and its output check sees only that prompt."""

    _prompts: list[ChatRequest] = PrivateAttr(default_factory=list)

    @property
    def choice_count(self) -> int:
        """How many choices the reply has: `n` per prompt."""
        return max(len(self._prompts), 1) * (self.n or 1)

    def for_choice(self, index: int) -> ChatRequest:
        prompt = index // (self.n or 1)
        # A choice past the prompts (an upstream that numbers its own way) is judged with all of them.
        return self._prompts[prompt] if prompt < len(self._prompts) else self


def prompts_of(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(p, str) for p in value):
        return value
    if isinstance(value, list) and value and all(isinstance(p, int | list) for p in value):
        raise BadRequest("Token-id prompts cannot be screened: send the prompt as text.", param="prompt")
    raise BadRequest("Invalid value for 'prompt': a string or a non-empty list of strings.", param="prompt")


def read_prompts(payload: dict[str, Any]) -> PromptsRequest:
    for field, message in _UNSCREENABLE.items():
        if field in payload:
            raise BadRequest(message, param=field)
    prompts, suffix = prompts_of(payload.get("prompt")), payload.get("suffix")
    if not (suffix is None or isinstance(suffix, str)):
        raise BadRequest("Invalid value for 'suffix': a string.", param="suffix")
    rest = {k: v for k, v in payload.items() if k not in ("prompt", "suffix")}

    def turns(texts: list[str]) -> list[dict[str, str]]:
        return [{"role": "user", "content": text} for text in [*texts, *([suffix] if suffix else [])]]

    if len(prompts) > MAX_CHOICES:  # checked before any work per prompt
        raise BadRequest(f"Too many prompts: more than {MAX_CHOICES}.", param="prompt")
    try:
        chat = PromptsRequest.model_validate({**rest, "messages": turns(prompts)})
    except ValidationError as exc:
        raise invalid(exc) from exc
    if len(prompts) * (chat.n or 1) > MAX_CHOICES:
        raise BadRequest(f"Too many choices: prompts times n is over {MAX_CHOICES}.", param="n")
    if len(prompts) > 1:
        prompt_turns, suffix_turns = chat.messages[: len(prompts)], chat.messages[len(prompts) :]
        chat._prompts = [chat.model_copy(update={"messages": [m, *suffix_turns]}) for m in prompt_turns]
    return chat


def choices_of(chat: ChatRequest) -> int:
    return chat.choice_count if isinstance(chat, PromptsRequest) else chat.n or 1


def wants_usage(chat: ChatRequest) -> bool:
    options = (chat.model_extra or {}).get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


class CompletionsWire(Stateless):
    path = "/v1/completions"
    upstream_path = "/completions"
    prompt_field = "prompt"
    id_prefix = "cmpl-"
    incremental = False

    async def read(self, request: web.Request, payload: dict[str, Any]) -> ChatRequest:
        return read_prompts(payload)

    def refusal(self, chat: ChatRequest, refusal: str, *, id_: str, created: int) -> dict[str, Any]:
        return refusal_completion(chat.model, refusal, choices_of(chat), id_=id_, created=created)

    def refusal_stream(self, chat: ChatRequest, refusal: str, *, id_: str, created: int) -> list[bytes]:
        count, usage = choices_of(chat), wants_usage(chat)
        return refusal_stream(chat.model, refusal, count, id_=id_, created=created, usage=usage)

    def reply(self, body: bytes) -> tuple[dict[str, Any], list[Reply]]:
        return read_completion(body)

    def replace(self, chat: ChatRequest, reply: dict[str, Any], blocked: set[int], refusal: str) -> dict[str, Any]:
        return replace_choices(reply, blocked, refusal)

    def held(self, *, max_bytes: int, max_events: int) -> HeldStream:
        return CompletionStream(max_bytes=max_bytes, max_events=max_events)

    def replay(self, chat: ChatRequest, held: HeldStream, blocked: set[int], refusal: str) -> Iterator[bytes]:
        return replay(held, blocked, refusal)


COMPLETIONS = CompletionsWire()


async def completions(request: web.Request) -> web.StreamResponse:
    return await handle(request, COMPLETIONS)
