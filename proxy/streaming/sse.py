"""Server-sent events as the OpenAI API writes them: `data: <json>` events, blank-line separated,
ending with `data: [DONE]`. Events keep their raw bytes so an allowed stream is replayed unchanged."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"


@dataclass(frozen=True)
class Event:
    raw: bytes
    data: str | None

    @property
    def done(self) -> bool:
        return self.data is not None and self.data.strip() == "[DONE]"


class MalformedStream(Exception):
    """The upstream's stream is not valid SSE / JSON."""


def encode(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def _parse(raw: bytes) -> Event:
    data_lines = []
    for line in raw.replace(b"\r\n", b"\n").split(b"\n"):
        if line.startswith(b"data:"):
            value = line[5:]
            data_lines.append(value[1:] if value.startswith(b" ") else value)
    if not data_lines:
        return Event(raw, None)
    try:
        return Event(raw, b"\n".join(data_lines).decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise MalformedStream("stream event is not UTF-8") from exc


async def read_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[Event]:
    """Split a byte stream into events; a trailing partial event is an error (broken stream)."""
    buffer = b""
    async for chunk in chunks:
        buffer += chunk
        while True:
            cut = _boundary(buffer)
            if cut is None:
                break
            end, size = cut
            raw, buffer = buffer[: end + size], buffer[end + size :]
            if raw.strip():
                yield _parse(raw)
    if buffer.strip():
        raise MalformedStream("stream ended inside an event")


def _boundary(buffer: bytes) -> tuple[int, int] | None:
    best = None
    for sep in (b"\n\n", b"\r\n\r\n"):
        idx = buffer.find(sep)
        if idx != -1 and (best is None or idx < best[0]):
            best = (idx, len(sep))
    return best
