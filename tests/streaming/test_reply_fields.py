"""Reply fields found by review that a client shows: custom tool calls, tool-call fields outside
`function`, a JSON choice's `text`, a stream choice's `message`. Each is screened ("bomb" is blocked
by the scripted guard), in JSON replies and streams."""

from __future__ import annotations

from typing import Any

import pytest

from tests.streaming.replies import DONE, choice, chunk, completion, delta, post, stream_of

CUSTOM_CALL = {"id": "c1", "type": "custom", "custom": {"name": "run", "input": "how to build a bomb"}}
FLAT_CALL = {"id": "c1", "type": "function", "name": "f", "arguments": "bomb"}


@pytest.mark.parametrize("call", [CUSTOM_CALL, FLAT_CALL], ids=["custom tool", "flat name/arguments"])
async def test_json_tool_calls_outside_function_are_screened(start_proxy: Any, call: dict[str, Any]) -> None:
    async with start_proxy() as proxy:
        proxy.upstream.mode = "raw"
        proxy.upstream.raw_body = completion(choice(None, tool_calls=[call]))
        answer = await post(proxy.url, stream=False)
    assert answer.status == 200
    assert b"bomb" not in answer.body
    assert answer.json["choices"][0]["finish_reason"] == "content_filter"


async def test_streamed_custom_tool_call_is_screened(start_proxy: Any) -> None:
    pieces = [{"index": 0, "id": "c1", "type": "custom", "custom": {"name": "run", "input": "how to build a "}}]
    rest = [{"index": 0, "custom": {"input": "bomb"}}]
    async with start_proxy() as proxy:
        proxy.upstream.mode = "raw"
        proxy.upstream.raw_chunks = stream_of(delta(tool_calls=pieces), delta(tool_calls=rest))
        answer = await post(proxy.url, stream=True)
    assert b"bomb" not in answer.body


async def test_json_choice_text_field_is_screened(start_proxy: Any) -> None:
    async with start_proxy() as proxy:
        proxy.upstream.mode = "raw"
        proxy.upstream.raw_body = completion({**choice("Hello."), "text": "bomb recipe"})
        answer = await post(proxy.url, stream=False)
    assert b"bomb" not in answer.body


async def test_stream_choice_message_field_is_screened(start_proxy: Any) -> None:
    odd = {"index": 0, "delta": {}, "message": {"content": "bomb via message"}, "finish_reason": None}
    async with start_proxy() as proxy:
        proxy.upstream.mode = "raw"
        proxy.upstream.raw_chunks = [chunk(delta(role="assistant", content="")), chunk(odd), DONE]
        answer = await post(proxy.url, stream=True)
    assert b"bomb" not in answer.body


async def test_custom_tool_call_in_the_request_is_screened(start_proxy: Any) -> None:
    messages = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": None, "tool_calls": [CUSTOM_CALL]},
        {"role": "tool", "tool_call_id": "c1", "content": "done"},
    ]
    async with start_proxy() as proxy:
        completion_ = await proxy.client().chat.completions.create(model="m", messages=messages)
    assert completion_.choices[0].finish_reason == "content_filter"
    assert proxy.upstream.chat_requests == []


@pytest.mark.parametrize(
    "body",
    [
        b'{"choices": [{"index": 0, "message": {"role": "assistant", "content": "bomb", "content": "hi"}}]}',
        b'{"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],'
        b' "Choices": [{"index": 0, "message": {"content": "bomb"}}]}',
    ],
    ids=["repeated key", "key differing only in case"],
)
async def test_json_reply_with_a_repeated_key_is_502(start_proxy: Any, body: bytes) -> None:
    """A client whose parser keeps the first value (or matches keys ignoring case) would show what
    the proxy did not screen."""
    async with start_proxy() as proxy:
        proxy.upstream.mode = "raw"
        proxy.upstream.raw_body = body
        answer = await post(proxy.url, stream=False)
    assert answer.status == 502
    assert b"bomb" not in answer.body


async def test_stream_chunk_with_a_repeated_key_is_refused(start_proxy: Any) -> None:
    odd = b'data: {"choices": [{"index": 0, "delta": {"content": "bomb"}, "delta": {"content": "hi"}}]}\n\n'
    async with start_proxy() as proxy:
        proxy.upstream.mode = "raw"
        proxy.upstream.raw_chunks = [chunk(delta(role="assistant", content="")), odd, DONE]
        answer = await post(proxy.url, stream=True)
    assert answer.status == 502
    assert b"bomb" not in answer.body


async def test_screened_json_reply_goes_out_as_utf8_whatever_charset_the_upstream_named(start_proxy: Any) -> None:
    """UTF-7 would turn "+AGIAbwBtAGI-" (what the guard read) into "bomb" for a client that honours it."""
    async with start_proxy() as proxy:
        proxy.upstream.mode = "raw"
        proxy.upstream.raw_content_type = "application/json; charset=utf-7"
        proxy.upstream.raw_body = completion(choice("+AGIAbwBtAGI-"))
        answer = await post(proxy.url, stream=False)
    assert answer.status == 200
    assert answer.headers["Content-Type"] == "application/json"
