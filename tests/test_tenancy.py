"""Tenants: keys pick the policy, unknown keys are 401, keys never reach logs or the upstream."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import DEFAULT_POLICY

ACME = """
extends: default
route_defaults:
  refusal: "Acme says no."
"""
TENANTS = {
    "acme": {"keys": ["sk-acme-1234567890"], "policy": "acme"},
    "beta": {"keys": ["env:BETA_KEY"], "policy": "default"},
}
BAD = [{"role": "user", "content": "bomb"}]


@pytest.fixture
def beta_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("BETA_KEY", "sk-beta-0987654321")
    return "sk-beta-0987654321"


async def test_each_tenant_gets_its_own_policy(
    start_proxy: Any, beta_key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async with start_proxy(policies={"default": DEFAULT_POLICY, "acme": ACME}, tenants=TENANTS) as proxy:
        acme = await proxy.client("sk-acme-1234567890").chat.completions.with_raw_response.create(
            model="m", messages=BAD
        )
        beta = await proxy.client(beta_key).chat.completions.with_raw_response.create(model="m", messages=BAD)
        ok = await proxy.client(beta_key).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}]
        )
    assert acme.parse().choices[0].message.content == "Acme says no."
    assert acme.headers["x-guardrail-policy"].startswith("acme@")
    assert beta.parse().choices[0].message.content == "Blocked by policy."
    assert beta.headers["x-guardrail-policy"].startswith("default@")
    assert ok.choices[0].message.content
    logs = capsys.readouterr().out
    assert '"tenant": "acme"' in logs and '"tenant": "beta"' in logs
    for secret in ("sk-acme-1234567890", beta_key, "sk-upstream-secret", "bomb"):
        assert secret not in logs
    upstream_auth = {r.headers.get("Authorization") for r in proxy.upstream.chat_requests}
    assert upstream_auth == {"Bearer sk-upstream-secret"}


@pytest.mark.parametrize("key", ["sk-wrong", "sk-acme-123456789"])
async def test_missing_or_unknown_key_is_401(start_proxy: Any, beta_key: str, key: str) -> None:
    async with start_proxy(policies={"default": DEFAULT_POLICY, "acme": ACME}, tenants=TENANTS) as proxy:
        with pytest.raises(openai.AuthenticationError) as info:
            await proxy.client(key).chat.completions.create(model="m", messages=BAD)
        with pytest.raises(openai.AuthenticationError):
            await proxy.client(key).models.list()
    assert info.value.code == "invalid_api_key"
    assert proxy.upstream.received == []


async def test_missing_key_is_401(start_proxy: Any, beta_key: str) -> None:
    async with (
        start_proxy(policies={"default": DEFAULT_POLICY, "acme": ACME}, tenants=TENANTS) as proxy,
        aiohttp.ClientSession() as http,
        http.post(proxy.url + "/v1/chat/completions", json={"model": "m", "messages": BAD}) as resp,
    ):
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == "invalid_api_key"


async def test_forward_client_key_only_when_configured(start_proxy: Any, beta_key: str) -> None:
    upstreams = {"default": {"forward_client_key": True}}
    async with start_proxy(
        policies={"default": DEFAULT_POLICY, "acme": ACME}, tenants=TENANTS, upstreams=upstreams
    ) as proxy:
        await proxy.client(beta_key).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert proxy.upstream.chat_requests[0].headers["Authorization"] == f"Bearer {beta_key}"


async def test_log_content_setting_logs_prompt(start_proxy: Any, capsys: pytest.CaptureFixture[str]) -> None:
    async with start_proxy(server={"log_content": True}) as proxy:
        await proxy.client().chat.completions.create(
            model="m", messages=[{"role": "user", "content": "visible-prompt"}]
        )
    assert "visible-prompt" in capsys.readouterr().out


async def test_every_log_line_of_a_request_names_its_tenant(
    start_proxy: Any, beta_key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.fakes.guards import ScriptedTextGuard

    class ExplodingGuard:
        name = "llama_guard"

        async def score_conversation(self, *args: Any, **kw: Any) -> Any:
            raise RuntimeError("boom")

    guards = {"prompt_guard": ScriptedTextGuard(), "llama_guard": ExplodingGuard()}
    async with start_proxy(policies={"default": DEFAULT_POLICY, "acme": ACME}, tenants=TENANTS, guards=guards) as proxy:
        with pytest.raises(openai.APIStatusError):
            await proxy.client(beta_key).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    request_lines = [line for line in lines if line.get("event") in ("guard_failed", "request")]
    assert {line["event"] for line in request_lines} == {"guard_failed", "request"}
    assert all(line["tenant"] == "beta" for line in request_lines)
    assert len({line["request_id"] for line in request_lines}) == 1
