"""The guard runner: micro-batching, cancellation, a bounded queue, and an event loop that never
stalls while a batch runs in the worker thread."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from proxy.guards.guard import GuardOverloaded, ScreenText
from proxy.guards.prompt_guard import PromptGuard
from proxy.guards.runner import GuardRunner

FILLER = "The quick brown fox jumps over the lazy dog while the garden grows. " * 20


async def test_concurrent_requests_are_batched() -> None:
    runner = GuardRunner("cpu", max_batch=8, max_wait_ms=50)
    sizes: list[int] = []

    def fn(items: list[int]) -> list[int]:
        sizes.append(len(items))
        return [i * 2 for i in items]

    try:
        results = await asyncio.gather(*(runner.submit(fn, [i]) for i in range(8)))
    finally:
        await runner.stop()
    assert [r[0] for r in results] == [i * 2 for i in range(8)]
    assert sizes == [8]


async def test_cancelled_work_is_dropped_before_it_runs() -> None:
    runner = GuardRunner("cpu", max_batch=1, max_wait_ms=0)
    gate = threading.Event()
    ran: list[int] = []

    def blocker(items: list[int]) -> list[int]:
        gate.wait(5)
        return items

    def record(items: list[int]) -> list[int]:
        ran.extend(items)
        return items

    try:
        first = asyncio.create_task(runner.submit(blocker, [0]))
        await asyncio.sleep(0.05)
        doomed = asyncio.create_task(runner.submit(record, [1]))
        kept = asyncio.create_task(runner.submit(record, [2]))
        await asyncio.sleep(0.05)
        doomed.cancel()
        gate.set()
        assert await first == [0]
        assert await kept == [2]
    finally:
        await runner.stop()
    assert ran == [2]


async def test_full_queue_is_overloaded() -> None:
    runner = GuardRunner("cpu", max_batch=1, max_wait_ms=0, max_queue=2)
    gate = threading.Event()

    def blocker(items: list[int]) -> list[int]:
        gate.wait(5)
        return items

    try:
        tasks = [asyncio.create_task(runner.submit(blocker, [i])) for i in range(3)]
        await asyncio.sleep(0.05)
        with pytest.raises(GuardOverloaded):
            await runner.submit(blocker, [9])
        gate.set()
        await asyncio.gather(*tasks)
    finally:
        await runner.stop()


async def test_event_loop_keeps_ticking_during_inference(pg2: PromptGuard) -> None:
    """A 10 ms ticker runs while a batch of long texts is scored; the largest gap stays small."""
    gaps: list[float] = []
    done = asyncio.Event()

    async def tick() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    start = time.perf_counter()
    await asyncio.gather(*(pg2.score_texts([ScreenText(FILLER + str(i))]) for i in range(8)))
    busy = time.perf_counter() - start
    done.set()
    await ticker
    assert busy > 0.05, "the batch was too short to show anything"
    # Inference on the loop would stall it for the whole batch (seconds); scheduling noise stays far below.
    assert max(gaps) < 0.25, (
        f"largest event-loop gap {max(gaps) * 1000:.1f} ms during {busy * 1000:.0f} ms of inference"
    )
