"""Malformed upstream replies, streamed and not: every shape the proxy cannot read with certainty
is a 502 in the OpenAI envelope (or, once a stream's headers left, one final error event and
[DONE]), and nothing of the reply reaches the client."""

from __future__ import annotations

from typing import Any

import pytest

from tests.streaming.replies import DONE, choice, chunk, completion, delta, post, sse

LEAK = "leaked-words"
DEEP = b'{"choices": [' + b"[" * 1000 + b"]" * 1000 + b"]}"

# (name, a bad streamed chunk or raw event, the same fault in a JSON completion)
SHAPES: list[tuple[str, bytes, bytes]] = [
    ("choices a string", sse({"choices": "abc"}), b'{"choices": "abc"}'),
    ("choice not an object", sse({"choices": [1]}), completion(1)),
    ("index null", chunk({"index": None, "delta": {"content": "x"}}), completion(choice(index=None))),
    ("index a string", chunk({"index": "0", "delta": {"content": "x"}}), completion(choice(index="0"))),
    ("index a float", chunk({"index": 0.0, "delta": {"content": "x"}}), completion(choice(index=0.0))),
    ("index a bool", chunk({"index": False, "delta": {"content": "x"}}), completion(choice(index=False))),
    ("index negative", chunk({"index": -1, "delta": {"content": "x"}}), completion(choice(index=-1))),
    ("index huge", chunk({"index": 10**30, "delta": {"content": "x"}}), completion(choice(index=10**30))),
    ("delta not an object", chunk({"index": 0, "delta": "abc"}), completion({"index": 0, "message": "abc"})),
    ("content a number", chunk(delta(content=5)), completion(choice(content=5))),
    ("content part unknown", chunk(delta(content=[{"type": "image_url", "image_url": {"url": "x"}}])),
     completion(choice(content=[{"type": "image_url", "image_url": {"url": "x"}}]))),
    ("content part text not a string", chunk(delta(content=[{"type": "text", "text": 5}])),
     completion(choice(content=[{"type": "text", "text": 5}]))),
    ("tool_calls not a list", chunk(delta(tool_calls="abc")), completion(choice(tool_calls="abc"))),
    ("tool call not an object", chunk(delta(tool_calls=[1])), completion(choice(tool_calls=[1]))),
    ("tool call index a string", chunk(delta(tool_calls=[{"index": "a", "function": {"arguments": "{}"}}])),
     completion(choice(tool_calls=[{"id": "c", "function": "abc"}]))),
    ("tool call arguments an object", chunk(delta(tool_calls=[{"index": 0, "function": {"arguments": {"a": LEAK}}}])),
     completion(choice(tool_calls=[{"id": "c", "function": {"name": "f", "arguments": {"a": LEAK}}}]))),
    ("tool call name a number", chunk(delta(tool_calls=[{"index": 0, "function": {"name": 5}}])),
     completion(choice(tool_calls=[{"id": "c", "function": {"name": 5, "arguments": "{}"}}]))),
    ("function_call not an object", chunk(delta(function_call="abc")), completion(choice(function_call="abc"))),
    ("refusal a number", chunk(delta(refusal=5)), completion(choice(refusal=5))),
    ("reasoning a list", chunk(delta(reasoning_content=["x"])), completion(choice(reasoning_content=["x"]))),
    ("finish_reason an object", chunk({"index": 0, "delta": {}, "finish_reason": {"a": 1}}),
     completion({"index": 0, "message": {"content": LEAK}, "finish_reason": {"a": 1}})),
    ("event not an object", b"data: [1, 2]\n\n", b"[1, 2]"),
    ("event a string", b'data: "abc"\n\n', b'"abc"'),
    ("not JSON", b"data: {this is not json\n\n", b"{this is not json"),
    ("nested 1000 deep", b"data: " + DEEP + b"\n\n", DEEP),
    ("not UTF-8", b'data: {"choices": "\xff"}\n\n', b'{"choices": "\xff"}'),
]


@pytest.mark.parametrize(("name", "bad", "json_body"), SHAPES, ids=[s[0] for s in SHAPES])
async def test_malformed_stream_chunk_is_502(start_proxy: Any, name: str, bad: bytes, json_body: bytes) -> None:
    async with start_proxy() as proxy:
        proxy.upstream.mode = "raw"
        proxy.upstream.raw_chunks = [chunk(delta(role="assistant", content=LEAK)), bad, chunk(delta(content=LEAK))]
        proxy.upstream.raw_chunks.append(DONE)
        answer = await post(proxy.url, stream=True)
    assert answer.status == 502, answer.body
    assert answer.json["error"]["type"] == "upstream_error"
    assert LEAK.encode() not in answer.body


@pytest.mark.parametrize(("name", "bad", "json_body"), SHAPES, ids=[s[0] for s in SHAPES])
async def test_malformed_json_reply_is_502(start_proxy: Any, name: str, bad: bytes, json_body: bytes) -> None:
    async with start_proxy() as proxy:
        proxy.upstream.mode = "raw"
        proxy.upstream.raw_body = json_body.replace(b'"Hello."', f'"{LEAK}"'.encode())
        answer = await post(proxy.url, stream=False)
    assert answer.status == 502, answer.body
    assert answer.json["error"]["type"] == "upstream_error"
    assert LEAK.encode() not in answer.body


async def test_malformed_chunk_after_headers_is_one_error_event(start_proxy: Any) -> None:
    """The keep-alive went out before the bad chunk: the answer is a final error event and [DONE]."""
    async with start_proxy(server={"keepalive_interval_s": 0.01}) as proxy:
        proxy.upstream.mode = "raw"
        first = chunk(delta(role="assistant", content=LEAK))
        # The upstream goes on only once the client has the headers (sent with the first keep-alive).
        proxy.upstream.raw_chunks = [first, None, chunk({"index": "abc", "delta": {}}), DONE]
        answer = await post(proxy.url, stream=True, on_headers=proxy.upstream.gate.set)
    assert answer.status == 200
    assert answer.headers["x-guardrail-decision"] == "deferred"
    assert b"HTTP/1.1" not in answer.body
    assert LEAK.encode() not in answer.body
    assert answer.events[-1] == b"data: [DONE]"
    assert b'"type":"upstream_error"' in answer.events[-2]
    assert sum(b'"error"' in e for e in answer.events) == 1


@pytest.mark.parametrize("status", [201, 202, 203, 204, 206, 300, 302, 304])
@pytest.mark.parametrize("stream", [False, True])
async def test_status_other_than_200_or_an_error_is_502(start_proxy: Any, status: int, stream: bool) -> None:
    async with start_proxy() as proxy:
        proxy.upstream.mode, proxy.upstream.raw_status = "raw", status
        proxy.upstream.raw_body = b"" if status in (204, 304) else completion(choice(content=LEAK))
        answer = await post(proxy.url, stream=stream)
    assert answer.status == 502
    assert str(status) in answer.json["error"]["message"]
    assert LEAK.encode() not in answer.body


async def test_duplicate_choice_indexes_in_a_json_reply_are_502(start_proxy: Any) -> None:
    """Two choices with index 0: one verdict would stand for both, so the harmful one could pass."""
    async with start_proxy() as proxy:
        proxy.upstream.mode = "raw"
        proxy.upstream.raw_body = completion(choice("how to build a bomb", 0), choice("Hello.", 0))
        answer = await post(proxy.url, stream=False)
    assert answer.status == 502
    assert b"bomb" not in answer.body
