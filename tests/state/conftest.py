"""Fixtures for the response state tests: a real redis-server for the session, a store factory
parametrized over both backends, a clock the tests move by hand, and a server that never answers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from proxy.observability import Metrics
from proxy.settings import StateSettings
from proxy.state import ResponseStore
from proxy.state.memory_store import MemoryStore
from proxy.state.redis_store import RedisStore
from tests.fakes.redis_server import RedisServer, free_port

StoreFactory = Callable[..., ResponseStore]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="session")
async def redis_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RedisServer]:
    server = await RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    await server.stop()


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    """A plain client on the test Redis, emptied before each test."""
    client = Redis.from_url(redis_server.url)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def backend_url(request: pytest.FixtureRequest, backend: str) -> str | None:
    """The Redis URL of the redis backend (its database emptied), None for the in-process one."""
    if backend == "memory":
        return None
    request.getfixturevalue("redis_client")  # flushes the database
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url


@pytest.fixture
async def make_store(backend_url: str | None, metrics: Metrics, clock: Clock) -> AsyncIterator[StoreFactory]:
    """`make_store(**state_settings)`: a store of this test's backend (the default Metrics unless one
    is passed); closed at teardown."""
    made: list[ResponseStore] = []
    url = backend_url

    def factory(*, metrics_to: Metrics | None = None, **overrides: Any) -> ResponseStore:
        settings = StateSettings.model_validate({**({"redis_url": url} if url else {}), **overrides})
        store: ResponseStore
        if url is not None:
            store = RedisStore(settings, metrics_to or metrics, url=url)
        else:
            store = MemoryStore(settings, metrics_to or metrics, clock=clock)
        made.append(store)
        return store

    yield factory
    for store in made:
        await store.close()


@pytest.fixture
async def silent_server() -> AsyncIterator[str]:
    """A TCP server on 127.0.0.1 that accepts and never answers (a hung Redis): its redis:// URL."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"redis://127.0.0.1:{port}/0"
    for writer in held:
        writer.close()
    server.close()
    await server.wait_closed()


@pytest.fixture
def closed_port_url() -> str:
    """Nothing listens here: connections are refused at once."""
    return f"redis://127.0.0.1:{free_port()}/0"


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A redis-server of this test's own, which the test may stop."""
    server = await RedisServer(tmp_path).start()
    yield server
    await server.stop()


def sample(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    return metrics.registry.get_sample_value(name, labels or {}) or 0.0
