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
