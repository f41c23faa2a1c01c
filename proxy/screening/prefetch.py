"""Prefetch: while the upstream writes its reply, each output Llama Guard computes the start of the
prompt its output check will read (the policy header for the Agent role and the conversation up to
the reply) into its prefix cache, so the check that follows the reply computes only the reply and
the closing instructions.

Speculative and harmless. The prefix cache matches exact token ids, so a wrong guess costs only its
compute, never a score: the guard takes the longest common token prefix of the prompts of the
conversation with a few placeholder replies (so tokenization at the reply's start cannot differ).
It runs as idle runner jobs (only when no check waits; it gives way to the first one that does,
keeping what its steps computed), one at a time per guard, and it stops when the reply arrives or
the request ends. Requests with images are not prefetched (reading them again costs the loop).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Protocol

import structlog

from proxy.guards.guard import Guard, PrefetchOutcome, PrefetchState, Taxonomy, Turn
from proxy.policy.models import RouteSettings
from proxy.protocol import ChatRequest
from proxy.screening.collect import conversation_with_reply, count_limits
from proxy.screening.pipeline import OFF_LOOP_CHARS

log = structlog.get_logger("proxy.screening")

PLACEHOLDERS = ("a", "1", "-")
"""Replies that start with a letter, a digit and a sign: tokenizers split before each differently."""


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


class Prefetch:
    """The prefetch of one request (no task: nothing to prefetch)."""

    def __init__(self, task: asyncio.Task[None] | None = None) -> None:
        self.task = task

    def stop(self) -> None:
        """The reply is here (or the request is over): drop what has not started."""
        if self.task is not None:
            self.task.cancel()


def prefetch_output(
    route: RouteSettings, guards: Mapping[str, Guard], request: ChatRequest, observe: Observe
) -> Prefetch:
    """Start the prefetch of every output guard of `route` that would run one now; a busy guard is
    counted and skipped, one without prefetch skipped."""
    ready: dict[str, Prefetching] = {}
    for name in dict.fromkeys(check.guard for check in route.output):
        state = getattr(guards.get(name), "prefetch_state", "off")
        if state == "ready":
            ready[name] = guards[name]  # type: ignore[assignment]
        elif state == "busy":
            observe(name, "busy")
    if not ready:
        return Prefetch()
    chat = request.for_choice(0)
    chars, images = count_limits(chat)
    if images:
        return Prefetch()
    task = asyncio.create_task(_run(ready, route, chat, chars > OFF_LOOP_CHARS, observe), name="prefetch")

    def stopped(done: asyncio.Task[None]) -> None:
        if done.cancelled():  # before it began, or between steps: each guard not yet counted
            for name in ready:
                observe(name, "stopped")

    task.add_done_callback(stopped)
    return Prefetch(task)


async def _run(
    guards: dict[str, Prefetching], route: RouteSettings, chat: ChatRequest, large: bool, observe: Observe
) -> None:
    system = route.screen_system
    if large:
        conversations = await asyncio.to_thread(conversation_with_reply, chat, PLACEHOLDERS, include_system=system)
    else:
        conversations = conversation_with_reply(chat, PLACEHOLDERS, include_system=system)
    if not conversations[0]:
        return
    taxonomy = route.taxonomy()

    async def one(name: str, guard: Prefetching) -> None:
        try:
            outcome = await guard.prefetch(conversations, taxonomy)
        except Exception:  # speculative work never fails a request; its check will say what is wrong
            log.warning("prefetch_failed", guard=name, exc_info=True)
            outcome = "failed"
        guards.pop(name)  # counted: a later stop counts only the others
        observe(name, outcome)

    await asyncio.gather(*(one(name, guard) for name, guard in list(guards.items())))
