"""Which client headers travel upstream with the proxy's key: an allow-list (accept, user-agent),
plus names a route lists in `forward_headers`; never one that picks an account or a project unless
the route says so, never a credential, and never across a redirect."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict
from pydantic import ValidationError

from proxy.policy.models import RouteSettings
from tests.conftest import DEFAULT_POLICY

HI = [{"role": "user", "content": "hi"}]
HOSTILE = {
    "X-Evil": "1",
    "X-Forwarded-For": "10.0.0.1",
    "Cookie": "session=abc",
    "api-key": "sk-client-azure",
    "X-Guardrail-Bypass": "1",
    "Accept-Language": "fr",
}


def sent_names(headers: dict[str, str]) -> set[str]:
    return {k.lower() for k in headers}


async def test_client_headers_that_pick_an_account_stay_at_the_proxy(start_proxy: Any) -> None:
    async with start_proxy() as proxy:
        client = proxy.client(organization="org-evil", project="proj-evil", default_headers=HOSTILE)
        await client.chat.completions.create(model="m", messages=HI)
        await client.embeddings.create(model="emb", input="hi")
    chat, embeddings = proxy.upstream.received
    for received in (chat, embeddings):
        names = sent_names(received.headers)
        assert not names & {"openai-organization", "openai-project", *(k.lower() for k in HOSTILE)}
        assert not any(n.startswith("x-stainless") for n in names)
        assert received.headers["Authorization"] == "Bearer sk-upstream-secret"
        assert received.headers["User-Agent"].startswith("AsyncOpenAI/Python")


ORG_POLICY = DEFAULT_POLICY.replace(
    "  - name: chat\n", "  - name: chat\n    forward_headers: [OpenAI-Organization, x-tenant-region]\n"
)


async def test_route_forward_headers_adds_names(start_proxy: Any) -> None:
    async with start_proxy(policies={"default": ORG_POLICY}) as proxy:
        client = proxy.client(
            organization="org-operator", project="proj-x", default_headers={**HOSTILE, "X-Tenant-Region": "eu"}
        )
        await client.chat.completions.create(model="m", messages=HI)
        await client.embeddings.create(model="emb", input="hi")
    chat, embeddings = proxy.upstream.received
    headers = CIMultiDict(chat.headers)
    assert headers["OpenAI-Organization"] == "org-operator"
    assert headers["X-Tenant-Region"] == "eu"
    assert not sent_names(chat.headers) & {"openai-project", "x-evil", "cookie", "api-key"}
    assert "openai-organization" not in sent_names(embeddings.headers)  # another route: its own list


@pytest.mark.parametrize(
    "name",
    [
        "Authorization",
        "api-key",
        "X-API-Key",
        "Cookie",
        "Host",
        "Connection",
        "Transfer-Encoding",
        "Proxy-Authorization",
        "Content-Length",
        "X-Request-ID",
        "x-guardrail-decision",
        "bad header",
        "",
    ],
)
def test_forward_headers_refuses_credentials_and_hop_headers(name: str) -> None:
    with pytest.raises(ValidationError, match=r"forward_headers|HTTP header name"):
        RouteSettings.model_validate({"name": "chat", "forward_headers": [name]})


def test_forward_headers_are_case_insensitive() -> None:
    names = ["OpenAI-Organization", "openai-organization"]
    route = RouteSettings.model_validate({"name": "chat", "forward_headers": names})
    assert route.forward_headers == ("openai-organization",)


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]


@dataclass
class Redirect:
    upstream_url: str  # answers every request with a redirect to the collector
    collected: list[str]  # the Authorization header of every request the collector got


@pytest.fixture
async def redirect() -> AsyncIterator[Redirect]:
    collected: list[str] = []

    async def collect(request: web.Request) -> web.Response:
        collected.append(request.headers.get("Authorization", ""))
        return web.json_response({})

    collector = web.Application()
    collector.router.add_route("*", "/{tail:.*}", collect)
    collector_runner, collector_url = await serve(collector)

    async def redirect_all(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(collector_url + "/steal")

    redirector = web.Application()
    redirector.router.add_route("*", "/{tail:.*}", redirect_all)
    redirector_runner, redirector_url = await serve(redirector)
    yield Redirect(redirector_url + "/v1", collected)
    await redirector_runner.cleanup()
    await collector_runner.cleanup()


async def test_upstream_redirect_is_not_followed(start_proxy: Any, redirect: Redirect) -> None:
    upstreams = {"default": {"base_url": redirect.upstream_url, "api_key": "sk-upstream-secret"}}
    statuses = []
    async with start_proxy(upstreams=upstreams) as proxy, aiohttp.ClientSession() as http:
        for path, body in (("/v1/chat/completions", {"model": "m", "messages": HI}), ("/v1/embeddings", {})):
            async with http.post(proxy.url + path, json=body, allow_redirects=False) as resp:
                statuses.append(resp.status)
                assert "location" not in resp.headers
    assert redirect.collected == []
    assert statuses == [502, 502]


async def test_request_id_goes_upstream_under_our_own_name(start_proxy: Any) -> None:
    """The proxy's id travels as X-Guardrail-Request-ID; X-Request-ID only as the client sent it
    (llama-cpp-python's server rejects ids that are not UUIDs)."""
    async with start_proxy() as proxy:
        client = proxy.client()
        plain = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "hi"}]
        )
        given = "3f2b8c1e-6c1d-4a55-9d0e-0a4f8f7b1c2d"
        await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], extra_headers={"X-Request-ID": given}
        )
    first, second = (r.headers for r in proxy.upstream.chat_requests)
    lower_first = {k.lower(): v for k, v in first.items()}
    assert lower_first["x-guardrail-request-id"] == plain.headers["x-request-id"]
    assert "x-request-id" not in lower_first
    lower_second = {k.lower(): v for k, v in second.items()}
    assert lower_second["x-request-id"] == given
    assert lower_second["x-guardrail-request-id"] == given
