"""Reading an upstream chat stream: SSE events parsed once as they arrive, each chunk's shape checked
and its text added to its choice's reply so far. Both stream modes read the upstream through this
(`buffer` holds every event until the end, `incremental` releases checked windows as it goes).

What is read is capped (`max_held_bytes`, `max_stream_events`); the reply so far is kept as each
choice's text (a few large strings per field) for the output checks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from proxy.errors import UpstreamError
from proxy.protocol import error_body, loads
from proxy.screening.collect import Reply
from proxy.screening.completion import COMPLETION_FIELDS
from proxy.screening.logprobs import chat_logprobs_text
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
from proxy.streaming.sse import Event, EventReader, MalformedStream

_YIELD_EVERY_EVENTS = 512  # a read with many events gives the loop a turn this often
_PIECES_PER_BLOCK = 256
_PLAIN_DELTA = frozenset({"role", "content"})

Added = tuple[int, int, str]
"""What one event added to one of its choices: (choice index, characters of text, the last text piece)."""
EVERY = -1
"""The choice index of text an event added to every choice (its unknown top-level fields)."""


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


class TextPieces:
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

    def value(self) -> str:
        return "".join(self._blocks) + "".join(self._pieces)


@dataclass
class _ChoiceText:
    reasoning: TextPieces = field(default_factory=TextPieces)
    content: TextPieces = field(default_factory=TextPieces)
    tools: dict[int, TextPieces] = field(default_factory=dict)
    refusal: TextPieces = field(default_factory=TextPieces)
    logprobs: TextPieces = field(default_factory=TextPieces)
    other: dict[str, TextPieces] = field(default_factory=dict)

    def text(self) -> str:
        parts = [self.reasoning.value(), self.content.value()]
        parts += [args.value() for _, args in sorted(self.tools.items())]
        parts += [self.refusal.value(), self.logprobs.value()]
        parts += [texts.value() for texts in self.other.values()]
        return "\n".join(p for p in parts if p)


@dataclass
class StreamedReply:
    """Each choice's text so far, the reply's id / model / created, and what was read against the caps."""

    max_bytes: int
    max_events: int
    choices: dict[int, _ChoiceText] = field(default_factory=dict)
    received: int = 0
    events: int = 0
    done: bool = False
    model: str | None = None
    id: str | None = None
    created: int | None = None
    fingerprint: str | None = None
    """The upstream's `system_fingerprint`, which the proxy's own chunks carry too."""
    top: dict[str, TextPieces] = field(default_factory=dict)
    """Unknown top-level fields' text, by field: part of every choice's text."""
    _sse: EventReader = field(default_factory=EventReader)
    _top_last: dict[str, list[str]] = field(default_factory=dict)
    END: ClassVar[str] = "[DONE]"
    """What ends the stream, for the error that says it never came."""

    def replies(self) -> list[Reply]:
        """Each choice's text so far; top-level text alone is choice 0's while there are no choices."""
        indexes = sorted(self.choices) or ([0] if self.top else [])
        return [self.reply(index) for index in indexes]

    def reply(self, index: int) -> Reply:
        """A choice's text so far, then the top-level text (a choice not seen yet has only that)."""
        choice = self.choices.get(index)
        texts = [choice.text() if choice is not None else ""]
        texts += [pieces.value() for pieces in self.top.values()]
        return Reply(index, "\n".join(t for t in texts if t))

    def feed(self, chunk: bytes) -> Iterator[tuple[Event, list[Added]]]:
        """The events `chunk` completes, each read (shape checked, text added) when taken; events
        without data (comments) come too, with nothing added, and are never relayed."""
        self.received += len(chunk)
        if self.received > self.max_bytes:
            raise ReplyTooLarge("max_held_bytes", self.max_bytes, "bytes")
        return self._take(self._sse.feed(chunk))

    def close(self) -> Iterator[tuple[Event, list[Added]]]:
        """The upstream ended: the events of its last read (a broken last event raises)."""
        return self._take(self._sse.close())

    def _take(self, events: Iterator[Event]) -> Iterator[tuple[Event, list[Added]]]:
        for event in events:
            self.events += 1
            if self.events > self.max_events:
                raise ReplyTooLarge("max_stream_events", self.max_events, "events")
            if event.data is None:
                yield event, []  # a comment or a bare field: never relayed, but read
            elif event.done:
                self.finish()
                yield event, []
                return
            else:
                yield event, self._read(_parse(event.data))

    def finish(self) -> None:
        """`data: [DONE]` ends a chat stream. A format that ends on an event of its own (the Responses
        API's `response.completed`) sets `done` in `_read` and refuses a [DONE] before it here."""
        self.done = True

    def _read(self, chunk: dict[str, Any]) -> list[Added]:
        if chunk.get("error") is not None:
            raise UpstreamReported(chunk["error"])
        if isinstance(chunk.get("model"), str):
            self.model = self.model or chunk["model"]
        if isinstance(chunk.get("id"), str):
            self.id = self.id or chunk["id"]
        if type(chunk.get("created")) is int:
            self.created = self.created or chunk["created"]
        if isinstance(chunk.get("system_fingerprint"), str):
            self.fingerprint = self.fingerprint or chunk["system_fingerprint"]
        # Where a fault is, named without the choice's position: building that name per delta is
        # most of the cost of reading one.
        at, in_delta = "choices[]", "choices[].delta"
        added: list[Added] = []
        if not chunk.keys() <= COMPLETION_FIELDS:
            added += self._read_top(chunk)
        for choice in items(chunk.get("choices"), "choices"):
            choice = mapping(choice, at)
            index = index_of(choice, at)
            state = self.choices.get(index)
            if state is None:
                state = self.choices[index] = _ChoiceText()
            plain = _plain_content(choice)
            if plain is not None:
                # The common delta (role and/or a content string): read as below, in fewer steps.
                state.content.add(plain)
                added.append((index, len(plain), plain))
                continue
            delta = mapping(choice.get("delta"), in_delta)
            text_of(choice, "finish_reason", at)
            content, refusal = content_text(delta.get("content"), in_delta), text_of(delta, "refusal", in_delta)
            pieces: list[tuple[TextPieces, str]] = [
                (state.reasoning, text_of(delta, "reasoning_content", in_delta)),
                (state.reasoning, text_of(delta, "reasoning", in_delta)),
                (state.content, content),
                (state.refusal, refusal),
            ]
            # Of `logprobs`, what a client may show beside this chunk's text (spaced: alternatives of
            # successive chunks are no one word).
            if shown := chat_logprobs_text(choice.get("logprobs"), content, refusal):
                pieces.append((state.logprobs, " ".join(shown) + " "))
            for call, name, arguments in tool_calls_of(delta, in_delta, indexed=True):
                args = state.tools.get(call)
                if args is None:
                    args = state.tools[call] = TextPieces()
                pieces.append((args, f"{name}({arguments}" if name else arguments))
            for key, texts in [*other_text(delta, KNOWN_FIELDS).items(), *other_text(choice, CHOICE_FIELDS).items()]:
                other = state.other.get(key)
                if other is None:
                    other = state.other[key] = TextPieces()
                pieces += [(other, text) for text in texts]
            chars, last = 0, ""
            for part, text in pieces:
                if text:
                    part.add(text)
                    chars += len(text)
                    last = text
            added.append((index, chars, last))
        return added

    def _read_top(self, chunk: dict[str, Any]) -> list[Added]:
        chars, last = 0, ""
        for key, texts in other_text(chunk, COMPLETION_FIELDS).items():
            # A value repeated in every chunk (a router's `provider`) is what the client already has
            # from the chunk before: read once, not once per chunk.
            if self._top_last.get(key) == texts:
                continue
            self._top_last[key] = texts
            pieces = self.top.get(key)
            if pieces is None:
                pieces = self.top[key] = TextPieces()
            for text in texts:
                pieces.add(text)
                chars += len(text)
                last = text
        return [(EVERY, chars, last)] if chars else []


def _plain_content(choice: dict[str, Any]) -> str | None:
    """The content of a choice whose delta holds only `role` and a content string (or nothing) and
    which has no field beyond the known ones; None for any other shape (read field by field)."""
    delta = choice.get("delta")
    if type(delta) is not dict or not delta.keys() <= _PLAIN_DELTA or not choice.keys() <= CHOICE_FIELDS:
        return None
    if choice.get("logprobs") is not None:
        return None
    content, finish = delta.get("content"), choice.get("finish_reason")
    if not (content is None or type(content) is str) or not (finish is None or type(finish) is str):
        return None
    return content or ""


def _parse(data: str) -> dict[str, Any]:
    try:
        chunk = loads(data)
    except (ValueError, RecursionError) as exc:
        raise MalformedStream("stream event data is not JSON") from exc
    if not isinstance(chunk, dict):
        raise MalformedStream("stream event is not a JSON object")
    return chunk


async def read_stream(
    reply: StreamedReply, chunks: AsyncIterator[bytes], take: Callable[[Event, list[Added]], None]
) -> None:
    """Read the upstream stream to `[DONE]`, handing `take` each event once it was read ([DONE] last;
    comments too, which are never relayed). An error event raises UpstreamReported, a cap
    ReplyTooLarge, a broken stream MalformedReply."""
    async for chunk in chunks:
        if await _take_all(reply, reply.feed(chunk), take):
            return
    if await _take_all(reply, reply.close(), take):
        return
    raise MalformedStream(f"upstream stream ended before {reply.END}")


async def _take_all(
    reply: StreamedReply, events: Iterator[tuple[Event, list[Added]]], take: Callable[[Event, list[Added]], None]
) -> bool:
    for n, (event, added) in enumerate(events, 1):
        take(event, added)
        if reply.done:
            return True
        if n % _YIELD_EVERY_EVENTS == 0:
            await asyncio.sleep(0)
    return False
