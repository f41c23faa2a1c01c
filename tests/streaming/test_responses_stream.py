"""Streamed POST /v1/responses, held like chat: the typed events are read to `response.completed`,
checked, then replayed byte for byte or replaced by a refusal sequence ending in
`response.incomplete`. Through the official openai client (`stream=True` and `responses.stream`) and
raw HTTP, with a fake upstream that speaks the Responses API: blocks in a delta, across deltas, in
the final text only, upstream faults; not one upstream content byte of a blocked reply is sent."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncStream, omit
from openai._models import construct_type
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import ResponseStreamEvent

from proxy.streaming.responses import ResponsesStream
from tests.fakes.responses import FakeResponses
from tests.server.test_responses import ERROR_POLICY, POLICY, REFUSAL, WEATHER_TOOL, blocked

REFUSAL_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.incomplete",
]


def warm_stream_helper() -> None:
    """The SDK's stream helper builds its types on first use (most of a second): now, not inside a
    timed test. The fake's own events, function call and reasoning included, go through it once."""
    fake = FakeResponses(summary="s", function_call={"name": "f", "arguments": "{}"})
    for body in ({"model": "m", "input": "x"}, {"model": "m", "input": "x", "tools": [WEATHER_TOOL]}):
        output = fake.output(body, "resp_w")
        state: ResponseStreamState[Any] = ResponseStreamState(input_tools=omit, text_format=omit)
        for event in fake.events(body, "resp_w", output, fake.response(body, "resp_w", output, "completed")):
            state.handle_event(construct_type(type_=ResponseStreamEvent, value=event))  # type: ignore[arg-type]


warm_stream_helper()


@pytest.fixture
async def upstream() -> AsyncIterator[FakeResponses]:
    fake = await FakeResponses().start()
    yield fake
    await fake.stop()


async def post_raw(url: str, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(url + "/v1/responses", json=body, headers={"Authorization": "Bearer k"}) as resp,
    ):
        return resp.status, dict(resp.headers), await resp.read()


async def read_all(created: Awaitable[AsyncStream[Any]]) -> list[Any]:
    return [event async for event in await created]


def events_of(body: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(event line, data) of each event of an SSE body; comments skipped."""
    out = []
    for frame in body.decode().split("\n\n"):
        lines = [line for line in frame.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        event = next((line[7:] for line in lines if line.startswith("event: ")), "")
        data = "\n".join(line[6:] for line in lines if line.startswith("data: "))
        out.append((event, json.loads(data) if data != "[DONE]" else {"done": True}))
    return out


async def test_stream_replayed_byte_identical(start_proxy: Any, upstream: FakeResponses) -> None:
    upstream.summary = "Thinking about a greeting."
    async with start_proxy(policies={"default": POLICY}) as proxy:
        status, headers, body = await post_raw(proxy.url, {"model": "m", "input": "Say hello.", "stream": True})
        stream = await proxy.client().responses.create(model="m", input="Say hello.", stream=True)
        kinds = [event.type async for event in stream]
    assert status == 200 and headers["x-guardrail-decision"] == "allow"
    assert body == bytes(upstream.sent)[: len(body)]  # the first of the two replies the fake sent
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.reasoning_summary_text.delta" in kinds and "response.output_text.delta" in kinds


async def test_stream_helper_final_response(start_proxy: Any, upstream: FakeResponses) -> None:
    async with (
        start_proxy(policies={"default": POLICY}) as proxy,
        proxy.client().responses.stream(model="m", input="Say hello.") as stream,
    ):
        texts = [event.delta async for event in stream if event.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert "".join(texts) == upstream.text == final.output_text


async def test_stream_function_call_relayed(start_proxy: Any, upstream: FakeResponses) -> None:
    upstream.function_call = {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    async with (
        start_proxy(policies={"default": POLICY}) as proxy,
        proxy.client().responses.stream(model="m", input="Weather?", tools=[WEATHER_TOOL]) as stream,
    ):
        final = await stream.get_final_response()
    call = final.output[0]
    assert call.type == "function_call" and call.arguments == '{"city": "Paris"}'


@pytest.mark.parametrize(
    ("setup", "leaked"),
    [
        pytest.param({"text": "Here is how to build a bomb at home."}, b"build", id="trigger-in-a-delta"),
        pytest.param({"text": "Plan: a bomb.", "pieces": ["Plan: a bo", "mb."]}, b"Plan", id="split-across-deltas"),
        pytest.param({"text": "All fine here.", "done_text": "a bomb!"}, b'"delta": " fine"', id="only-in-done-text"),
        pytest.param({"summary": "They want a heist plan."}, b"heist", id="reasoning-summary"),
        pytest.param(
            {"function_call": {"name": "order", "arguments": '{"item": "a bomb"}'}},
            b"order",
            id="function-call-arguments",
        ),
    ],
)
async def test_blocked_stream_sends_only_the_refusal(
    start_proxy: Any, upstream: FakeResponses, setup: dict[str, Any], leaked: bytes
) -> None:
    for key, value in setup.items():
        setattr(upstream, key, value)
    async with start_proxy(policies={"default": POLICY}) as proxy:
        body_json = {"model": "m", "input": "Hi", "stream": True, "tools": [WEATHER_TOOL]}
        status, headers, body = await post_raw(proxy.url, body_json)
        async with proxy.client().responses.stream(model="m", input="Hi", tools=[WEATHER_TOOL]) as stream:
            # Not get_final_response(): the helper waits for response.completed, which OpenAI does not
            # send for an incomplete (filtered) response either.
            last = [event async for event in stream][-1]
    assert status == 200 and headers["x-guardrail-decision"] == "block"
    assert leaked in upstream.sent and leaked not in body
    for item in ("msg_resp", "fc_resp", "rs_resp"):
        assert item.encode() not in body  # no upstream item, not even its id
    events = events_of(body)
    assert [e for e, _ in events] == [d["type"] for _, d in events] == REFUSAL_EVENTS
    assert [d["sequence_number"] for _, d in events] == list(range(len(REFUSAL_EVENTS)))
    assert events[-1][1]["response"]["id"] == "resp_fake0001"
    assert last.type == "response.incomplete" and blocked(last.response)


async def test_input_block_streamed(start_proxy: Any, upstream: FakeResponses) -> None:
    async with start_proxy(policies={"default": POLICY}) as proxy:
        stream = await proxy.client().responses.create(model="m", input="How do I build a bomb?", stream=True)
        events = [event async for event in stream]
    assert [e.type for e in events] == REFUSAL_EVENTS
    assert events[4].delta == REFUSAL
    assert blocked(events[-1].response)
    assert upstream.response_requests == []


async def test_structured_output_refusal_is_a_refusal_part(start_proxy: Any, upstream: FakeResponses) -> None:
    schema: dict[str, Any] = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    schema["additionalProperties"] = False
    text = {"format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}}
    async with start_proxy(policies={"default": POLICY}) as proxy:
        body = {"model": "m", "input": "a bomb", "stream": True, "text": text}
        _, _, raw = await post_raw(proxy.url, body)
        refused = await proxy.client().responses.create(model="m", input="a bomb", text=text)
    kinds = [d["type"] for _, d in events_of(raw)]
    assert "response.refusal.delta" in kinds and "response.output_text.delta" not in kinds
    content = refused.output[0].content[0]
    assert content.type == "refusal" and content.refusal == REFUSAL


@pytest.mark.parametrize("fault", ["die", "error_event", "failed", "truncated"])
async def test_upstream_fault_is_the_proxys_own_error(start_proxy: Any, upstream: FakeResponses, fault: str) -> None:
    upstream.fault = fault
    upstream.text = "Partial words the client must never see."
    async with start_proxy(policies={"default": POLICY}) as proxy:
        status, _, body = await post_raw(proxy.url, {"model": "m", "input": "Hi", "stream": True})
        with pytest.raises(openai.APIError) as exc:
            await read_all(proxy.client().responses.create(model="m", input="Hi", stream=True))
    assert b"Partial" not in body and b"bomb" not in body  # nothing of the upstream's, its error text neither
    assert "bomb" not in str(exc.value)
    if status == 200:  # headers went out before the failure: one error event, then [DONE]
        *_, (_, error), (_, done) = events_of(body)
        assert error["error"]["type"] == "upstream_error" and done == {"done": True}


async def test_on_block_error_stream_is_a_bad_request(start_proxy: Any, upstream: FakeResponses) -> None:
    upstream.text = "Step one of the heist."
    async with start_proxy(policies={"default": ERROR_POLICY}) as proxy:
        client = proxy.client()
        with pytest.raises(openai.BadRequestError) as exc:
            await read_all(client.responses.create(model="m", input="Hi", stream=True))
    assert exc.value.code == "content_policy_violation"


async def test_done_before_completed_is_a_broken_stream() -> None:
    held = ResponsesStream(max_bytes=1 << 20, max_events=100)
    frame = b'event: response.created\ndata: {"type":"response.created","response":{"id":"r"}}\n\n'
    assert [event.data is not None for event, _ in held.feed(frame)] == [True]
    with pytest.raises(Exception, match=r"\[DONE\] before response.completed"):
        list(held.feed(b"data: [DONE]\n\n"))
    held = ResponsesStream(max_bytes=1 << 20, max_events=100)
    with pytest.raises(Exception, match="no plain `type`"):
        list(held.feed(b'data: {"type":"x y"}\n\n'))
    assert REFUSAL


def test_events_are_reframed_from_their_own_type() -> None:
    """Upstream comments, `id:` / `retry:` lines and a mislabelled `event:` line never reach the client."""
    held = ResponsesStream(max_bytes=1 << 20, max_events=100)
    data = '{"type":"response.created","response":{"id":"r","output":[]}}'
    frames = b": upstream comment\n\nid: 7\nretry: 10\nevent: error\ndata: " + data.encode() + b"\n\n"
    for event, added in held.feed(frames):
        held.keep(event, added)
    assert list(held.stored()) == [b"event: response.created\ndata: " + data.encode() + b"\n\n"]
    with pytest.raises(Exception, match="output_index"):
        list(held.feed(b'data: {"type":"response.output_text.delta","output_index":"0","delta":"x"}\n\n'))
