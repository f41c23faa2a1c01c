"""The Redis store against a real redis-server: replicas share entries, the TTL is Redis's own, values
are JSON, and a Redis that is down, stopped or hung makes a lookup answer unknown within the timeout."""

from __future__ import annotations

import asyncio
import json

import pytest
from redis.asyncio import Redis

from proxy.guards.guard import Turn
from proxy.observability import Metrics
from proxy.settings import StateSettings
from proxy.state.redis_store import RedisStore
from tests.fakes.redis_server import RedisServer
from tests.state.conftest import sample

TURNS = [Turn("User", "hello"), Turn("Agent", "hi there")]
BOUND_S = 10.0
"""A hang would end only at the test timeout; this says what hung. Far above any timeout used here."""


def redis_store(url: str, metrics: Metrics | None = None, **settings: object) -> RedisStore:
    state = StateSettings.model_validate({"redis_url": url, **settings})
    return RedisStore(state, metrics or Metrics(), url=url)


async def test_two_replicas_sharing_one_redis_see_each_others_entries(
    redis_server: RedisServer, redis_client: Redis
) -> None:
    one, two = redis_store(redis_server.url), redis_store(redis_server.url)
    try:
        await one.put("acme", "resp_1", TURNS)
        assert await two.get("acme", "resp_1") == TURNS
        await two.put("acme", "resp_2", [Turn("User", "more")], previous="resp_1")
        assert await one.get("acme", "resp_2") == [*TURNS, Turn("User", "more")]
    finally:
        await one.close()
        await two.close()


async def test_the_value_is_json_under_a_hashed_key_with_the_ttl(
    redis_server: RedisServer, redis_client: Redis
) -> None:
    store = redis_store(redis_server.url, ttl_s=600)
    try:
        await store.put("acme", "resp_1", TURNS)
        keys = await redis_client.keys("*")
        assert keys == [store.key("acme", "resp_1").encode()]
        assert b"acme" not in keys[0]
        assert b"resp_1" not in keys[0]
        value = await redis_client.get(keys[0])
        assert isinstance(value, bytes)
        assert json.loads(value) == {
            "v": 1,
            "turns": [{"speaker": "User", "text": "hello"}, {"speaker": "Agent", "text": "hi there"}],
        }
        assert 590 <= await redis_client.ttl(keys[0]) <= 600
        await redis_client.expire(keys[0], 5)
        await store.put("acme", "resp_1", TURNS)  # a new write starts the TTL again
        assert await redis_client.ttl(keys[0]) > 5
        await redis_client.delete(keys[0])  # as Redis does when the TTL runs out
        assert await store.get("acme", "resp_1") is None
    finally:
        await store.close()


async def test_replicas_share_owners_under_a_hashed_key_with_the_ttl(
    redis_server: RedisServer, redis_client: Redis
) -> None:
    one, two = redis_store(redis_server.url, ttl_s=600), redis_store(redis_server.url)
    try:
        await one.put_owner("resp_1", "acme")
        assert await two.get_owner("resp_1") == "acme"
        keys = await redis_client.keys("*")
        assert keys == [one.key(None, "resp_1").encode()]
        assert b"resp_1" not in keys[0]
        assert 590 <= await redis_client.ttl(keys[0]) <= 600
        await redis_client.set(keys[0], b"\xff")  # not a name: unknown
        assert await two.get_owner("resp_1") is None
    finally:
        await one.close()
        await two.close()


@pytest.mark.parametrize(
    "value",
    [b"\x80\x03pickle", b"[]", b'{"v": 2, "turns": []}', b'{"v": 1, "turns": [{"speaker": "System", "text": "x"}]}'],
)
async def test_a_value_that_is_not_an_entry_answers_unknown(
    redis_server: RedisServer, redis_client: Redis, value: bytes
) -> None:
    metrics = Metrics()
    store = redis_store(redis_server.url, metrics)
    try:
        await redis_client.set(store.key("acme", "resp_1"), value)
        assert await store.get("acme", "resp_1") is None
        assert sample(metrics, "guardrail_response_state_errors_total", {"op": "get"}) == 1
    finally:
        await store.close()


async def test_a_refused_connection_answers_unknown_and_counts_errors(closed_port_url: str) -> None:
    metrics = Metrics()
    store = redis_store(closed_port_url, metrics, redis_timeout_s=0.5)
    try:
        async with asyncio.timeout(BOUND_S):
            assert await store.get("acme", "resp_1") is None
            await store.put("acme", "resp_2", TURNS, previous="resp_1")
            await store.put_owner("resp_2", "acme")
            assert await store.get_owner("resp_2") is None
        assert sample(metrics, "guardrail_response_state_errors_total", {"op": "get"}) == 1
        assert sample(metrics, "guardrail_response_state_errors_total", {"op": "put"}) == 1
        for op in ("put_owner", "get_owner"):
            assert sample(metrics, "guardrail_response_state_errors_total", {"op": op}) == 1
        assert sample(metrics, "guardrail_response_state_lookups_total", {"result": "miss"}) == 0
    finally:
        await store.close()


async def test_a_hung_redis_answers_unknown_after_the_timeout(silent_server: str) -> None:
    metrics = Metrics()
    store = redis_store(silent_server, metrics, redis_timeout_s=0.2)
    try:
        async with asyncio.timeout(BOUND_S):
            assert await store.get("acme", "resp_1") is None
            await store.put("acme", "resp_1", TURNS)
        assert sample(metrics, "guardrail_response_state_errors_total", {"op": "get"}) == 1
        assert sample(metrics, "guardrail_response_state_errors_total", {"op": "put"}) == 1
    finally:
        await store.close()


async def test_a_stopped_redis_answers_unknown(own_redis: RedisServer) -> None:
    metrics = Metrics()
    store = redis_store(own_redis.url, metrics, redis_timeout_s=0.5)
    try:
        await store.put("acme", "resp_1", TURNS)
        assert await store.get("acme", "resp_1") == TURNS
        await own_redis.stop()
        async with asyncio.timeout(BOUND_S):
            assert await store.get("acme", "resp_1") is None
        assert sample(metrics, "guardrail_response_state_errors_total", {"op": "get"}) == 1
    finally:
        await store.close()
