"""The proxy's response state over its lifecycle: in process by default, in Redis when `state.redis_url`
is set (shared by two proxies, its connections closed at shutdown), and on /metrics."""

from __future__ import annotations

import aiohttp
import pytest
from pydantic import ValidationError
from redis.asyncio import Redis

from proxy.guards.guard import Turn
from proxy.server.state import RESPONSE_STATE
from proxy.settings import StateSettings
from proxy.state.memory_store import MemoryStore
from proxy.state.redis_store import CLIENT_NAME, RedisStore
from tests.conftest import ProxyFactory
from tests.fakes.redis_server import RedisServer

TURNS = [Turn("User", "hello"), Turn("Agent", "hi there")]


async def proxy_clients(redis_client: Redis) -> list[str]:
    clients = await redis_client.client_list()
    return [c["name"] for c in clients if c.get("name") == CLIENT_NAME]


async def test_the_default_store_is_in_process_and_on_metrics(start_proxy: ProxyFactory) -> None:
    async with start_proxy() as proxy:
        store = proxy.app[RESPONSE_STATE]
        assert isinstance(store, MemoryStore)
        await store.put("default", "resp_1", TURNS)
        assert await store.get("default", "resp_1") == TURNS
        assert await store.get("default", "resp_2") is None
        async with aiohttp.ClientSession() as http, http.get(proxy.url + "/metrics") as resp:
            text = await resp.text()
    assert "guardrail_response_state_entries 1.0" in text
    assert 'guardrail_response_state_lookups_total{result="hit"} 1.0' in text
    assert 'guardrail_response_state_lookups_total{result="miss"} 1.0' in text


async def test_proxies_with_one_redis_url_share_state_and_close_their_connections(
    start_proxy: ProxyFactory, redis_server: RedisServer, redis_client: Redis
) -> None:
    state = {"redis_url": redis_server.url}
    async with start_proxy(state=state) as one:
        async with start_proxy(state=state) as two:
            assert isinstance(one.app[RESPONSE_STATE], RedisStore)
            await one.app[RESPONSE_STATE].put("default", "resp_1", TURNS)
            assert await two.app[RESPONSE_STATE].get("default", "resp_1") == TURNS
            assert len(await proxy_clients(redis_client)) == 2
        assert len(await proxy_clients(redis_client)) == 1
    assert await proxy_clients(redis_client) == []


async def test_the_redis_url_may_come_from_the_environment(
    start_proxy: ProxyFactory, redis_server: RedisServer, redis_client: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_STATE_REDIS_URL", redis_server.url)
    async with start_proxy(state={"redis_url": "env:TEST_STATE_REDIS_URL"}) as proxy:
        await proxy.app[RESPONSE_STATE].put("default", "resp_1", TURNS)
        assert await redis_client.dbsize() == 1


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"max_entry_bytes": 4096, "max_bytes": 2048}, "max_entry_bytes must not exceed max_bytes"),
        ({"redis_url": "http://cache:6379"}, "redis_url must start with"),
        ({"ttl_s": 0}, "greater than or equal to 1"),
        ({"redis_ttl": 5}, "Extra inputs are not permitted"),
    ],
)
def test_state_settings_refuse_what_cannot_work(state: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        StateSettings.model_validate(state)
