"""The in-process store's own bounds: TTL (on a clock the test moves), LRU entry count, byte total,
and the entries/bytes gauges."""

from __future__ import annotations

from proxy.guards.guard import Turn
from proxy.observability import Metrics
from proxy.settings import StateSettings
from proxy.state.memory_store import MemoryStore
from tests.state.conftest import Clock, sample


def turns(text: str) -> list[Turn]:
    return [Turn("User", text), Turn("Agent", "ok")]


def store_with(metrics: Metrics, clock: Clock, **settings: int) -> MemoryStore:
    return MemoryStore(StateSettings.model_validate(settings), metrics, clock=clock)


async def test_an_entry_expires_ttl_s_after_its_last_put(metrics: Metrics, clock: Clock) -> None:
    store = store_with(metrics, clock, ttl_s=60)
    await store.put("acme", "resp_1", turns("hello"))
    clock.advance(59)
    assert await store.get("acme", "resp_1") == turns("hello")  # a read does not extend it
    clock.advance(1)
    assert await store.get("acme", "resp_1") is None
    assert sample(metrics, "guardrail_response_state_evictions_total", {"reason": "ttl"}) == 1
    await store.put("acme", "conv_1", turns("one"), previous="conv_1")
    clock.advance(50)
    await store.put("acme", "conv_1", turns("two"), previous="conv_1")
    clock.advance(50)
    assert await store.get("acme", "conv_1") == [*turns("one"), *turns("two")]


async def test_an_expired_previous_is_not_chained(metrics: Metrics, clock: Clock) -> None:
    store = store_with(metrics, clock, ttl_s=60)
    await store.put("acme", "resp_1", turns("old"))
    clock.advance(61)
    await store.put("acme", "resp_2", turns("new"), previous="resp_1")
    assert await store.get("acme", "resp_2") == turns("new")


async def test_expired_entries_leave_on_the_next_put_unread(metrics: Metrics, clock: Clock) -> None:
    store = store_with(metrics, clock, ttl_s=60)
    for i in range(5):
        await store.put("acme", f"resp_{i}", turns("hello"))
    clock.advance(61)
    await store.put("acme", "resp_new", turns("hello"))
    assert len(store) == 1
    assert sample(metrics, "guardrail_response_state_entries") == 1
    assert sample(metrics, "guardrail_response_state_evictions_total", {"reason": "ttl"}) == 5


async def test_the_least_recently_used_entry_leaves_past_max_entries(metrics: Metrics, clock: Clock) -> None:
    store = store_with(metrics, clock, max_entries=2)
    await store.put("acme", "resp_1", turns("one"))
    await store.put("acme", "resp_2", turns("two"))
    assert await store.get("acme", "resp_1") is not None  # resp_2 is now the least recently used
    await store.put("acme", "resp_3", turns("three"))
    assert await store.get("acme", "resp_2") is None
    assert await store.get("acme", "resp_1") is not None
    assert await store.get("acme", "resp_3") is not None
    assert sample(metrics, "guardrail_response_state_evictions_total", {"reason": "lru"}) == 1


async def test_entries_leave_past_max_bytes_and_the_gauges_follow(metrics: Metrics, clock: Clock) -> None:
    store = store_with(metrics, clock, max_bytes=1024, max_entry_bytes=512)
    await store.put("acme", "resp_1", turns("a" * 400))
    one = store.bytes_held
    assert sample(metrics, "guardrail_response_state_bytes") == one
    await store.put("acme", "resp_2", turns("b" * 400))
    assert store.bytes_held == 2 * one
    await store.put("acme", "resp_3", turns("c" * 400))
    assert store.bytes_held <= 1024
    assert await store.get("acme", "resp_1") is None
    assert await store.get("acme", "resp_3") is not None
    assert sample(metrics, "guardrail_response_state_evictions_total", {"reason": "bytes"}) == 1
    assert sample(metrics, "guardrail_response_state_entries") == 2
    assert sample(metrics, "guardrail_response_state_bytes") == store.bytes_held


async def test_a_rewritten_entry_is_counted_once(metrics: Metrics, clock: Clock) -> None:
    store = store_with(metrics, clock)
    await store.put("acme", "resp_1", turns("hello"))
    once = store.bytes_held
    await store.put("acme", "resp_1", turns("hello"))
    assert (len(store), store.bytes_held) == (1, once)
    await store.close()
    assert (len(store), store.bytes_held) == (0, 0)


async def test_an_owner_expires_and_leaves_with_the_entries(metrics: Metrics, clock: Clock) -> None:
    store = store_with(metrics, clock, ttl_s=60, max_entries=2)
    await store.put_owner("resp_1", "acme")
    clock.advance(59)
    assert await store.get_owner("resp_1") == "acme"
    clock.advance(1)
    assert await store.get_owner("resp_1") is None
    await store.put_owner("resp_2", "acme")
    await store.put("acme", "resp_3", turns("a"))
    await store.put("acme", "resp_4", turns("b"))  # past max_entries: the oldest, an owner, leaves
    assert await store.get_owner("resp_2") is None
    assert len(store) == 2
