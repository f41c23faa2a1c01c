"""A non-OpenAI provider end to end: openai client -> proxy -> litellm -> fake Anthropic API."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest

from tests.fakes.anthropic import FakeAnthropic

pytest.importorskip("litellm", reason="install the litellm extra: pip install -e '.[dev,litellm]'")
import asyncio

from proxy.upstream.litellm_adapter import prepare_litellm

# The app does this at startup; here it runs once on a throwaway loop, outside the timed tests.
asyncio.run(prepare_litellm(["anthropic/warm-up"]))

UPSTREAM = {
    "claude": {
        "kind": "litellm",
        "provider_model_prefix": "anthropic/",
        "api_key": "sk-ant-test",
        "total_timeout_s": 10,
    }
}
POLICY = """
route_defaults:
  refusal: "Blocked by policy."
routes:
  - name: claude
    match: {path: /v1/chat/completions, model: "claude-*"}
    upstream: claude
    input:
      - {guard: llama_guard, threshold: 0.5}
    output:
      - {guard: llama_guard, threshold: 0.5}
"""


@pytest.fixture
async def anthropic() -> AsyncIterator[FakeAnthropic]:
    server = await FakeAnthropic().start()
    yield server
    await server.stop()


def upstreams(fake: FakeAnthropic) -> dict[str, Any]:
    return {**UPSTREAM, "claude": {**UPSTREAM["claude"], "base_url": fake.url}}


async def test_anthropic_through_litellm(start_proxy: Any, anthropic: FakeAnthropic) -> None:
    async with start_proxy(policies={"default": POLICY}, upstreams=upstreams(anthropic)) as proxy:
        client = proxy.client()
        completion = await client.chat.completions.create(
            model="claude-3-5-sonnet-20241022",
            max_tokens=50,
            messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}],
        )
        stream = await client.chat.completions.create(
            model="claude-3-5-sonnet-20241022",
            max_tokens=50,
            stream=True,
            messages=[{"role": "user", "content": "Say hi"}],
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert completion.choices[0].message.content == "Bonjour from Claude"
    assert text.strip() == "Bonjour from Claude"
    path, headers, body = anthropic.requests[0]
    assert path.endswith("/messages")
    assert body["model"] == "claude-3-5-sonnet-20241022"
    assert (
        body["system"] and body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "Say hi"}]}]
    ) or body["messages"][0]["role"] == "user"
    assert headers["x-api-key"] == "sk-ant-test"  # the configured key, not the client's
    assert len(anthropic.requests) == 2  # no hidden retries


async def test_anthropic_reply_is_screened(start_proxy: Any, anthropic: FakeAnthropic) -> None:
    anthropic.reply = "Here is the bomb manual"
    async with start_proxy(policies={"default": POLICY}, upstreams=upstreams(anthropic)) as proxy:
        stream = await proxy.client().chat.completions.create(
            model="claude-x", max_tokens=50, stream=True, messages=[{"role": "user", "content": "hi"}]
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "Blocked by policy."


async def test_provider_error_status_is_relayed(start_proxy: Any, anthropic: FakeAnthropic) -> None:
    bad = {"claude": {**upstreams(anthropic)["claude"], "api_key": "sk-wrong"}}
    async with start_proxy(policies={"default": POLICY}, upstreams=bad) as proxy:
        with pytest.raises(openai.AuthenticationError):
            await proxy.client().chat.completions.create(
                model="claude-x", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
            )
    assert len(anthropic.requests) == 1
