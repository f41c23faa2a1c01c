"""The incremental relay (`stream: incremental`): the upstream stream is read as it arrives, and an
event reaches the client only once a check passed on reply text that includes everything it carries.

A check (the route's output checks on the conversation plus each choice's reply so far) starts when
a choice has `release_tokens` of new text (with `release_on: sentence`, also at a sentence end), and
at the end of the stream, before the finish, usage and `[DONE]` events leave; one check runs at a
time, the next covers everything that arrived meanwhile. Events leave byte for byte and whole; one
without text (role, finish, usage) leaves once everything before it did. A choice blocked mid-stream
loses its later events and ends with the refusal and `finish_reason: "content_filter"`; what it
released before stays released (the trade-off of this mode).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from proxy.errors import ProxyError
from proxy.screening.collect import Reply
from proxy.streaming.buffered import cut_choices, refusal_events
from proxy.streaming.reply import EVERY, Added, StreamedReply, read_stream
from proxy.streaming.sse import DONE, Event, data_of

CHARS_PER_TOKEN = 4
"""The token of `release_tokens`: 4 characters of a choice's new text (content, reasoning, refusal,
tool-call name and arguments, other text fields), counted without the guard's tokenizer."""
_SENTENCE_ENDS = frozenset(".!?…。！？")
_CLOSERS = "\"')]*_ \t"

Outcome = tuple[set[int], ProxyError | None]
"""A check's answer: the choices it blocked, or the error that ends the stream."""
Check = Callable[[int, list[Reply]], Coroutine[Any, Any, Outcome]]
"""Runs window `n`'s check on the given replies so far."""


class Writer(Protocol):
    async def write(self, data: bytes) -> None: ...


@dataclass(frozen=True)
class Release:
    """When text is released: the route's `release_tokens` / `release_on`, and what a block sends."""

    tokens: int
    on_sentence: bool
    refusal: str
    choices: int
    """The `n` the client asked for: the stream ends once every choice is blocked."""
    structured: bool = False
    """A structured-output request: the refusal goes in the `refusal` field (proxy/screening/refusal.py)."""


@dataclass(slots=True)
class _Held:
    frame: bytes
    seq: int
    choices: frozenset[int]
    texts: frozenset[int]
    """The choices this event adds text to: it waits for a check that covers its `seq`."""
    chars: int
    arrived: float


class IncrementalRelay:
    def __init__(
        self,
        reply: StreamedReply,
        writer: Writer,
        check: Check,
        release: Release,
        observe: Callable[[int, float], None] = lambda tokens, seconds: None,
    ) -> None:
        self.reply = reply
        self.writer = writer
        self.check = check
        self.release = release
        self.observe = observe
        """Called per released window: (tokens held back, seconds its oldest event waited)."""
        self.limit_chars = release.tokens * CHARS_PER_TOKEN
        self.windows = 0
        self.held_bytes = 0
        self.peak_held_bytes = 0
        self._held: deque[_Held] = deque()
        self._seq = 0  # events read
        self._passed = 0  # every event up to this one is inside a passed check
        self._unchecked: dict[int, int] = {}  # characters per choice that no check has seen
        self._sentence_due = False
        self._checking: asyncio.Task[Outcome] | None = None
        self._checking_seq = 0
        self._blocked: set[int] = set()
        self._shown: set[int] = set()  # choices with an event at the client
        self._done_frame = DONE
        self._wake = asyncio.Event()

    async def run(self, chunks: AsyncIterator[bytes]) -> list[bytes] | ProxyError:
        """Relay until the upstream's `[DONE]` or every choice is blocked; return the closing events
        (the caller sends them after the decision), or the error a check ended the stream with. An
        upstream failure raises. Either way nothing unchecked was sent."""
        reading = asyncio.create_task(read_stream(self.reply, chunks, self._arrived))
        reading.add_done_callback(self._wake_up)
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if reading.done() and (failure := reading.exception()) is not None:
                    raise failure
                newly: list[int] = []
                if self._checking is not None and self._checking.done():
                    blocked, failure = self._checking.result()
                    if failure is not None:
                        return failure
                    newly = self._settle(blocked)
                self._start_check_if_due()
                await self._release(self._refusal(newly))
                if newly and self._blocked >= {*range(self.release.choices), *self.reply.choices}:
                    return [DONE]  # every choice blocked: the upstream's generation is not wanted
                if self.reply.done and not self._held and self._checking is None:
                    return [self._done_frame]
        finally:
            await _stop(reading, self._checking)

    def _wake_up(self, _: object = None) -> None:
        self._wake.set()

    def _arrived(self, event: Event, added: list[Added]) -> None:
        if event.data is None:
            return  # comments are never relayed
        if event.done:
            self._done_frame = event.frame()
            self._start_check_if_due()
            self._wake.set()
            return
        self._seq += 1
        choices = frozenset(index for index, _, _ in added if index != EVERY)
        texts, chars = set(), 0
        for index, n, last in added:
            # Top-level text is every choice's, those not seen yet too: the event waits for a check
            # of each of them.
            every = {*range(self.release.choices), *self.reply.choices} if index == EVERY else {index}
            for each in every - self._blocked if n else set():
                texts.add(each)
                self._unchecked[each] = self._unchecked.get(each, 0) + n
            if n and not every <= self._blocked:
                chars += n
                if self.release.on_sentence and ends_sentence(last):
                    self._sentence_due = True
        if not (choices and choices <= self._blocked):
            frame = event.frame()
            self._held.append(_Held(frame, self._seq, choices, frozenset(texts), chars, time.perf_counter()))
            self.held_bytes += len(frame)
            self.peak_held_bytes = max(self.peak_held_bytes, self.held_bytes)
        self._start_check_if_due()
        self._wake.set()

    def _start_check_if_due(self) -> None:
        if self._checking is not None or not self._unchecked:
            return
        full = max(self._unchecked.values()) >= self.limit_chars
        if not (full or self._sentence_due or self.reply.done):
            return
        replies = [self.reply.reply(index) for index in sorted(self._unchecked)]
        self._unchecked.clear()
        self._sentence_due = False
        self.windows += 1
        self._checking_seq = self._seq
        self._checking = asyncio.create_task(self.check(self.windows, replies))
        self._checking.add_done_callback(self._wake_up)

    def _settle(self, blocked: set[int]) -> list[int]:
        """Apply the finished check: what it covered passed, except the choices it newly blocked."""
        self._checking = None
        self._passed = self._checking_seq
        newly = sorted(blocked - self._blocked)
        self._blocked.update(newly)
        for index in newly:
            self._unchecked.pop(index, None)
        return newly

    def _refusal(self, newly: list[int]) -> list[bytes]:
        """The events that end newly blocked choices (a role chunk only where the client has none)."""
        frames = []
        for index in newly:
            frames += refusal_events(
                self.reply,
                {index},
                self.release.refusal,
                role=index not in self._shown,
                structured=self.release.structured,
            )
        self._shown.update(newly)
        return frames

    async def _release(self, refusal: list[bytes]) -> None:
        """Send every held event inside a passed check (or carrying no text to check), in order; a
        refusal goes before the first event of no choice (the usage chunk follows every choice)."""
        out: list[bytes] = []
        chars, oldest = 0, None
        while self._held:
            head = self._held[0]
            if head.seq > self._passed and not head.texts <= self._blocked:
                break
            if not head.choices and refusal:
                out += refusal
                refusal = []
            self._held.popleft()
            self.held_bytes -= len(head.frame)
            frame: bytes | None = head.frame
            # An event whose text a blocked check read leaves without that choice and without its
            # unknown top-level fields (every choice's check read those).
            if (head.choices | head.texts) & self._blocked:
                frame = cut_choices(json.loads(data_of(head.frame)), head.frame, self._blocked)
            if frame is None:
                continue
            out.append(frame)
            self._shown.update(head.choices - self._blocked)
            if head.texts - self._blocked:
                chars += head.chars
                oldest = head.arrived if oldest is None else oldest
        out += refusal
        if out:
            await self.writer.write(b"".join(out))
        if oldest is not None:
            self.observe(math.ceil(chars / CHARS_PER_TOKEN), time.perf_counter() - oldest)


def ends_sentence(text: str) -> bool:
    """Does this piece of text end a sentence (or a line)?"""
    if "\n" in text:
        return True
    tail = text.rstrip(_CLOSERS)
    return bool(tail) and tail[-1] in _SENTENCE_ENDS


async def _stop(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel what still runs (the upstream read closes, a pending check is dropped) and wait for it."""
    live = [task for task in tasks if task is not None]
    for task in live:
        task.cancel()
    if live:
        await asyncio.wait(live)
    for task in live:
        if not task.cancelled():
            task.exception()  # retrieved: a failure after the answer was decided is not news
