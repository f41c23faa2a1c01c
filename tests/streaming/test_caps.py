"""What the proxy holds of one upstream reply is capped (`max_held_bytes`, `max_stream_events`):
past a cap the reply is refused (502, or a final error event once a stream's headers left), the
message names the cap, and a metric counts it. Timeouts say which limit passed."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from proxy.server.state import METRICS
from tests.streaming.replies import DONE, GOOD, choice, chunk, completion, delta, post

LEAK = "leaked-words"


def sample(proxy: Any, name: str, labels: dict[str, str]) -> float:
    value = proxy.app[METRICS].registry.get_sample_value(name, labels)
    return 0.0 if value is None else float(value)


async def test_stream_over_max_held_bytes_is_502(start_proxy: Any) -> None:
    async with start_proxy(server={"max_held_bytes": 4096}) as proxy:
        proxy.upstream.mode = "raw"
        proxy.upstream.raw_chunks = [chunk(delta(content=LEAK + "x" * 1000)) for _ in range(8)] + [DONE]
        answer = await post(proxy.url, stream=True)
        over = sample(proxy, "guardrail_held_reply_over_cap_total", {"kind": "stream", "cap": "max_held_bytes"})
    assert answer.status == 502
    assert answer.json["error"]["code"] == "upstream_reply_too_large"
    assert "max_held_bytes (4096 bytes)" in answer.json["error"]["message"]
    assert LEAK.encode() not in answer.body
    assert over == 1


async def test_stream_over_max_stream_events_is_502(start_proxy: Any) -> None:
    async with start_proxy(server={"max_stream_events": 5}) as proxy:
        proxy.upstream.mode = "raw"
        # Comment-only events count too: they cost parsing even though they are never relayed.
        proxy.upstream.raw_chunks = [b": ping\n\n"] * 4 + [chunk(delta(content=LEAK))] * 2 + [DONE]
        answer = await post(proxy.url, stream=True)
        over = sample(proxy, "guardrail_held_reply_over_cap_total", {"kind": "stream", "cap": "max_stream_events"})
    assert answer.status == 502
    assert "max_stream_events (5 events)" in answer.json["error"]["message"]
    assert LEAK.encode() not in answer.body
    assert over == 1


async def test_cap_after_headers_is_a_final_error_event(start_proxy: Any) -> None:
    async with start_proxy(server={"max_held_bytes": 4096, "keepalive_interval_s": 0.01}) as proxy:
        proxy.upstream.mode = "raw"
        big = [chunk(delta(content=LEAK + "x" * 1000)) for _ in range(8)]
        proxy.upstream.raw_chunks = [chunk(delta(role="assistant", content="")), None, *big, DONE]
        answer = await post(proxy.url, stream=True, on_headers=proxy.upstream.gate.set)
    assert answer.status == 200
    assert LEAK.encode() not in answer.body and b"HTTP/1.1" not in answer.body
    assert answer.events[-1] == b"data: [DONE]"
    assert b"max_held_bytes" in answer.events[-2]


async def test_stream_under_the_caps_is_relayed_and_measured(start_proxy: Any) -> None:
    async with start_proxy(server={"max_held_bytes": 64 * 1024, "max_stream_events": 20}) as proxy:
        proxy.upstream.mode = "raw"
        proxy.upstream.raw_chunks = [chunk(delta(content="word ")) for _ in range(18)] + [DONE]
        answer = await post(proxy.url, stream=True)
        held = sample(proxy, "guardrail_held_reply_bytes_sum", {"kind": "stream"})
    assert answer.status == 200
    assert answer.body == b"".join(c for c in proxy.upstream.raw_chunks if c is not None)
    assert held == len(answer.body)


@pytest.mark.parametrize("status", [200, 500])
async def test_json_reply_over_max_held_bytes_is_502(start_proxy: Any, status: int) -> None:
    async with start_proxy(server={"max_held_bytes": 4096}) as proxy:
        proxy.upstream.mode, proxy.upstream.raw_status = "raw", status
        proxy.upstream.raw_body = completion(choice(LEAK + "x" * 8000))
        answer = await post(proxy.url, stream=False)
        over = sample(proxy, "guardrail_held_reply_over_cap_total", {"kind": "json", "cap": "max_held_bytes"})
    assert answer.status == 502
    assert "max_held_bytes" in answer.json["error"]["message"]
    assert LEAK.encode() not in answer.body
    assert over == 1


async def test_total_timeout_is_reported_as_total(start_proxy: Any) -> None:
    """aiohttp's `sock_read` and `total` timeouts differ; the error says which one passed."""
    upstreams = {"default": {"total_timeout_s": 0.3, "read_timeout_s": 5.0}}
    async with start_proxy(upstreams=upstreams, server={"keepalive_interval_s": 0.01}) as proxy:
        proxy.upstream.mode, proxy.upstream.delay_s = "trickle", 0.1
        stream = await proxy.client().chat.completions.create(model="m", messages=GOOD, stream=True)
        with pytest.raises(openai.APIError, match="total timeout") as info:
            [c async for c in stream]
    assert "read timeout" not in str(info.value)
