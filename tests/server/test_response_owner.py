"""Response ownership through the real path: two tenants with their own keys, the official openai
client per tenant, the fake Responses upstream. Tenants share the upstream's key, so an id that leaks
would be good for any of them: the proxy answers another tenant's id with a 404 and never relays it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.fakes.redis_server import RedisServer, free_port
from tests.fakes.responses import FakeResponses
from tests.server.test_responses import POLICY, blocked

TENANTS = {"a": {"keys": ["sk-a"], "policy": "default"}, "b": {"keys": ["sk-b"], "policy": "default"}}
QUEUED = {"id": "resp_bg1", "object": "response", "created_at": 1700000000, "status": "queued", "model": "m"}


@pytest.fixture
async def upstream() -> AsyncIterator[FakeResponses]:
    fake = await FakeResponses().start()
    yield fake
    await fake.stop()


def refused(exc: pytest.ExceptionInfo[openai.NotFoundError], rid: str, param: str | None = None) -> bool:
    """The 404 the upstream itself gives an id it never made: nothing says the id exists."""
    error, noun = exc.value.body, "conversation" if rid.startswith("conv") else "response"
    return bool(
        isinstance(error, dict)
        and error.get("message") == f"No {noun} found with id '{rid}'."
        and exc.value.code == "not_found"
        and error.get("type") == "invalid_request_error"
        and error.get("param") == param
    )


# The `param` of each refusal `reach` meets: only a create names the id in a body field.
PARAMS = [None, None, None, "previous_response_id", None]


async def reach(client: openai.AsyncOpenAI, rid: str) -> list[pytest.ExceptionInfo[openai.NotFoundError]]:
    """Every way a client reaches a stored response (retrieve, input items, cancel, continue,
    delete); each must fail with a 404."""
    calls: list[Any] = [
        lambda: client.responses.retrieve(rid),
        lambda: client.responses.input_items.list(rid),
        lambda: client.responses.cancel(rid),
        lambda: client.responses.create(model="m", input="Go on.", previous_response_id=rid),
        lambda: client.responses.delete(rid),
    ]
    out = []
    for call in calls:
        with pytest.raises(openai.NotFoundError) as exc:
            await call()
        out.append(exc)
    return out


async def refusals(url: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as resp:
        return "\n".join(line for line in (await resp.text()).splitlines() if "owner_refusals_total{" in line)


async def test_another_tenant_cannot_reach_a_response_its_owner_still_can(
    start_proxy: Any, upstream: FakeResponses
) -> None:
    async with start_proxy(policies={"default": POLICY}, tenants=TENANTS) as proxy:
        a, b = proxy.client("sk-a"), proxy.client("sk-b")
        made = await a.responses.create(model="m", input="Say hello.")
        before = len(upstream.received)
        failures = await reach(b, made.id)
        assert len(upstream.received) == before  # none of b's attempts reached the upstream
        assert [refused(exc, made.id, param) for exc, param in zip(failures, PARAMS, strict=True)] == [True] * 5
        assert await refusals(proxy.url) == 'guardrail_response_owner_refusals_total{tenant="b"} 5.0'
        # The owner still reaches it, every way.
        assert (await a.responses.retrieve(made.id)).output_text == upstream.text
        assert [i.type for i in (await a.responses.input_items.list(made.id)).data] == ["message"]
        assert (await a.responses.cancel(made.id)).status == "cancelled"
        followed = await a.responses.create(model="m", input="Go on.", previous_response_id=made.id)
        assert followed.output_text == upstream.text
        await a.responses.delete(made.id)
    assert [(r.method, r.path) for r in upstream.received[before:]][-1] == ("DELETE", f"/v1/responses/{made.id}")


async def test_another_tenant_cannot_continue_a_conversation(start_proxy: Any, upstream: FakeResponses) -> None:
    async with start_proxy(policies={"default": POLICY}, tenants=TENANTS) as proxy:
        a, b = proxy.client("sk-a"), proxy.client("sk-b")
        await a.responses.create(model="m", input="Remember a word.", conversation="conv_1")
        with pytest.raises(openai.NotFoundError) as exc:
            await b.responses.create(model="m", input="What was it?", conversation={"id": "conv_1"})
        assert refused(exc, "conv_1", param="conversation")
        assert len(upstream.response_requests) == 1
        again = await a.responses.create(model="m", input="What was it?", conversation="conv_1")
    assert again.output_text == upstream.text


@pytest.mark.parametrize("how", ["blocked", "blocked-stream", "background"])
async def test_a_blocked_or_background_response_is_its_tenants_at_once(
    start_proxy: Any, upstream: FakeResponses, how: str
) -> None:
    """A reply the client did not get is still its id's (and a background response's id is good from
    the create's answer): another tenant's attempt is a 404, not the withheld 400 that would say so."""
    if how == "background":
        upstream.mode, upstream.raw_body = "raw", json.dumps({**QUEUED, "output": []}).encode()
    else:
        upstream.text = "Here is how to build a bomb."
    async with start_proxy(policies={"default": POLICY}, tenants=TENANTS) as proxy:
        a, b = proxy.client("sk-a"), proxy.client("sk-b")
        if how == "blocked-stream":
            events = [event async for event in await a.responses.create(model="m", input="Hi", stream=True)]
            assert events[-1].type == "response.incomplete"
            made = events[-1].response
        else:
            made = await a.responses.create(model="m", input="Hi", background=how == "background")
        assert blocked(made) == (how != "background")
        before = len(upstream.received)
        failures = await reach(b, made.id)
        assert len(upstream.received) == before
        assert all(refused(exc, made.id, param) for exc, param in zip(failures, PARAMS, strict=True))


async def test_an_unknown_owner_is_allowed_unless_require_owner(
    start_proxy: Any, upstream: FakeResponses
) -> None:
    """Made before ownership was kept (here: through a proxy whose in-process state is gone)."""
    async with start_proxy(policies={"default": POLICY}, tenants=TENANTS) as old:
        made = await old.client("sk-a").responses.create(model="m", input="Say hello.")
    async with start_proxy(policies={"default": POLICY}, tenants=TENANTS) as proxy:
        assert (await proxy.client("sk-b").responses.retrieve(made.id)).id == made.id
        # Reading it claims nothing: its maker is not locked out.
        assert (await proxy.client("sk-a").responses.retrieve(made.id)).id == made.id
    strict = {"require_owner": True}
    async with start_proxy(policies={"default": POLICY}, tenants=TENANTS, state=strict) as proxy:
        before = len(upstream.received)
        for key in ("sk-a", "sk-b"):
            failures = await reach(proxy.client(key), made.id)
            assert refused(failures[0], made.id) and refused(failures[3], made.id, param="previous_response_id")
        assert len(upstream.received) == before
        # A conversation is made upstream without this proxy: its first turn here claims it.
        a = proxy.client("sk-a")
        fresh = await a.responses.create(model="m", input="Hi", conversation="conv_new")
        assert (await a.responses.retrieve(fresh.id)).id == fresh.id
        with pytest.raises(openai.NotFoundError):
            await proxy.client("sk-b").responses.create(model="m", input="Hi", conversation="conv_new")
        assert await refusals(proxy.url) == "\n".join(
            f'guardrail_response_owner_refusals_total{{tenant="{t}"}} {n}' for t, n in [("a", "5.0"), ("b", "6.0")]
        )


async def test_replicas_sharing_redis_share_owners(
    start_proxy: Any, upstream: FakeResponses, tmp_path: Path
) -> None:
    (tmp_path / "redis").mkdir()
    redis = await RedisServer(tmp_path / "redis").start()
    try:
        state = {"redis_url": redis.url, "require_owner": True}
        async with start_proxy(policies={"default": POLICY}, tenants=TENANTS, state=state) as one:
            made = await one.client("sk-a").responses.create(model="m", input="Say hello.")
        async with start_proxy(policies={"default": POLICY}, tenants=TENANTS, state=state) as two:
            before = len(upstream.received)
            failures = await reach(two.client("sk-b"), made.id)
            assert len(upstream.received) == before
            assert refused(failures[0], made.id)
            assert (await two.client("sk-a").responses.retrieve(made.id)).output_text == upstream.text
    finally:
        await redis.stop()


@pytest.mark.parametrize("require_owner", [False, True])
async def test_a_failing_redis_makes_owners_unknown(
    start_proxy: Any, upstream: FakeResponses, require_owner: bool
) -> None:
    """Nothing listens at the Redis URL: no owner is recorded or read, so an id is allowed by default
    and refused (fail closed) with require_owner, even to the tenant that made it."""
    state = {"redis_url": f"redis://127.0.0.1:{free_port()}/0", "require_owner": require_owner}
    async with start_proxy(policies={"default": POLICY}, tenants=TENANTS, state=state) as proxy:
        made = await proxy.client("sk-a").responses.create(model="m", input="Say hello.")
        if require_owner:
            with pytest.raises(openai.NotFoundError) as exc:
                await proxy.client("sk-a").responses.retrieve(made.id)
            assert refused(exc, made.id)
        else:
            assert (await proxy.client("sk-b").responses.retrieve(made.id)).id == made.id
