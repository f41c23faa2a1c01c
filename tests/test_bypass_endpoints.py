"""Adversarial review of the endpoints beside chat (Responses, legacy completions, moderations): each
test is a way around the guard that was open, driven through the real path (the official openai client
or raw aiohttp -> the proxy -> a fake upstream on 127.0.0.1) with the scripted trigger-word guards."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest

from tests.fakes.responses import FakeResponses
from tests.server.test_responses import POLICY, REFUSAL

TRIGGER = "bomb"  # the scripted Llama Guard flags it in any turn


@pytest.fixture
async def upstream() -> AsyncIterator[FakeResponses]:
    fake = await FakeResponses().start()
    yield fake
    await fake.stop()


async def post_raw(url: str, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(url + path, json=body, headers={"Authorization": "Bearer k"}) as resp,
    ):
        return resp.status, await resp.read()


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)


STARTED: dict[str, Any] = {"id": "resp_x", "object": "response", "status": "in_progress", "output": []}
DONE_EVENT = {"type": "response.completed", "response": {**STARTED, "status": "completed"}}
AT = {"item_id": "msg_x", "output_index": 0, "content_index": 0}


@pytest.mark.parametrize(
    "event",
    [
        pytest.param(
            {"type": "response.output_text.delta", **AT, "delta": f"a {TRIGGER}", "item": {"type": "message"}},
            id="delta-beside-an-item",
        ),
        pytest.param(
            {"type": "response.output_text.delta", **AT, "delta": f"a {TRIGGER}", "response": STARTED},
            id="delta-beside-a-response",
        ),
        pytest.param(
            {
                "type": "response.output_item.done",
                "output_index": 0,
                "response": STARTED,
                "item": {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": TRIGGER}]},
            },
            id="item-beside-a-response",
        ),
        pytest.param(
            {"type": "response.content_part.done", **AT, "part": {"type": "output_text", "text": "hi"}, "x": TRIGGER},
            id="field-beside-a-part",
        ),
    ],
)
async def test_stream_event_text_beside_another_payload_is_screened(
    start_proxy: Any, upstream: FakeResponses, event: dict[str, Any]
) -> None:
    """An event carrying `item`, `part` or `response` was read for that one key only: its `delta` or any
    other field went to the client unscreened (the SDK reads `delta` of a delta event, `item` of an
    item event)."""
    upstream.mode = "raw"
    upstream.raw_body = sse({"type": "response.created", "response": STARTED}, event, DONE_EVENT)
    async with start_proxy(policies={"default": POLICY}) as proxy:
        status, body = await post_raw(proxy.url, "/v1/responses", {"model": "m", "input": "Hi", "stream": True})
    assert status == 200
    assert TRIGGER.encode() not in body
    assert REFUSAL.encode() in body



MESSAGE = {"id": "msg_x", "type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hi."}]}
COMPLETED: dict[str, Any] = {**STARTED, "status": "completed", "output": [MESSAGE]}


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({"output_text": f"a {TRIGGER}"}, id="output_text-shortcut"),
        pytest.param({"summary": {"text": f"a {TRIGGER}"}}, id="unknown-field"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_response_object_fields_beside_output_are_screened(
    start_proxy: Any, upstream: FakeResponses, extra: dict[str, Any], stream: bool
) -> None:
    """Only `output` of a response object was read: the `output_text` shortcut (which raw-HTTP clients
    read) or any unknown field reached the client unscreened, and a blocked response's refusal kept them."""
    final = {**COMPLETED, **extra}
    upstream.mode = "raw"
    upstream.raw_body = json.dumps(final).encode()
    if stream:
        upstream.raw_body = sse({"type": "response.created", "response": STARTED}, {**DONE_EVENT, "response": final})
    async with start_proxy(policies={"default": POLICY}) as proxy:
        status, body = await post_raw(proxy.url, "/v1/responses", {"model": "m", "input": "Hi", "stream": stream})
    assert status == 200
    assert TRIGGER.encode() not in body
    assert REFUSAL.encode() in body


async def test_a_final_response_with_an_error_is_our_own_error(start_proxy: Any, upstream: FakeResponses) -> None:
    """A JSON reply with an `error` is a 502; a stream's `response.completed` with one was relayed as is."""
    final = {**COMPLETED, "error": {"code": "server_error", "message": f"a {TRIGGER}"}}
    upstream.mode = "raw"
    upstream.raw_body = sse({"type": "response.created", "response": STARTED}, {**DONE_EVENT, "response": final})
    async with start_proxy(policies={"default": POLICY}) as proxy:
        status, body = await post_raw(proxy.url, "/v1/responses", {"model": "m", "input": "Hi", "stream": True})
        with pytest.raises(openai.APIError):
            async for _ in await proxy.client().responses.create(model="m", input="Hi", stream=True):
                pass
    assert TRIGGER.encode() not in body
    assert status == 502 or b"upstream_error" in body
