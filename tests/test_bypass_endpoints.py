"""Adversarial review of the endpoints beside chat (Responses, legacy completions, moderations): each
test is a way around the guard that was open, driven through the real path (the official openai client
or raw aiohttp -> the proxy -> a fake upstream on 127.0.0.1) with the scripted trigger-word guards."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
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
