"""Prefetch: while the upstream writes its reply, each output Llama Guard computes the start of the
prompt its output check will read (the policy header for the Agent role and the conversation up to
the reply) into its prefix cache, so the check that follows the reply computes only the reply and
the closing instructions.

Speculative and harmless. The prefix cache matches exact token ids, so a wrong guess costs only its
compute, never a score: the guard takes the longest common token prefix of the prompts of the
conversation with a few placeholder replies (so tokenization at the reply's start cannot differ).
It runs only when the guard's runner has nothing queued, as `bulk` steps that yield to checks, one
per output guard per request, and it stops when the reply arrives or the request ends (a step
already running in the runner finishes, and the keys/values it computed are kept).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Protocol

import structlog

from proxy.guards.guard import Guard, Taxonomy, Turn
from proxy.policy.models import RouteSettings
from proxy.protocol import ChatRequest
from proxy.screening.collect import conversation_with_reply, count_limits
from proxy.screening.pipeline import OFF_LOOP_CHARS

log = structlog.get_logger("proxy.screening")

PLACEHOLDERS = ("a", "1", "-")
"""Replies that start with a letter, a digit and a sign: tokenizers split before each differently."""


class Prefetching(Protocol):
    @property
    def prefetch_state(self) -> str:
        """ready, busy or off: a cheap test, before the request is read again."""
        ...

    async def prefetch(self, conversations: list[list[Turn]], taxonomy: Taxonomy) -> str:
        """Compute what the prompts of `conversations` share into the cache; the outcome's name."""
        ...


class Observe(Protocol):
    """Told each prefetch's outcome (done, cached, busy, off, stopped, failed)."""

    def __call__(self, guard: str, outcome: str) -> None: ...


class Prefetch:
    """The prefetch tasks of one request."""

    def __init__(self, tasks: list[asyncio.Task[None]]) -> None:
        self.tasks = tasks

    def stop(self) -> None:
        """The reply is here (or the request is over): drop what has not started."""
        for task in self.tasks:
            task.cancel()


def prefetch_output(
    route: RouteSettings, guards: Mapping[str, Guard], request: ChatRequest, observe: Observe | None = None
) -> Prefetch:
    """Start the prefetch of every output guard of `route` that would run one now (a task each); a
    busy guard is counted and skipped, one without prefetch skipped."""
    wanted: dict[str, Prefetching] = {}
    for name in dict.fromkeys(check.guard for check in route.output):
        guard = guards.get(name)
        state = getattr(guard, "prefetch_state", "off")
        if state == "ready":
            wanted[name] = guard  # type: ignore[assignment]
        elif state != "off" and observe is not None:
            observe(name, state)
    tasks = [
        asyncio.create_task(_run(name, guard, route, request, observe), name=f"prefetch-{name}")
        for name, guard in wanted.items()
    ]
    return Prefetch(tasks)


async def _run(
    name: str, guard: Prefetching, route: RouteSettings, request: ChatRequest, observe: Observe | None
) -> None:
    outcome = "failed"
    try:
        chat = request.for_choice(0)
        if count_limits(chat)[0] > OFF_LOOP_CHARS:
            conversations = await asyncio.to_thread(_conversations, chat, route.screen_system)
        else:
            conversations = _conversations(chat, route.screen_system)
        outcome = await guard.prefetch(conversations, route.taxonomy()) if conversations[0] else "off"
    except asyncio.CancelledError:
        outcome = "stopped"
        raise
    except Exception as exc:  # speculative work never fails a request; the check will say what is wrong
        log.debug("prefetch_failed", guard=name, error=type(exc).__name__)
    finally:
        if observe is not None:
            observe(name, outcome)


def _conversations(chat: ChatRequest, include_system: bool) -> list[list[Turn]]:
    return conversation_with_reply(chat, PLACEHOLDERS, include_system=include_system)
