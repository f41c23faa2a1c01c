"""The output-check prefetch through the proxy, with the tiny real Llama Guard: computed while the
upstream answers (the conversation before the reply, then a held stream's reply as it comes), read by
the output check, stopped when the request ends without one, and never started for blocked input."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path

import aiohttp
import openai
import pytest

from proxy.guards.guard import Taxonomy, Turn
from proxy.guards.llama_guard import LlamaGuard
from proxy.guards.prefix_cache import BLOCK_TOKENS
from proxy.screening.prefetch import PLACEHOLDERS, STREAM_STEP_EVENTS
from proxy.server.state import GUARDS, METRICS
from tests.conftest import Proxy
from tests.fakes.upstream import FakeUpstream
from tests.guards.model_fixtures import TinyModels
from tests.guards.test_e2e_models import real_proxy
from tests.streaming.replies import DONE, chunk, delta


async def wait_for(condition: Callable[[], bool]) -> None:
    for _ in range(3000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out waiting")


def prefetches(proxy: Proxy, outcome: str) -> float:
    found = proxy.app[METRICS].registry.get_sample_value(
        "guardrail_prefetch_total", {"guard": "llama_guard", "outcome": outcome}
    )
    return found or 0.0


async def test_output_check_prefix_is_prefetched_while_the_upstream_answers(
    tmp_path: Path, upstream: FakeUpstream, tiny: TinyModels
) -> None:
    """Between the input check and the reply, the output guard computes the output check's prompt up
    to the reply; the output check then reads it from the cache. Blocked input starts none."""
    upstream.release = asyncio.Event()
    async with real_proxy(tmp_path, upstream, tiny) as proxy:
        guard = proxy.app[GUARDS]["llama_guard"]
        assert isinstance(guard, LlamaGuard)
        cache, client = guard.prefix_cache, proxy.client()
        for n, stream in enumerate((False, True), 1):
            before = cache.prefetched_tokens
            sent = asyncio.create_task(
                client.chat.completions.create(
                    model="m",
                    messages=[{"role": "user", "content": f"Where is the quiet river? ({stream})"}],
                    stream=stream,
                )
            )
            await wait_for(lambda: prefetches(proxy, "done") == n)  # noqa: B023 (the upstream holds its reply till then)
            hit = cache.hit_tokens
            upstream.release.set()
            reply = await sent
            upstream.release.clear()
            if stream:
                assert "".join([c.choices[0].delta.content or "" async for c in reply if c.choices])  # type: ignore[union-attr]
            else:
                assert reply.choices[0].message.content  # type: ignore[union-attr]
            # the output check read what was prefetched (all but its last partial block)
            assert cache.hit_tokens - hit >= (cache.prefetched_tokens - before) // BLOCK_TOKENS * BLOCK_TOKENS > 0
        upstream.release.set()
        blocked = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "a bomb?"}])
        assert blocked.choices[0].message.content == "Blocked by policy."
        async with aiohttp.ClientSession() as http, http.get(proxy.url + "/metrics") as resp:
            metrics = await resp.text()
    assert 'guardrail_prefetch_total{guard="llama_guard",outcome="done"} 2.0' in metrics
    counted = [line for line in metrics.splitlines() if line.startswith("guardrail_prefetch_total")]
    assert len(counted) == 1  # the blocked request started none
    assert 'guardrail_prefix_cache_tokens_total{guard="llama_guard",kind="prefetched"}' in metrics


OUTPUT_ONLY = """
routes:
  - name: chat
    match: {path: /v1/chat/completions}
    output:
      - {guard: llama_guard, threshold: 0.5}
"""


async def test_a_prefetch_waiting_when_the_upstream_fails_is_stopped(
    tmp_path: Path, upstream: FakeUpstream, tiny: TinyModels
) -> None:
    upstream.mode = "status"  # a 500, relayed: no output check runs, so only the request's end stops it
    started, release = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        release.wait(30)

    async with real_proxy(tmp_path, upstream, tiny, policy=OUTPUT_ONLY) as proxy:
        guard = proxy.app[GUARDS]["llama_guard"]
        assert isinstance(guard, LlamaGuard)
        busy = asyncio.create_task(guard.runner.call(hold))  # the worker is busy: the prefetch's job waits
        try:
            assert await asyncio.to_thread(started.wait, 30)
            with pytest.raises(openai.InternalServerError):
                await proxy.client().chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "hi"}]
                )
            await wait_for(lambda: prefetches(proxy, "stopped") == 1)
            assert not [t for t in asyncio.all_tasks() if t.get_name() == "prefetch"]
        finally:
            release.set()
            await busy
        await guard.runner.call(lambda: None)
        assert guard.prefix_cache.prefetched_tokens == 0  # its job was dropped before it ran


async def test_a_held_stream_is_prefetched_as_it_comes(
    tmp_path: Path, upstream: FakeUpstream, tiny: TinyModels
) -> None:
    """Every STREAM_STEP_EVENTS of a held stream, the prefetch goes on with the reply so far: the output
    check at the end reads the conversation and most of the reply from the cache."""
    words = [f"word{k} " for k in range(STREAM_STEP_EVENTS + 12)]
    events = [chunk(delta(content=w)) for w in words]
    first = STREAM_STEP_EVENTS + 4  # the role event, then words: a step is in, the next is not
    upstream.mode = "raw"
    upstream.raw_chunks = [chunk(delta(role="assistant", content="")), *events[:first], None, *events[first:]]
    upstream.raw_chunks += [chunk(delta(finish_reason="stop")), DONE]
    upstream.release = asyncio.Event()
    async with real_proxy(tmp_path, upstream, tiny) as proxy:
        guard = proxy.app[GUARDS]["llama_guard"]
        assert isinstance(guard, LlamaGuard)
        cache = guard.prefix_cache
        question = "Where is the quiet river?"
        sent = asyncio.create_task(
            proxy.client().chat.completions.create(
                model="m", messages=[{"role": "user", "content": question}], stream=True
            )
        )
        await wait_for(lambda: prefetches(proxy, "done") == 1)  # the conversation, before any reply
        upstream.release.set()
        await wait_for(lambda: prefetches(proxy, "done") == 2)  # the reply's first words
        hit = cache.hit_tokens
        upstream.gate.set()
        stream = await sent
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "".join(words)
    turns = [Turn("User", question)]

    def known(reply: str) -> int:
        """Tokens of the output check's prompt that a prefetch with `reply` so far computes."""
        return common(*(guard.encode([*turns, Turn("Agent", reply + p)], Taxonomy()) for p in PLACEHOLDERS))

    # the step came with the event that made STREAM_STEP_EVENTS: the role event and the words before
    so_far = known("".join(words[: STREAM_STEP_EVENTS - 1]))
    assert so_far >= known("") + 4 * BLOCK_TOKENS
    assert cache.hit_tokens - hit >= so_far // BLOCK_TOKENS * BLOCK_TOKENS  # the output check read it


def common(*prompts: list[int]) -> int:
    n = min(map(len, prompts))
    return next((i for i in range(n) if len({p[i] for p in prompts}) > 1), n)
