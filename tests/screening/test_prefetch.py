"""When the proxy asks its output guards to prefetch: once for the conversation, then in rounds while a
held stream comes in, spaced out as the reply grows, and never for text a later round would not extend
(a guard that records what it is asked; the model side is tests/guards/test_prefetch.py)."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field

from proxy.guards.guard import PrefetchOutcome, PrefetchState, Taxonomy, Turn
from proxy.policy.models import RouteSettings
from proxy.protocol import ChatRequest
from proxy.screening.collect import Reply
from proxy.screening.prefetch import PLACEHOLDERS, STREAM_STEP_EVENTS, prefetch_output

ROUTE = RouteSettings.model_validate({"name": "chat", "output": [{"guard": "lg"}]})
CHAT = ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "Where is the river?"}]})


@dataclass
class Recording:
    """A guard that records the reply text of each prefetch (the Agent turn before its placeholder)."""

    answer: PrefetchOutcome = "done"
    state: PrefetchState = "ready"
    asked: list[str] = field(default_factory=list)

    @property
    def prefetch_state(self) -> PrefetchState:
        return self.state

    async def prefetch(self, conversations: list[list[Turn]], taxonomy: Taxonomy) -> PrefetchOutcome:
        texts = [turns[-1].text for turns in conversations]
        assert [t[-1] for t in texts] == list(PLACEHOLDERS) and len({t[:-1] for t in texts}) == 1
        self.asked.append(texts[0][:-1])
        return self.answer


@dataclass
class Held:
    """A held stream as the prefetch reads it."""

    text: str = ""
    events: int = 0

    def replies(self) -> list[Reply]:
        return [Reply(0, self.text)]


@dataclass
class HeldWithLogprobs(Held):
    """A choice's text as the output check reads it: the content, then another field's text."""

    other: str = ""

    def replies(self) -> list[Reply]:
        return [Reply(0, f"{self.text}\n{self.other}")]


async def run(guard: Recording, events: list[str], held: Held | None = None) -> list[tuple[str, str]]:
    """The outcomes counted while `events` (each a piece of reply text) come in."""
    counted: list[tuple[str, str]] = []
    prefetch = prefetch_output(ROUTE, {"lg": guard}, CHAT, lambda g, o: counted.append((g, o)))  # type: ignore[dict-item]
    held = held or Held()
    for piece in events:
        if prefetch.task is not None:
            await asyncio.wait([prefetch.task])  # a guard that keeps up with the stream
        held.text, held.events = held.text + piece, held.events + 1
        if isinstance(held, HeldWithLogprobs):
            held.other += piece.upper()
        prefetch.grew(held)
    prefetch.stop()
    if prefetch.task is not None:
        await asyncio.wait([prefetch.task])
    return counted


async def test_rounds_follow_the_reply_and_space_out_as_it_grows() -> None:
    guard = Recording()
    counted = await run(guard, [f"w{k} " for k in range(400)])
    rounds = [len(text.split()) for text in guard.asked]
    assert guard.asked[0] == ""  # the conversation, before any reply
    # A round every STREAM_STEP_EVENTS events while the reply is short, then every quarter of it.
    assert rounds[1:5] == [STREAM_STEP_EVENTS * k for k in (1, 2, 3, 4)]
    assert rounds[-1] > 300 and len(rounds) < 16
    assert all(b - a >= STREAM_STEP_EVENTS for a, b in itertools.pairwise(rounds))
    assert counted == [("lg", "done")] * len(rounds)


async def test_rounds_stop_when_the_text_so_far_is_not_the_start_of_the_reply() -> None:
    """A reply whose text puts another field after the content (logprobs, a refusal) changes its end:
    a prefetch of it would compute keys/values no check reads."""
    guard = Recording()
    await run(guard, [f"w{k} " for k in range(200)], HeldWithLogprobs())
    assert len(guard.asked) == 2  # the conversation and the first round: no later text extends it
    guard = Recording()
    await run(guard, [f"w{k} " for k in range(200)])
    assert len(guard.asked) > 5  # the same stream without the other field


async def test_a_reply_over_the_guards_limit_ends_its_rounds_and_busy_rounds_are_not_counted() -> None:
    guard = Recording(answer="too_long")
    counted = await run(guard, [f"w{k} " for k in range(200)])
    assert counted == [("lg", "too_long")]  # the conversation alone was over the limit: no round follows
    busy = Recording(state="busy")
    counted = await run(busy, [f"w{k} " for k in range(200)])
    assert counted == [("lg", "busy")]  # counted when the request starts, not on every round
    assert busy.asked == []


async def test_no_prefetch_for_a_request_with_images_or_a_route_without_a_prefetching_guard() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    with_image = ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": [image]}]})
    guard = Recording()
    assert prefetch_output(ROUTE, {"lg": guard}, with_image, lambda g, o: None).task is None  # type: ignore[dict-item]
    assert prefetch_output(ROUTE, {"lg": object()}, CHAT, lambda g, o: None).task is None  # type: ignore[dict-item]
