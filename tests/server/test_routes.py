"""Health, readiness and metrics endpoints as an operator (or Kubernetes, or Prometheus) sees them."""

from __future__ import annotations

from typing import Any

import aiohttp


async def test_health_ready_and_metrics(start_proxy: Any) -> None:
    async with start_proxy() as proxy:
        await proxy.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "bomb"}])
        async with aiohttp.ClientSession() as http:
            async with http.get(proxy.url + "/healthz") as resp:
                assert resp.status == 200
            async with http.get(proxy.url + "/readyz") as resp:
                assert resp.status == 200
                assert (await resp.json())["status"] == "ready"
            async with http.get(proxy.url + "/metrics") as resp:
                assert resp.status == 200
                assert resp.content_type.startswith("text/plain")
                text = await resp.text()
    assert 'guardrail_requests_total{decision="block",route="chat",status="200",tenant="default"} 1.0' in text
    assert (
        'guardrail_blocks_total{category="S9",decision="block",route="chat",side="input",tenant="default"} 1.0' in text
    )
    assert 'guardrail_guard_latency_seconds_count{guard="llama_guard",side="input"} 1.0' in text
    assert "guardrail_in_flight_requests" in text


async def test_ready_gauge_follows_readyz(start_proxy: Any) -> None:
    """`guardrail_ready` says at each scrape what /readyz would answer: alerts need no probe of their own."""
    from proxy.server.state import READINESS

    async def scrape(url: str) -> tuple[int, str]:
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "/readyz") as resp:
                status = resp.status
            async with http.get(url + "/metrics") as resp:
                return status, await resp.text()

    async with start_proxy() as proxy:
        ready = await scrape(proxy.url)
        proxy.app[READINESS].ready, proxy.app[READINESS].error = False, "guard llama_guard failed to load"
        failed = await scrape(proxy.url)
    assert ready[0] == 200 and "\nguardrail_ready 1.0\n" in ready[1]
    assert failed[0] == 503 and "\nguardrail_ready 0.0\n" in failed[1]
