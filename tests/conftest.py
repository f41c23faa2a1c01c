"""Shared fixtures: the fake upstream, a proxy built with build_app on 127.0.0.1, the official
openai client pointed at it, and a check that fails any async test that blocks the event loop."""

from __future__ import annotations

import os

# Tests never reach the Hugging Face hub: every model they load is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import asyncio
import gc
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web

from proxy.app import build_app
from proxy.guards.guard import Guard
from proxy.guards.runner import GuardRunner
from proxy.observability import setup_logging
from proxy.server.connections import start_server
from proxy.settings import Settings
from tests.fakes.guards import ScriptedConversationGuard, ScriptedTextGuard
from tests.fakes.upstream import FakeUpstream
from tests.guards.model_fixtures import TinyModels, build_all

MAX_LOOP_GAP_S = 0.5

setup_logging("info")


def _preload_sdk() -> None:
    """The SDK imports its resource modules on first use; do it now, not inside a timed test."""
    client = openai.AsyncOpenAI(api_key="preload", base_url="http://127.0.0.1:9/v1")
    resources = (client.chat.completions, client.models, client.embeddings, client.completions, client.moderations)
    for resource in (*resources, client.responses):
        assert resource is not None


_preload_sdk()


@pytest.fixture(autouse=True)
def _info_logging() -> None:
    """Commands under test (demo) may quiet logging; every test starts from the serving default."""
    setup_logging("info")


@pytest.fixture(autouse=True)
async def _loop_not_blocked(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """A 10 ms ticker runs beside every test; a gap over MAX_LOOP_GAP_S means something blocked."""
    if not asyncio.iscoroutinefunction(getattr(request.node, "obj", None)):
        yield
        return
    # What earlier tests left (models, hypothesis data) is frozen out of the collector: late in the
    # session a full collection of it takes 0.6-0.8 s, a pause of the test process, not of the code.
    gc.collect()
    gc.freeze()
    gaps: list[float] = []

    async def tick() -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(tick())
    yield
    task.cancel()
    worst = max(gaps, default=0.0)
    assert worst < MAX_LOOP_GAP_S, f"the event loop was blocked for {worst * 1000:.0f} ms"


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    """The tiny deterministic guard models, built once per session (see tests/guards/model_fixtures.py)."""
    return build_all(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
async def runner() -> AsyncIterator[GuardRunner]:
    r = GuardRunner("cpu", max_batch=16, max_wait_ms=2.0, max_queue=64)
    yield r
    await r.stop()


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    fake = await FakeUpstream().start()
    yield fake
    await fake.stop()


DEFAULT_POLICY = """
route_defaults:
  refusal: "Blocked by policy."
routes:
  - name: chat
    match: {path: /v1/chat/completions, model: "*"}
    input:
      - {guard: prompt_guard, threshold: 0.9}
      - {guard: llama_guard, threshold: 0.5}
    output:
      - {guard: llama_guard, threshold: 0.5}
  - name: embeddings
    match: {path: /v1/embeddings}
    passthrough: true
"""


def write_policies(directory: Path, policies: Mapping[str, str]) -> None:
    for name, text in policies.items():
        (directory / f"{name}.yaml").write_text(textwrap.dedent(text))


@dataclass
class Proxy:
    url: str
    app: web.Application
    upstream: FakeUpstream
    guards: dict[str, Guard]
    policies_dir: Path
    clients: list[openai.AsyncOpenAI] = field(default_factory=list)

    def client(self, key: str = "sk-test", **kw: Any) -> openai.AsyncOpenAI:
        client = openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kw)
        self.clients.append(client)
        return client


@asynccontextmanager
async def running_proxy(
    settings: Settings, guards: Mapping[str, Guard], upstream: FakeUpstream
) -> AsyncIterator[Proxy]:
    app = build_app(settings, guards=guards)
    runner, site = await start_server(app, "127.0.0.1", 0)  # the server `serve` runs (connection limits)
    proxy = Proxy(f"http://127.0.0.1:{site.port}", app, upstream, dict(guards), settings.policies_dir)
    try:
        yield proxy
    finally:
        for client in proxy.clients:
            await client.close()
        await runner.cleanup()


def make_settings(tmp_path: Path, upstream: FakeUpstream, **overrides: Any) -> Settings:
    data: dict[str, Any] = {
        "server": {"keepalive_interval_s": 5.0, "policy_reload_interval_s": 0.05},
        "upstreams": {
            "default": {
                "base_url": upstream.url,
                "api_key": "sk-upstream-secret",
                "read_timeout_s": 2.0,
                "total_timeout_s": 10.0,
            }
        },
        "policies_dir": str(tmp_path),
    }
    return Settings.model_validate(_merge(data, overrides))


def _merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        return {**base, **{k: _merge(base.get(k), v) for k, v in over.items()}}
    return over


ProxyFactory = Callable[..., Any]


@pytest.fixture
def start_proxy(tmp_path: Path, upstream: FakeUpstream) -> Callable[..., Any]:
    """`async with start_proxy(policies={...}, guards={...}, **settings) as proxy:`"""

    def factory(
        *, policies: Mapping[str, str] | None = None, guards: Mapping[str, Guard] | None = None, **overrides: Any
    ) -> Any:
        write_policies(tmp_path, policies or {"default": DEFAULT_POLICY})
        settings = make_settings(tmp_path, upstream, **overrides)
        guard_set: Mapping[str, Guard] = (
            guards
            if guards is not None
            else {"prompt_guard": ScriptedTextGuard(), "llama_guard": ScriptedConversationGuard()}
        )
        return running_proxy(settings, guard_set, upstream)

    return factory
