"""A non-OpenAI provider end to end: openai client -> proxy -> litellm -> fake Anthropic API."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import openai
import pytest
from aiohttp import web

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
    assert body["system"] == [{"type": "text", "text": "Be brief."}]  # the system turn moved where Anthropic wants it
    assert body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "Say hi"}]}]
    assert headers["x-api-key"] == "sk-ant-test"  # the configured key, not the client's
    assert len(anthropic.requests) == 2  # no hidden retries


# What a client could put in its body to send the operator's key elsewhere, were the body spread
# into litellm: its own endpoint, key, headers and provider settings, and provider credentials.
HIJACK = {
    "base_url": "{url}",
    "api_base": "{url}",
    "api_key": "sk-attacker",
    "extra_headers": {"x-exfil": "1"},
    "custom_llm_provider": "openai",
    "headers": {"x-exfil": "1"},
    "extra_body": {"stolen": True},
    "api_version": "2024-01-01",
    "aws_access_key_id": "AKIA-ATTACKER",
    "aws_secret_access_key": "x",
    "aws_region_name": "us-east-1",
    "vertex_project": "evil",
    "vertex_credentials": "{}",
    "azure_ad_token": "x",
    "metadata": {"x": 1},
}
# litellm answers this itself: the client would write the "provider's" reply, skipping the provider.
MOCK = {"mock_response": "injected reply"}


@dataclass
class Attacker:
    url: str
    seen: list[str]


@pytest.fixture
async def attacker() -> AsyncIterator[Attacker]:
    """A stand-in for the client's own server: records every request that reaches it."""
    seen: list[str] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.path} {dict(request.headers)}")
        return web.json_response({"error": "stolen"}, status=500)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield Attacker(f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}", seen)  # type: ignore[union-attr]
    await runner.cleanup()


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("extra", [HIJACK, MOCK], ids=["hijack", "mock"])
async def test_client_cannot_redirect_the_provider_call(
    start_proxy: Any, anthropic: FakeAnthropic, attacker: Attacker, stream: bool, extra: dict[str, Any]
) -> None:
    hijack = {k: (v.replace("{url}", attacker.url) if isinstance(v, str) else v) for k, v in extra.items()}
    async with start_proxy(policies={"default": POLICY}, upstreams=upstreams(anthropic)) as proxy:
        client = proxy.client()
        args: dict[str, Any] = {"model": "claude-x", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}
        if stream:
            chunks = await client.chat.completions.create(**args, stream=True, extra_body=hijack)
            text = "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
        else:
            completion = await client.chat.completions.create(**args, extra_body=hijack)
            text = completion.choices[0].message.content or ""
    assert attacker.seen == []
    assert text.strip() == "Bonjour from Claude"  # the configured upstream answered, not a mock
    _, headers, body = anthropic.requests[0]
    assert headers["x-api-key"] == "sk-ant-test"
    assert "x-exfil" not in {k.lower() for k in headers}
    assert not set(body) & set(extra)


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


@pytest.mark.parametrize("prefix", [None, "", "anthropic"])
def test_litellm_upstream_needs_a_provider_prefix(prefix: str | None) -> None:
    """Without a fixed provider the client's model string ("openai/...") would choose where the key goes."""
    from pydantic import ValidationError

    from proxy.settings import UpstreamSettings

    with pytest.raises(ValidationError, match="provider_model_prefix"):
        UpstreamSettings.model_validate({"kind": "litellm", "provider_model_prefix": prefix})
