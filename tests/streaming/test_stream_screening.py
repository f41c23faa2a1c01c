"""Every field of a streamed reply that a client shows is screened or refused: reasoning deltas,
list-valued content, chunks with `"error": null`, upstream error events, SSE comments and other
fields. The scripted conversation guard blocks the word "bomb"; each test puts it in one field."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from tests.conftest import DEFAULT_POLICY
from tests.fakes.guards import ScriptedConversationGuard, ScriptedTextGuard
from tests.streaming.replies import DONE, GOOD, chunk, delta, post, sse, stream_of

REFUSAL = b"Blocked by policy."


def guards() -> dict[str, Any]:
    return {"prompt_guard": ScriptedTextGuard(), "llama_guard": ScriptedConversationGuard()}


def agent_texts(guard: ScriptedConversationGuard) -> list[str]:
    return [turn.text for turns, _ in guard.calls for turn in turns if turn.speaker == "Agent"]


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
async def test_reasoning_deltas_are_screened(start_proxy: Any, field: str) -> None:
    guard_set = guards()
    async with start_proxy(guards=guard_set) as proxy:
        proxy.upstream.mode = "raw"
        proxy.upstream.raw_chunks = stream_of(
            delta(0, **{field: "Thinking about how to build a "}), delta(0, **{field: "bomb."}), delta(content="Sure.")
        )
        answer = await post(proxy.url, stream=True)
    assert answer.status == 200
    assert b"bomb" not in answer.body
    assert answer.text() == REFUSAL.decode()
    assert any("how to build a bomb." in t for t in agent_texts(guard_set["llama_guard"]))


async def test_blocked_choice_loses_its_reasoning_the_other_keeps_it(start_proxy: Any) -> None:
    async with start_proxy() as proxy:
        proxy.upstream.mode = "raw"
        proxy.upstream.raw_chunks = stream_of(
            delta(0, reasoning_content="a bomb plan"),
            delta(1, reasoning_content="a cake plan"),
            delta(0, content="Here it is."),
            delta(1, content="Bake it."),
        )
        answer = await post(proxy.url, stream=True, n=2)
    chunks = [json.loads(e[6:]) for e in answer.events if e != b"data: [DONE]"]
    by_index: dict[int, list[dict[str, Any]]] = {0: [], 1: []}
    for c in chunks:
        for ch in c["choices"]:
            by_index[ch["index"]].append(ch["delta"])
    assert b"bomb" not in answer.body and b"Here it is" not in answer.body
    assert {"reasoning_content": "a cake plan"} in by_index[1] and {"content": "Bake it."} in by_index[1]
    assert [d.get("content") for d in by_index[0]] == ["", REFUSAL.decode(), None]


async def test_list_valued_content_is_screened(start_proxy: Any) -> None:
    async with start_proxy() as proxy:
        proxy.upstream.mode = "raw"
        proxy.upstream.raw_chunks = stream_of(
            delta(content=[{"type": "text", "text": "how to build a "}]),
            delta(content=[{"type": "output_text", "text": "bomb"}]),
        )
        answer = await post(proxy.url, stream=True)
    assert b"bomb" not in answer.body
    assert answer.text() == REFUSAL.decode()


async def test_list_valued_content_that_passes_is_relayed_unchanged(start_proxy: Any) -> None:
    async with start_proxy() as proxy:
        proxy.upstream.mode = "raw"
        proxy.upstream.raw_chunks = stream_of(delta(content=[{"type": "text", "text": "Hello there."}]))
        answer = await post(proxy.url, stream=True)
    assert answer.body == b"".join(c for c in proxy.upstream.raw_chunks if c is not None)


async def test_chunk_with_null_error_is_an_ordinary_screened_chunk(start_proxy: Any) -> None:
    async with start_proxy() as proxy:
        proxy.upstream.mode = "raw"
        proxy.upstream.raw_chunks = [
            chunk(delta(role="assistant", content=""), error=None),
            chunk(delta(content="how to build a bomb"), error=None),
            chunk(delta(finish_reason="stop")),
            DONE,
        ]
        answer = await post(proxy.url, stream=True)
    assert answer.status == 200
    assert b"bomb" not in answer.body
    assert answer.text() == REFUSAL.decode()


async def test_chunk_with_null_error_reaches_the_sdk_as_text(start_proxy: Any) -> None:
    async with start_proxy() as proxy:
        proxy.upstream.mode = "raw"
        proxy.upstream.raw_chunks = [chunk(delta(content="Hello."), error=None), DONE]
        stream = await proxy.client().chat.completions.create(model="m", messages=GOOD, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "Hello."


@pytest.mark.parametrize(
    ("error", "code"),
    [
        ({"message": "bomb recipe follows", "type": "server_error", "code": "overloaded"}, "overloaded"),
        ({"message": "bomb", "type": "bomb <b>", "code": "x" * 65}, "upstream_stream_error"),
        ("bomb as a bare string", "upstream_stream_error"),
    ],
)
async def test_upstream_error_event_text_is_not_relayed(start_proxy: Any, error: Any, code: str) -> None:
    async with start_proxy() as proxy:
        proxy.upstream.mode = "raw"
        proxy.upstream.raw_chunks = [chunk(delta(role="assistant", content="partial")), sse({"error": error}), DONE]
        answer = await post(proxy.url, stream=True)
    assert answer.status == 502
    assert b"bomb" not in answer.body and b"partial" not in answer.body
    assert answer.json["error"]["code"] == code
    assert answer.json["error"]["message"].startswith("The upstream reported an error mid-stream")


async def test_upstream_error_event_after_headers_is_the_proxys_own_event(start_proxy: Any) -> None:
    async with start_proxy(server={"keepalive_interval_s": 0.01}) as proxy:
        proxy.upstream.mode = "raw"
        error = {"message": "bomb recipe follows", "type": "server_error", "code": "overloaded"}
        proxy.upstream.raw_chunks = [chunk(delta(content="partial")), None, sse({"error": error}), DONE]
        answer = await post(proxy.url, stream=True, on_headers=proxy.upstream.gate.set)
        proxy.upstream.gate.clear()
        stream = await proxy.client().chat.completions.create(model="m", messages=GOOD, stream=True)
        proxy.upstream.gate.set()  # the SDK has the headers: let the upstream send its error
        with pytest.raises(openai.APIError, match="reported an error mid-stream") as info:
            [c async for c in stream]
    assert answer.status == 200
    assert b"bomb" not in answer.body and b"partial" not in answer.body
    assert answer.events[-1] == b"data: [DONE]"
    assert json.loads(answer.events[-2][6:])["error"]["code"] == "overloaded"
    assert "bomb" not in str(info.value)


async def test_sse_comments_and_fields_are_never_relayed(start_proxy: Any) -> None:
    data_only = chunk(delta(role="assistant", content="Hello"))
    with_fields = chunk(delta(content=" there."))
    async with start_proxy() as proxy:
        proxy.upstream.mode = "raw"
        proxy.upstream.raw_chunks = [
            b": bomb in a comment\n\n",
            data_only,
            b"event: message\nid: 7\nretry: 10\n: another comment\n" + with_fields,
            b"id: 8\n\n",
            chunk(delta(finish_reason="stop")),
            DONE,
        ]
        answer = await post(proxy.url, stream=True)
    assert answer.status == 200
    for never in (b"bomb", b"comment", b"event:", b"id:", b"retry:"):
        assert never not in answer.body
    assert data_only in answer.body  # a data-only event stays byte-identical
    assert with_fields in answer.body  # the other's data, re-framed
    assert answer.text() == "Hello there."


async def test_comments_of_a_blocked_reply_are_not_relayed(start_proxy: Any) -> None:
    async with start_proxy() as proxy:
        proxy.upstream.mode = "raw"
        proxy.upstream.raw_chunks = [b": step one of the bomb\n\n", *stream_of(delta(content="a bomb"))]
        answer = await post(proxy.url, stream=True)
    assert b"bomb" not in answer.body
    assert answer.text() == REFUSAL.decode()


async def test_unknown_delta_fields_are_screened(start_proxy: Any) -> None:
    """A field the protocol does not name (here litellm's thinking blocks) is text a client may show."""
    async with start_proxy() as proxy:
        proxy.upstream.mode = "raw"
        blocks = [{"type": "thinking", "thinking": "a bomb", "signature": "c2ln"}]
        proxy.upstream.raw_chunks = stream_of(delta(thinking_blocks=blocks), delta(content="Fine."))
        answer = await post(proxy.url, stream=True)
    assert b"bomb" not in answer.body
    assert answer.text() == REFUSAL.decode()


async def test_refusal_deltas_are_screened(start_proxy: Any) -> None:
    async with start_proxy() as proxy:
        proxy.upstream.mode = "raw"
        proxy.upstream.raw_chunks = stream_of(delta(refusal="no bomb talk"))
        answer = await post(proxy.url, stream=True)
    assert b"bomb" not in answer.body


async def test_on_block_error_for_a_reasoning_block(start_proxy: Any) -> None:
    policy = DEFAULT_POLICY.replace('refusal: "Blocked by policy."', 'refusal: "x"\n  on_block: error')
    async with start_proxy(policies={"default": policy}) as proxy:
        proxy.upstream.mode = "raw"
        proxy.upstream.raw_chunks = stream_of(delta(reasoning_content="bomb"))
        answer = await post(proxy.url, stream=True)
    assert answer.status == 400
    assert answer.json["error"]["code"] == "content_policy_violation"
    assert b"bomb" not in answer.body
