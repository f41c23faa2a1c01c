"""Prefetch: while the upstream writes its reply, each output Llama Guard computes the start of the
prompt its output check will read into its prefix cache: the policy header for the Agent role and the
conversation up to the reply and, while a held stream comes in, the reply so far. The check that
follows the reply then computes only what the prefetch could not know: the reply's last words and
the closing instructions.

Speculative and harmless. The prefix cache matches exact token ids, so a wrong guess costs only its
compute, never a score: the guard takes the longest common token prefix of the prompts with a few
placeholders after the text known so far (so tokenization where the text goes on cannot differ).
It runs as idle runner jobs (only when no check waits; it gives way to the first one that does,
keeping what its steps computed), one at a time per guard and per request, and it stops when the
reply is complete or the request ends. Requests with images are not prefetched (reading them again
costs the loop).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Protocol

import structlog

from proxy.guards.guard import Guard, GuardError, PrefetchOutcome, PrefetchState, Taxonomy, Turn
from proxy.policy.models import RouteSettings
from proxy.protocol import ChatRequest
from proxy.screening.collect import Reply, conversation, count_limits, with_reply
from proxy.screening.pipeline import OFF_LOOP_CHARS

log = structlog.get_logger("proxy.screening")

PLACEHOLDERS = ("a", "1", "-")
"""Text that starts with a letter, a digit and a sign: tokenizers split before each differently."""
STREAM_STEP_EVENTS = 24
"""A held stream's prefetch goes further each time this many more events came (about 24 tokens)."""


class Prefetching(Protocol):
    @property
    def prefetch_state(self) -> PrefetchState:
        """ready, busy or off: a cheap test, before the request is read again."""
        ...

    async def prefetch(self, conversations: list[list[Turn]], taxonomy: Taxonomy) -> PrefetchOutcome:
        """Compute what the prompts of `conversations` share into the cache."""
        ...


class Observe(Protocol):
    """Told each prefetch's outcome."""

    def __call__(self, guard: str, outcome: PrefetchOutcome) -> None: ...


class Growing(Protocol):
    """A held stream, as the prefetch reads it."""

    events: int

    def replies(self) -> list[Reply]: ...


class Prefetch:
    """One request's prefetch: the conversation before the reply, then the reply as it comes."""

    def __init__(
        self,
        guards: Mapping[str, Prefetching] | None = None,
        route: RouteSettings | None = None,
        chat: ChatRequest | None = None,
        observe: Observe | None = None,
    ) -> None:
        self._guards = dict(guards or {})
        self._route, self._chat, self._observe = route, chat, observe
        self._turns: list[Turn] | None = None  # the conversation, read once
        self._next_at = STREAM_STEP_EVENTS
        self._last = ""  # the reply text the last round prefetched
        self.task: asyncio.Task[None] | None = None

    def start(self, reply: Callable[[], str] = str, *, round_: bool = False) -> None:
        """Prefetch the output check's prompt up to `reply()` (the reply's text so far) for each
        guard that is ready, unless this request's prefetch still runs. A stream's `round_` counts
        no busy guard (rounds come every few events)."""
        if not self._guards or (self.task is not None and not self.task.done()):
            return
        assert self._observe is not None
        observe = self._observe
        ready: dict[str, Prefetching] = {}
        for name, guard in self._guards.items():
            if (state := guard.prefetch_state) == "ready":
                ready[name] = guard
            elif state == "busy" and not round_:
                observe(name, "busy")
        if not ready:
            return
        text = reply()
        if round_ and (len(text) == len(self._last) or not text.startswith(self._last)):
            # Nothing new, or the reply's text is not the start of what the check will read (text of
            # other fields follows the content): later rounds would compute what nothing reuses.
            self._next_at = 1 << 62 if len(text) != len(self._last) else self._next_at
            return
        self._last = text
        self.task = asyncio.create_task(self._run(ready, text), name="prefetch")

        def ended(done: asyncio.Task[None]) -> None:
            if done.cancelled():  # before it began, or between steps: each guard not yet counted
                outcome: PrefetchOutcome = "stopped"
            elif done.exception() is not None:  # reading the request again failed (rare: checks read it)
                log.warning("prefetch_failed", exc_info=done.exception())
                outcome = "failed"
            else:
                return
            for name in ready:
                observe(name, outcome)

        self.task.add_done_callback(ended)

    def grew(self, held: Growing) -> None:
        """A held stream read another event: now and then, prefetch the reply so far. Rounds come
        every STREAM_STEP_EVENTS events, spaced out as the reply grows (the work stays linear in it),
        once this request's prefetch is done (until then each new event asks again)."""
        if held.events < self._next_at or not self._guards or (self.task is not None and not self.task.done()):
            return
        self._next_at = max(held.events + STREAM_STEP_EVENTS, held.events * 5 // 4)
        self.start(lambda: replies[0].text if (replies := held.replies()) else "", round_=True)

    def stop(self) -> None:
        """The reply is complete (or the request is over): drop what has not started."""
        self._guards = {}
        if self.task is not None:
            self.task.cancel()

    async def _run(self, guards: dict[str, Prefetching], reply: str) -> None:
        assert self._route is not None and self._chat is not None and self._observe is not None
        route, chat = self._route, self._chat
        if self._turns is None:
            if count_limits(chat)[0] > OFF_LOOP_CHARS:
                self._turns = await asyncio.to_thread(conversation, chat, include_system=route.screen_system)
            else:
                self._turns = conversation(chat, include_system=route.screen_system)
        if len(reply) > OFF_LOOP_CHARS:
            conversations = await asyncio.to_thread(with_reply, self._turns, reply, PLACEHOLDERS)
        else:
            conversations = with_reply(self._turns, reply, PLACEHOLDERS)
        taxonomy, observe = route.taxonomy(), self._observe

        async def one(name: str, guard: Prefetching) -> None:
            try:
                outcome = await guard.prefetch(conversations, taxonomy)
            except GuardError as exc:  # a stopped runner, a text the tokenizer refuses: its check says so
                log.warning("prefetch_failed", guard=name, error=type(exc).__name__)
                outcome = "failed"
            except Exception:  # speculative work never fails a request
                log.warning("prefetch_failed", guard=name, exc_info=True)
                outcome = "failed"
            guards.pop(name)  # counted: a later stop counts only the others
            if outcome == "too_long":
                self._guards.pop(name, None)  # the prompt only grows
            observe(name, outcome)

        await asyncio.gather(*(one(name, guard) for name, guard in list(guards.items())))


def prefetch_output(
    route: RouteSettings, guards: Mapping[str, Guard], request: ChatRequest, observe: Observe
) -> Prefetch:
    """The prefetch of every output guard of `route` that has one, started for the conversation."""
    found: dict[str, Prefetching] = {}
    for name in dict.fromkeys(check.guard for check in route.output):
        if getattr(guards.get(name), "prefetch_state", "off") != "off":
            found[name] = guards[name]  # type: ignore[assignment]
    chat = request.for_choice(0)
    if not found or count_limits(chat)[1]:
        return Prefetch()
    prefetch = Prefetch(found, route, chat, observe)
    prefetch.start()
    return prefetch
