"""The buffered relay: hold every upstream event, rebuild each choice's text for the output check,
then replay the events unchanged, or with blocked choices cut out and refused.

Nothing from the upstream reaches the client before the whole reply passed its checks. What is held
is bounded (`max_held_bytes`, `max_stream_events`) and kept once: the events' bytes in one buffer
plus each choice's text; an event is parsed again only when a blocked reply must be rewritten.
"""

from __future__ import annotations

import asyncio
import json
from array import array
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from proxy.errors import UpstreamError
from proxy.protocol import error_body
from proxy.screening.collect import Reply
from proxy.streaming.shape import (
    CHOICE_FIELDS,
    KNOWN_FIELDS,
    content_text,
    index_of,
    items,
    mapping,
    other_text,
    text_of,
    token,
    tool_calls_of,
)
from proxy.streaming.sse import DONE, Event, EventReader, MalformedStream, data_of, encode

REPLAY_PIECE_BYTES = 64 * 1024
_YIELD_EVERY_EVENTS = 512  # a read with many events gives the loop a turn this often
_PIECES_PER_BLOCK = 256


class ReplyTooLarge(UpstreamError):
    """The upstream's reply is over a cap on what the proxy holds for checking."""

    code = "upstream_reply_too_large"

    def __init__(self, cap: str, limit: int, unit: str) -> None:
        super().__init__(f"The upstream's reply is over the proxy's {cap} ({limit} {unit}); it was not relayed.")
        self.cap = cap


class UpstreamReported(UpstreamError):
    """The upstream sent an error event: its message is text nobody screened, so the client gets
    the proxy's own message, naming the upstream's `type` and `code` only when they are plain tokens."""

    code = "upstream_stream_error"

    def __init__(self, error: Any) -> None:
        error = error if isinstance(error, dict) else {}
        upstream_type = token(error.get("type"))
        said = f" ({upstream_type})" if upstream_type else ""
        super().__init__(f"The upstream reported an error mid-stream{said}.")
        self.upstream_code = token(error.get("code"))

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.upstream_code or self.code)


class _Text:
    """Text that arrives in many small pieces, kept as a few large strings: a string per delta
    would cost about 50 bytes more than its text."""

    __slots__ = ("_blocks", "_pieces")

    def __init__(self) -> None:
        self._blocks: list[str] = []
        self._pieces: list[str] = []

    def add(self, text: str) -> None:
        if text:
            self._pieces.append(text)
            if len(self._pieces) >= _PIECES_PER_BLOCK:
                self._blocks.append("".join(self._pieces))
                self._pieces.clear()

    def extend(self, texts: list[str]) -> None:
        for text in texts:
            self.add(text)

    def value(self) -> str:
        return "".join(self._blocks) + "".join(self._pieces)


@dataclass
class _ChoiceText:
    reasoning: _Text = field(default_factory=_Text)
    content: _Text = field(default_factory=_Text)
    tools: dict[int, _Text] = field(default_factory=dict)
    refusal: _Text = field(default_factory=_Text)
    other: dict[str, _Text] = field(default_factory=dict)

    def text(self) -> str:
        parts = [self.reasoning.value(), self.content.value()]
        parts += [args.value() for _, args in sorted(self.tools.items())]
        parts.append(self.refusal.value())
        parts += [texts.value() for texts in self.other.values()]
        return "\n".join(p for p in parts if p)


@dataclass
class HeldStream:
    """The upstream events to replay (one buffer, with each event's end) and each choice's text."""

    frames: bytearray = field(default_factory=bytearray)
    ends: array[int] = field(default_factory=lambda: array("q"))
    choices: dict[int, _ChoiceText] = field(default_factory=dict)
    received: int = 0
    events: int = 0
    done: bool = False
    model: str | None = None
    id: str | None = None
    created: int | None = None

    def replies(self) -> list[Reply]:
        return [Reply(index, c.text()) for index, c in sorted(self.choices.items())]

    def add(self, event: Event) -> None:
        """Read one event: its text goes to its choices, its bytes to the replay buffer."""
        if event.data is None:
            return  # a comment or a bare field: never relayed
        if event.done:
            self.done = True
        else:
            self._read(_parse(event.data))
        self.frames += event.frame()
        self.ends.append(len(self.frames))

    def stored(self) -> Iterator[bytes]:
        start = 0
        for end in self.ends:
            yield bytes(self.frames[start:end])
            start = end

    def _read(self, chunk: dict[str, Any]) -> None:
        if chunk.get("error") is not None:
            raise UpstreamReported(chunk["error"])
        if isinstance(chunk.get("model"), str):
            self.model = self.model or chunk["model"]
        if isinstance(chunk.get("id"), str):
            self.id = self.id or chunk["id"]
        if type(chunk.get("created")) is int:
            self.created = self.created or chunk["created"]
        # Where a fault is, named without the choice's position: building that name per delta is
        # most of the cost of reading one.
        at, in_delta = "choices[]", "choices[].delta"
        for choice in items(chunk.get("choices"), "choices"):
            choice = mapping(choice, at)
            state = self.choices.setdefault(index_of(choice, at), _ChoiceText())
            delta = mapping(choice.get("delta"), in_delta)
            text_of(choice, "finish_reason", at)
            for key in ("reasoning_content", "reasoning"):
                state.reasoning.add(text_of(delta, key, in_delta))
            state.content.add(content_text(delta.get("content"), in_delta))
            state.refusal.add(text_of(delta, "refusal", in_delta))
            for index, name, arguments in tool_calls_of(delta, in_delta, indexed=True):
                state.tools.setdefault(index, _Text()).add(f"{name}({arguments}" if name else arguments)
            for key, texts in [*other_text(delta, KNOWN_FIELDS).items(), *other_text(choice, CHOICE_FIELDS).items()]:
                state.other.setdefault(key, _Text()).extend(texts)


def _parse(data: str) -> dict[str, Any]:
    try:
        chunk = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise MalformedStream("stream event data is not JSON") from exc
    if not isinstance(chunk, dict):
        raise MalformedStream("stream event is not a JSON object")
    return chunk


async def hold(chunks: AsyncIterator[bytes], *, max_bytes: int, max_events: int) -> HeldStream:
    """Read the upstream stream to `[DONE]`; an error event raises UpstreamReported, a cap
    ReplyTooLarge, a broken or unreadable stream MalformedReply."""
    held, reader = HeldStream(), EventReader()
    async for chunk in chunks:
        held.received += len(chunk)
        if held.received > max_bytes:
            raise ReplyTooLarge("max_held_bytes", max_bytes, "bytes")
        if await _add_all(held, reader.feed(chunk), max_events):
            return held
    if await _add_all(held, reader.close(), max_events):
        return held
    raise MalformedStream("upstream stream ended before [DONE]")


async def _add_all(held: HeldStream, events: Iterator[Event], max_events: int) -> bool:
    for n, event in enumerate(events, 1):
        held.events += 1
        if held.events > max_events:
            raise ReplyTooLarge("max_stream_events", max_events, "events")
        held.add(event)
        if held.done:
            return True
        if n % _YIELD_EVERY_EVENTS == 0:
            await asyncio.sleep(0)
    return False


async def hold_body(chunks: AsyncIterator[bytes], max_bytes: int) -> bytes:
    """A non-streamed reply's body, read up to `max_held_bytes`."""
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > max_bytes:
            raise ReplyTooLarge("max_held_bytes", max_bytes, "bytes")
    return bytes(body)


def replay(held: HeldStream, blocked: set[int], refusal: str) -> Iterator[bytes]:
    """The bytes to send: upstream events as they came, blocked choices' deltas removed and each
    blocked choice answered with a refusal (role, content, finish_reason content_filter)."""
    if not blocked:
        for start in range(0, len(held.frames), REPLAY_PIECE_BYTES):
            yield bytes(held.frames[start : start + REPLAY_PIECE_BYTES])
        return
    refused = False
    for frame in held.stored():
        data = data_of(frame)
        if data.strip() == "[DONE]":
            if not refused:
                yield from refusal_events(held, blocked, refusal)
                refused = True
            yield frame
            continue
        chunk = json.loads(data)  # read and checked once already
        choices = chunk.get("choices") or []
        kept = [c for c in choices if c.get("index", 0) not in blocked]
        if len(kept) == len(choices):
            if not choices and not refused:  # the usage chunk comes after every choice finished
                yield from refusal_events(held, blocked, refusal)
                refused = True
            yield frame
        elif kept:
            yield encode({**chunk, "choices": kept})
    if not refused:
        yield from refusal_events(held, blocked, refusal)


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
