"""Prefetch: an output check's prompt up to the reply, computed into the prefix cache before the reply
exists. The check that follows scores exactly as without it and computes only what the prefetch
could not know (the reply, the closing instructions); a prefetch never queues beside real work."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from proxy.guards.guard import Taxonomy, Turn
from proxy.guards.llama_guard import LlamaGuard
from proxy.guards.llama_guard_model import Item, Prompt
from proxy.guards.llama_guard_prefill import Prefill
from proxy.guards.prefix_cache import BLOCK_TOKENS
from proxy.guards.runner import GuardRunner, current_tenant
from proxy.screening.prefetch import PLACEHOLDERS
from tests.guards.test_prefix_cache import CHAT, TAXONOMIES, assert_same, options, pair

LONG = "The quick brown fox jumps over the lazy dog while the garden grows. " * 12


def with_placeholders(turns: list[Turn]) -> list[list[Turn]]:
    return [[*turns, Turn("Agent", text)] for text in PLACEHOLDERS]


def common(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


@pytest.mark.parametrize(
    ("model", "family"),
    [
        ("random3", "llama-guard-3-1b"),
        ("random2", "llama-guard-1"),
        ("random4", "llama-guard-4"),
        ("lg3_graded", "llama-guard-3-1b"),
    ],
)
async def test_output_check_after_prefetch_is_exact_and_computes_only_past_the_conversation(
    models: dict[str, Path], runner: GuardRunner, model: str, family: str
) -> None:
    cached, plain = await pair(models[model], runner, family, **options(model))
    cache = cached.prefix_cache
    outcomes = []
    for taxonomy in TAXONOMIES[:3]:
        for end in (1, 3, 5):  # the conversation up to a user turn; the reply is CHAT[end]
            turns, reply = CHAT[:end], CHAT[end]
            await cached.score_conversation(turns, taxonomy, categories_from=0.6)  # the input check
            before = cache.prefetched_tokens
            outcomes.append(await cached.prefetch(with_placeholders(turns), taxonomy))
            # cached: an earlier output check had it all (Llama Guard 1 has no S1/S4 to exclude)
            assert (outcomes[-1], cache.prefetched_tokens > before) in {("done", True), ("cached", False)}
            ids = cached.encode([*turns, reply], taxonomy)
            shared = common(ids, cached.encode(with_placeholders(turns)[0], taxonomy))
            # the guess holds for a real reply: the prompt up to the reply's first word was prefetched
            assert shared > len(cached.encode(turns, taxonomy)) - 70
            hit, computed = cache.hit_tokens, cache.computed_tokens
            a = await cached.score_conversation([*turns, reply], taxonomy, categories_from=0.6)
            assert_same(a, await plain.score_conversation([*turns, reply], taxonomy, categories_from=0.6))
            assert cache.hit_tokens - hit >= shared // BLOCK_TOKENS * BLOCK_TOKENS
            assert cache.computed_tokens - computed == len(ids) - (cache.hit_tokens - hit)
            assert await cached.prefetch(with_placeholders(turns), taxonomy) == "cached"
    assert outcomes.count("done") >= 6


async def test_long_prefetch_runs_in_steps_that_each_feed_the_cache(models: dict[str, Path]) -> None:
    runner = GuardRunner("cpu", max_wait_ms=0)
    try:
        cached, plain = await pair(models["random3"], runner, "llama-guard-3-1b", step_tokens=64, **options("random3"))
        turns = [Turn("User", "Tell me a story. " + LONG), Turn("Agent", "Once. " + LONG), Turn("User", "More?")]
        before = runner.batches_run
        assert await cached.prefetch(with_placeholders(turns), Taxonomy()) == "done"
        assert runner.batches_run - before > 4  # one encoding job, then steps of 64 tokens
        reply = Turn("Agent", "Then the fox slept.")
        a = await cached.score_conversation([*turns, reply], Taxonomy())
        assert_same(a, await plain.score_conversation([*turns, reply], Taxonomy()))
        assert cached.prefix_cache.computed_tokens < 100  # the reply and the closing instructions

        # Each step's blocks join the cache at once (a check that comes before the last step reads them).
        model = cached._model
        assert model is not None
        other = [Item(tuple(turns), Taxonomy(), 1.0) for turns in with_placeholders([Turn("User", "More. " + LONG)])]
        planned = await runner.call(lambda: model.plan_prefetch(other))
        assert isinstance(planned, Prompt) and len(planned.ids) > 3 * 64
        state = Prefill(planned, prefetch=True)
        held = cached.prefix_cache.peek(None, planned.ids, scored=False)  # the header, from before
        assert not await runner.call(lambda: model.prefetch_step(state))  # one step of several
        assert cached.prefix_cache.peek(None, planned.ids, scored=False) == held + 64
    finally:
        await runner.stop()


async def test_prefetch_is_per_tenant(models: dict[str, Path], runner: GuardRunner) -> None:
    guard, _ = await pair(models["random3"], runner, "llama-guard-3-1b", **options("random3"))
    turns, reply = CHAT[:1], CHAT[1]
    token = current_tenant.set("tenant-a")
    try:
        assert await guard.prefetch(with_placeholders(turns), Taxonomy()) == "done"
    finally:
        current_tenant.reset(token)
    token = current_tenant.set("tenant-b")
    try:
        await guard.score_conversation([*turns, reply], Taxonomy())
    finally:
        current_tenant.reset(token)
    assert guard.prefix_cache.hit_tokens == 0  # tenant b computed every token itself
    token = current_tenant.set("tenant-a")
    try:
        await guard.score_conversation([*turns, reply], Taxonomy())
    finally:
        current_tenant.reset(token)
    assert guard.prefix_cache.hit_tokens > 100  # tenant a read its own prefetch


async def test_prefetch_gives_way_to_checks_and_stops_before_it_starts(models: dict[str, Path]) -> None:
    runner = GuardRunner("cpu", max_wait_ms=0)
    started, release = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        release.wait(30)

    async def holding() -> asyncio.Task[None]:
        """The worker busy with a job of its own, until `release`."""
        started.clear()
        release.clear()
        task = asyncio.create_task(runner.call(hold))
        assert await asyncio.to_thread(started.wait, 30)
        return task

    async def queued(depth: int) -> None:
        for _ in range(3000):
            if runner.queue_depth == depth:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"queue depth {runner.queue_depth}, not {depth}")

    try:
        guard, _ = await pair(models["random3"], runner, "llama-guard-3-1b", **options("random3"))
        conversations = with_placeholders(CHAT[:1])
        busy = await holding()
        waiting = asyncio.create_task(runner.call(lambda: None))  # a check waits behind it
        await queued(1)
        assert guard.prefetch_state == "busy"
        assert await guard.prefetch(conversations, Taxonomy()) == "busy"
        assert runner.queue_depth == 1  # it queued nothing
        release.set()
        await asyncio.gather(busy, waiting)

        busy = await holding()
        prefetch = asyncio.create_task(guard.prefetch(conversations, Taxonomy()))
        await queued(1)  # its first job waits: the worker is busy
        assert guard.prefetch_state == "busy"  # one at a time
        seen: list[int] = []
        check = asyncio.create_task(runner.call(lambda: seen.append(guard.prefix_cache.prefetched_tokens)))
        await queued(2)
        release.set()  # the check goes first, though the prefetch queued before it
        await asyncio.gather(busy, check)
        assert seen == [0]
        assert await prefetch == "done"

        busy = await holding()
        prefetch = asyncio.create_task(guard.prefetch(with_placeholders(CHAT[:3]), Taxonomy()))
        await queued(1)
        prefetch.cancel()  # the reply came first
        await queued(0)
        release.set()
        await busy
        with pytest.raises(asyncio.CancelledError):
            await prefetch
        before = guard.prefix_cache.prefetched_tokens
        await runner.call(lambda: None)
        assert guard.prefix_cache.prefetched_tokens == before  # the dropped job never ran
        assert str(guard.prefetch_state) == "ready"  # mypy narrowed it to "busy" above
    finally:
        release.set()
        await runner.stop()


async def test_prefetch_is_off_without_the_cache_or_when_disabled(models: dict[str, Path], runner: GuardRunner) -> None:
    conversations = with_placeholders(CHAT[:1])
    for settings in ({"prefix_cache_mb": 0}, {"prefetch": False}):
        guard: LlamaGuard
        guard, _ = await pair(models["random3"], runner, "llama-guard-3-1b", **settings, **options("random3"))
        assert await guard.prefetch(conversations, Taxonomy()) == "off"
        assert guard.prefix_cache.prefetched_tokens == 0
