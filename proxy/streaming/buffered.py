"""The buffered relay: hold every upstream event, rebuild each choice's text for the output check,
then replay the events unchanged, or with blocked choices cut out and refused.

Nothing from the upstream reaches the client before the whole reply passed its checks. What is held
is bounded (`max_held_bytes`, `max_stream_events`) and kept once: the events' bytes in one buffer
plus each choice's text; an event is parsed again only when a blocked reply must be rewritten.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from proxy.screening.completion import shown_fields
from proxy.streaming.reply import Added, ReplyTooLarge, StreamedReply, UpstreamReported, read_stream
from proxy.streaming.sse import DONE, Event, data_of, encode

__all__ = ["ReplyTooLarge", "UpstreamReported"]

REPLAY_PIECE_BYTES = 64 * 1024


@dataclass
class HeldStream(StreamedReply):
    """The reply as read, plus the upstream events to replay (one buffer, with each event's end)."""

    frames: bytearray = field(default_factory=bytearray)
    ends: array[int] = field(default_factory=lambda: array("q"))

    def keep(self, event: Event, added: list[Added]) -> None:
        if event.data is not None:
            self.frames += event.frame()
            self.ends.append(len(self.frames))

    def stored(self) -> Iterator[bytes]:
        start = 0
        for end in self.ends:
            yield bytes(self.frames[start:end])
            start = end

    def refused(self, indexes: set[int], refusal: str, *, structured: bool = False) -> list[bytes]:
        """The events that answer blocked choices with the refusal, in this stream's format (a
        format's held stream overrides it: proxy/streaming/completions.py)."""
        return refusal_events(self, indexes, refusal, structured=structured)


async def hold(chunks: AsyncIterator[bytes], *, max_bytes: int, max_events: int) -> HeldStream:
    """Read the upstream stream to `[DONE]`; an error event raises UpstreamReported, a cap
    ReplyTooLarge, a broken or unreadable stream MalformedReply."""
    held = HeldStream(max_bytes=max_bytes, max_events=max_events)
    await read_stream(held, chunks, held.keep)
    return held


async def hold_body(chunks: AsyncIterator[bytes], max_bytes: int) -> bytes:
    """A non-streamed reply's body, read up to `max_held_bytes`."""
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > max_bytes:
            raise ReplyTooLarge("max_held_bytes", max_bytes, "bytes")
    return bytes(body)


def replay(held: HeldStream, blocked: set[int], refusal: str, *, structured: bool = False) -> Iterator[bytes]:
    """The bytes to send: upstream events as they came, or, when a choice is blocked, without its
    deltas and without any unknown top-level field (cut_choices), each blocked choice answered with a
    refusal (role, content, finish_reason content_filter)."""
    if not blocked:
        for start in range(0, len(held.frames), REPLAY_PIECE_BYTES):
            yield bytes(held.frames[start : start + REPLAY_PIECE_BYTES])
        return
    refused = False
    for frame in held.stored():
        data = data_of(frame)
        if data.strip() == "[DONE]":
            if not refused:
                yield from held.refused(blocked, refusal, structured=structured)
                refused = True
            yield frame
            continue
        chunk = json.loads(data)  # read and checked once already
        if not chunk.get("choices") and not refused:  # the usage chunk comes after every choice finished
            yield from held.refused(blocked, refusal, structured=structured)
            refused = True
        if (kept := cut_choices(chunk, frame, blocked)) is not None:
            yield kept
    if not refused:
        yield from held.refused(blocked, refusal, structured=structured)


def cut_choices(chunk: dict[str, Any], frame: bytes, blocked: set[int]) -> bytes | None:
    """An event (`frame`, read as `chunk`) without the blocked choices' deltas and without its unknown
    top-level fields (a blocked choice's check read them): the same bytes when it has none of either,
    None when nothing of it is left."""
    choices = chunk.get("choices") or []
    kept = [c for c in choices if c.get("index", 0) not in blocked]
    shown = shown_fields(chunk)
    if len(kept) == len(choices) and len(shown) == len(chunk):
        return frame
    if kept or (not choices and shown.get("usage") is not None):
        return encode({**shown, "choices": kept})
    return None


def refusal_events(
    reply: StreamedReply, indexes: set[int], refusal: str, *, role: bool = True, structured: bool = False
) -> list[bytes]:
    base = {
        "id": reply.id or "chatcmpl-guardrail",
        "object": "chat.completion.chunk",
        "created": reply.created or 0,
        "model": reply.model or "",
        "system_fingerprint": reply.fingerprint,
    }
    return refusal_chunks(base, sorted(indexes), refusal, role=role, structured=structured)


def refusal_chunks(
    base: dict[str, Any], indexes: list[int], refusal: str, *, role: bool = True, structured: bool = False
) -> list[bytes]:
    """Per choice: a role chunk (unless the client already has one), the refusal (in `refusal` for a
    structured-output request, see proxy/screening/refusal.py), the finish reason."""
    field, finish = ("refusal", "stop") if structured else ("content", "content_filter")
    out = []
    for i in indexes:
        if role:
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
                    "choices": [{"index": i, "delta": {field: refusal}, "logprobs": None, "finish_reason": None}],
                }
            )
        )
        out.append(
            encode(
                {**base, "choices": [{"index": i, "delta": {}, "logprobs": None, "finish_reason": finish}]}
            )
        )
    return out


def refusal_stream(
    model: str, refusal: str, n: int, *, id_: str, created: int, structured: bool = False, usage: bool = False
) -> list[bytes]:
    """A blocked input's whole stream; with `usage` (the client's `stream_options.include_usage`)
    the usage chunk the client waits for, as an upstream sends it."""
    base = {"id": id_, "object": "chat.completion.chunk", "created": created, "model": model}
    base["system_fingerprint"] = None
    chunks = refusal_chunks(base, list(range(n)), refusal, structured=structured)
    if usage:
        nothing = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        chunks.append(encode({**base, "choices": [], "usage": nothing}))
    return [*chunks, DONE]
