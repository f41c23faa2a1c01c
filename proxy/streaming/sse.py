"""Server-sent events as the OpenAI API writes them: `data: <json>` events, blank-line separated,
ending with `data: [DONE]`. The upstream's bytes are parsed here, once each, as they arrive."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from proxy.streaming.shape import MalformedReply

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"

# SSE lines end with CRLF, LF or CR; upstreams mix them.
_EOL = re.compile(rb"\r\n|\r|\n")


class MalformedStream(MalformedReply):
    """The upstream's stream is not valid SSE / JSON."""


@dataclass(frozen=True, slots=True)
class Event:
    raw: bytes
    """The event's bytes as they came, its blank line included."""
    data: str | None
    """Its data lines joined by newlines; None when it has none (comments, bare `id:` / `retry:`)."""
    data_only: bool = True
    """No comment or other field lines: the event can be relayed byte for byte."""

    @property
    def done(self) -> bool:
        return self.data is not None and self.data.strip() == "[DONE]"

    def frame(self) -> bytes:
        """What may reach the client: the raw bytes of a data-only event, else its data re-framed
        (comments, `event:`, `id:` and `retry:` lines of an upstream are never relayed)."""
        if self.data_only or self.data is None:
            return self.raw
        return frame_data(self.data)


def frame_data(data: str) -> bytes:
    return b"".join(b"data: " + line.encode() + b"\n" for line in data.split("\n")) + b"\n"


def encode(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


class EventReader:
    """An incremental SSE parser: `feed` bytes as they arrive, get the events they complete.

    Linear in the bytes received: each byte is searched once (a partial line is not rescanned when
    more arrives), and consumed bytes are dropped from the front of the buffer."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._line = 0  # start of the next unread line
        self._scan = 0  # no line end lies in [_line, _scan)
        self._start = 0  # start of the event being read
        self._data: list[bytes] = []
        self._other = False

    @property
    def pending(self) -> int:
        """Bytes held for an event that is not complete yet."""
        return len(self._buf) - self._start

    def feed(self, chunk: bytes) -> Iterator[Event]:
        """The events `chunk` completes, parsed as they are taken (a caller can give the loop a
        turn between them); take them all before the next `feed`."""
        if self._start:
            del self._buf[: self._start]  # O(1) at the front of a bytearray
            self._line -= self._start
            self._scan -= self._start
            self._start = 0
        self._buf += chunk
        return self._read_lines(final=False)

    def close(self) -> Iterator[Event]:
        """The stream ended: a last event without its blank line is an error (broken stream)."""
        yield from self._read_lines(final=True)
        if self._data or self._other or self._buf[self._line :].strip():
            raise MalformedStream("stream ended inside an event")

    def _read_lines(self, *, final: bool) -> Iterator[Event]:
        buf = self._buf
        while True:
            if not (self._data or self._other) and self._line == self._scan == self._start:
                event = self._one_line_event(buf)
                if event is not None:
                    yield event
                    continue
            match = _EOL.search(buf, self._scan)
            if match is None:
                self._scan = len(buf)
                return
            end = match.end()
            if end == len(buf) and match.group() == b"\r" and not final:
                self._scan = match.start()  # maybe the first half of a CRLF split across reads
                return
            line = bytes(buf[self._line : match.start()])
            self._line = self._scan = end
            if line:
                self._add_line(line)
            elif self._data or self._other:
                yield self._dispatch(bytes(buf[self._start : end]))
            else:
                self._start = end  # a stray blank line belongs to no event

    def _one_line_event(self, buf: bytearray) -> Event | None:
        """The common event, `data: <text>` then a blank line, both LF-ended, taken whole (the line
        by line reading below gives the same event, at several times the cost); None otherwise."""
        start = self._start
        stop = buf.find(b"\n\n", start)
        if stop < 0 or not buf.startswith(b"data: ", start) or buf.find(b"\n", start, stop) >= 0:
            return None
        if buf.find(b"\r", start, stop) >= 0:
            return None
        try:
            data = buf[start + 6 : stop].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedStream("stream event is not UTF-8") from exc
        end = stop + 2
        self._line = self._scan = self._start = end
        return Event(bytes(buf[start:end]), data, data_only=True)

    def _add_line(self, line: bytes) -> None:
        field, colon, value = line.partition(b":")
        if field == b"data":
            self._data.append(value[1:] if colon and value.startswith(b" ") else value)
        else:
            self._other = True

    def _dispatch(self, raw: bytes) -> Event:
        data_lines, other = self._data, self._other
        self._data, self._other, self._start = [], False, self._line
        if not data_lines:
            return Event(raw, None, data_only=False)
        try:
            data = b"\n".join(data_lines).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedStream("stream event is not UTF-8") from exc
        return Event(raw, data, data_only=not other)


def data_of(frame: bytes) -> str:
    """The data of one data-only event as the held stream stored it."""
    lines = [line for line in _EOL.split(frame) if line]
    return b"\n".join(line[6:] if line.startswith(b"data: ") else line[5:] for line in lines).decode("utf-8")
