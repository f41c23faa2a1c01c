"""The buffered relay: hold every upstream event, rebuild each choice's text for the output check,
then replay the events unchanged, or with blocked choices cut out and refused.

Nothing from the upstream reaches the client before the whole reply passed its checks.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from proxy.screening.collect import Reply
from proxy.streaming.sse import DONE, Event, MalformedStream, encode, read_events


@dataclass
class _ChoiceText:
    content: list[str] = field(default_factory=list)
    tools: dict[int, list[str]] = field(default_factory=dict)
    refusal: list[str] = field(default_factory=list)

    def text(self) -> str:
        parts = ["".join(self.content)]
        parts += ["".join(args) for _, args in sorted(self.tools.items())]
        parts.append("".join(self.refusal))
        return "\n".join(p for p in parts if p)


@dataclass
class HeldStream:
    events: list[Event] = field(default_factory=list)
    chunks: list[dict[str, Any] | None] = field(default_factory=list)
    choices: dict[int, _ChoiceText] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    model: str | None = None
    id: str | None = None
    created: int | None = None

    def replies(self) -> list[Reply]:
        return [Reply(index, c.text()) for index, c in sorted(self.choices.items())]

    def add(self, event: Event) -> None:
        self.events.append(event)
        if event.data is None or event.done:
            self.chunks.append(None)
            return
        try:
            chunk = json.loads(event.data)
        except ValueError as exc:
            raise MalformedStream("stream event data is not JSON") from exc
        if not isinstance(chunk, dict):
            raise MalformedStream("stream event is not a JSON object")
        self.chunks.append(chunk)
        if "error" in chunk:
            self.error = chunk
            return
        self.model = self.model or chunk.get("model")
        self.id = self.id or chunk.get("id")
        self.created = self.created or chunk.get("created")
        for choice in chunk.get("choices") or []:
            self._add_delta(choice)

    def _add_delta(self, choice: dict[str, Any]) -> None:
        state = self.choices.setdefault(int(choice.get("index", 0)), _ChoiceText())
        delta = choice.get("delta") or {}
        if isinstance(delta.get("content"), str):
            state.content.append(delta["content"])
        if isinstance(delta.get("refusal"), str):
            state.refusal.append(delta["refusal"])
        for call in delta.get("tool_calls") or []:
            fn = call.get("function") or {}
            args = state.tools.setdefault(int(call.get("index", 0)), [])
            if fn.get("name"):
                args.append(f"{fn['name']}(")
            if isinstance(fn.get("arguments"), str):
                args.append(fn["arguments"])
        if isinstance(delta.get("function_call"), dict):
            fn = delta["function_call"]
            state.tools.setdefault(-1, []).append((fn.get("name") or "") + (fn.get("arguments") or ""))


async def hold(chunks: AsyncIterator[bytes]) -> HeldStream:
    """Read the upstream stream to its end (`[DONE]` or an error event)."""
    held = HeldStream()
    saw_done = False
    async for event in read_events(chunks):
        held.add(event)
        if event.done:
            saw_done = True
            break
        if held.error is not None:
            break
    if not saw_done and held.error is None:
        raise MalformedStream("upstream stream ended before [DONE]")
    return held


def replay(held: HeldStream, blocked: set[int], refusal: str) -> list[bytes]:
    """The bytes to send: upstream events as they came, blocked choices' deltas removed and each
    blocked choice answered with a refusal (role, content, finish_reason content_filter)."""
    if not blocked:
        return [e.raw for e in held.events]
    out: list[bytes] = []
    refused = False
    for event, chunk in zip(held.events, held.chunks, strict=True):
        if chunk is None:
            if event.done and not refused:
                out.extend(refusal_events(held, blocked, refusal))
                refused = True
            out.append(event.raw)
            continue
        choices = chunk.get("choices") or []
        kept = [c for c in choices if int(c.get("index", 0)) not in blocked]
        if len(kept) == len(choices):
            if not choices and not refused:  # the usage chunk comes after every choice finished
                out.extend(refusal_events(held, blocked, refusal))
                refused = True
            out.append(event.raw)
        elif kept:
            out.append(encode({**chunk, "choices": kept}))
    if not refused:
        out.extend(refusal_events(held, blocked, refusal))
    return out


def refusal_events(held: HeldStream, indexes: set[int], refusal: str) -> list[bytes]:
    base = {
        "id": held.id or "chatcmpl-guardrail",
        "object": "chat.completion.chunk",
        "created": held.created or 0,
        "model": held.model or "",
    }
    return refusal_chunks(base, sorted(indexes), refusal)


def refusal_chunks(base: dict[str, Any], indexes: list[int], refusal: str) -> list[bytes]:
    out = []
    for i in indexes:
        out.append(
            encode(
                {
                    **base,
                    "choices": [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ],
                }
            )
        )
        out.append(
            encode(
                {
                    **base,
                    "choices": [{"index": i, "delta": {"content": refusal}, "logprobs": None, "finish_reason": None}],
                }
            )
        )
        out.append(
            encode(
                {**base, "choices": [{"index": i, "delta": {}, "logprobs": None, "finish_reason": "content_filter"}]}
            )
        )
    return out


def refusal_stream(model: str, refusal: str, n: int, *, id_: str, created: int) -> list[bytes]:
    base = {"id": id_, "object": "chat.completion.chunk", "created": created, "model": model}
    return [*refusal_chunks(base, list(range(n)), refusal), DONE]
