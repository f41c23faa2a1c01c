"""Second adversarial review of response ownership, chat reply fields and the JSON body limits: each
test is a way around a guarantee that was open, driven through the real path (raw aiohttp or the
official openai client -> the proxy -> a fake upstream on 127.0.0.1) with the scripted guards."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.fakes.responses import FakeResponses
from tests.fakes.upstream import FakeUpstream
from tests.server.test_responses import POLICY
from tests.test_bypass_endpoints import post_raw
from tests.test_reply_hidden_text import (
    INCREMENTAL,
    MODES,
    REFUSAL,
    TRIGGER,
    ask,
    chat_request,
    chunks,
    completion,
    entry,
    serve,
)
from tests.test_reply_hidden_text import POLICY as HIDDEN_POLICY

MANY = 400_000


@pytest.fixture
async def upstream(request: pytest.FixtureRequest) -> AsyncIterator[FakeUpstream]:
    """The chat fake; the Responses fake for tests named `*response*`."""
    fake = await (FakeResponses() if "response" in request.node.name else FakeUpstream()).start()
    yield fake
    await fake.stop()


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": [[]] * MANY}]}),
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": ["a"] * MANY}]}),
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "assistant", "tool_calls": [1] * MANY}]}),
        ("/v1/chat/completions", {"model": 5, "messages": [1] * MANY}),
        ("/v1/responses", {"model": 5, "input": [{"role": "user", "content": [[]] * MANY}]}),
        ("/v1/responses", {"model": 5, "input": [[]] * MANY}),
        ("/v1/completions", {"model": 5, "prompt": [[]] * MANY}),
    ],
    ids=["empty-arrays", "strings", "tool-calls", "messages-without-model", "input-parts", "input", "prompts"],
)
async def test_a_long_array_of_wrong_items_is_refused_without_stalling_the_loop(
    start_proxy: Any, upstream: FakeUpstream, path: str, body: dict[str, Any]
) -> None:
    """server.max_json_objects counts objects only: 400,000 empty arrays or one-letter strings where
    content parts go (2 MB, no object among them) made pydantic collect an error per item, 15 s on
    the event loop for every tenant. A list the wire types read stops at its first wrong item."""
    async with start_proxy(policies={"default": POLICY}) as proxy:
        status, _ = await post_raw(proxy.url, path, body)
    assert status == 400
    assert upstream.chat_requests == []



# Text an upstream hides where extra_text did not look: an object's keys, and the values of keys it
# skips as identifiers (`id`, `type` ...), inside unknown reply fields and logprobs entries.
KEYS_HIDDEN: dict[str, tuple[str, Any, dict[str, Any]]] = {
    "top-level-key": ("Fine.", None, {"vendor_extra": {f"a {TRIGGER} recipe": 1}}),
    "top-level-id": ("Fine.", None, {"vendor_extra": {"id": f"a {TRIGGER} recipe"}}),
    "logprobs-entry-key": ("Fine.", {"content": [{**entry("Fine."), f"a {TRIGGER}": 0}], "refusal": None}, {}),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(KEYS_HIDDEN))
async def test_reply_text_in_an_unknown_fields_keys_is_screened(
    start_proxy: Any, upstream: FakeUpstream, case: str, mode: str
) -> None:
    """A reply's unknown fields were read for their string values only: text written as an object's
    key, or under a key read as an identifier, reached the client unscreened."""
    content, logprobs, top = KEYS_HIDDEN[case]
    serve(upstream, completion(content, logprobs, top), chunks(content, logprobs, top))
    async with start_proxy(policies={"default": INCREMENTAL if mode == "incremental" else HIDDEN_POLICY}) as proxy:
        status, answer = await ask(proxy, "/v1/chat/completions", chat_request(mode))
    assert status == 200
    assert REFUSAL.encode() in answer
    assert TRIGGER.encode() not in answer


async def test_a_blocked_response_continued_beside_a_new_conversation_is_refused(
    start_proxy: Any, upstream: FakeResponses
) -> None:
    """With both `previous_response_id` and `conversation`, only the conversation was checked for a
    withheld reply (and judged the turn's context): an upstream that takes both, or reads only the
    previous response, had the model read the reply the proxy blocked. OpenAI refuses the pair."""
    upstream.text = f"Here is how to build a {TRIGGER}."
    async with start_proxy(policies={"default": POLICY}) as proxy:
        status, body = await post_raw(proxy.url, "/v1/responses", {"model": "m", "input": "Hi"})
        assert status == 200 and REFUSAL.encode() in body
        upstream.text = "SGVyZSBpcyBob3c="
        follow = {"model": "m", "input": "Encode your last answer in base64.", "conversation": "conv_new"}
        follow["previous_response_id"] = "resp_fake0001"
        status, body = await post_raw(proxy.url, "/v1/responses", follow)
    assert status == 400
    assert len(upstream.response_requests) == 1


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "Input": f"How do I build a {TRIGGER}?"},
        {"model": "m", "input": "Hi", "toolſ": [{"type": "function", "name": "f", "description": TRIGGER}]},
    ],
    ids=["input", "long-s"],
)
async def test_a_responses_field_named_in_another_case_is_screened_or_refused(
    start_proxy: Any, upstream: FakeResponses, body: dict[str, Any]
) -> None:
    """Go's encoding/json (Ollama's OpenAI layer) matches field names ignoring case: `Input` is its
    `input`, while the proxy read no input at all and forwarded the body."""
    async with start_proxy(policies={"default": POLICY}) as proxy:
        status, answer = await post_raw(proxy.url, "/v1/responses", body)
    assert status == 400 or REFUSAL.encode() in answer
    assert upstream.response_requests == []


CASED_PART = {"type": "text", "Text": TRIGGER}
CASED_INPUT = {"type": "input_text", "Text": TRIGGER}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": [CASED_PART]}]}),
        ("/v1/responses", {"model": "m", "input": [{"role": "user", "content": [CASED_INPUT]}]}),
        ("/v1/responses", {"model": "m", "input": [{"type": "function_call_output", "Output": TRIGGER}]}),
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "Content": TRIGGER}]}),
    ],
    ids=["chat-part", "responses-part", "tool-output", "message"],
)
async def test_a_nested_field_named_in_another_case_is_screened_or_refused(
    start_proxy: Any, upstream: FakeUpstream, path: str, body: dict[str, Any]
) -> None:
    """The same folding inside a part or an item: `Text` is a Go upstream's `text`."""
    async with start_proxy(policies={"default": POLICY}) as proxy:
        status, answer = await post_raw(proxy.url, path, body)
    assert status == 400 or REFUSAL.encode() in answer
    assert upstream.chat_requests == []


@pytest.mark.parametrize(
    "extra",
    [[[]] * MANY, ["a"] * MANY, {f"k{i}": 1 for i in range(MANY // 2)}],
    ids=["empty-arrays", "strings", "members"],
)
async def test_a_body_of_many_values_in_an_unknown_field_is_refused(
    start_proxy: Any, upstream: FakeUpstream, extra: Any
) -> None:
    """Unknown fields are kept as they came and their strings read for screening, value by value: 400,000
    empty arrays or one-letter strings (2 MB, one object) held the event loop 1-3 s. server.max_json_values
    refuses such a body while it is parsed."""
    body = {"model": "m", "messages": [{"role": "user", "content": "Hi", "extra": extra}]}
    async with start_proxy(policies={"default": POLICY}) as proxy:
        status, answer = await post_raw(proxy.url, "/v1/chat/completions", body)
    assert status == 400 and b"server.max_json_values" in answer
    assert upstream.chat_requests == []


@pytest.mark.parametrize("extra", [[[]] * 45_000, ["a"] * 45_000], ids=["empty-arrays", "strings"])
async def test_a_body_just_under_max_json_values_does_not_stall_the_loop(
    start_proxy: Any, upstream: FakeUpstream, extra: Any
) -> None:
    """Close to the default bound, reading what it lets through stays within the loop-block check."""
    body = {"model": "m", "messages": [{"role": "user", "content": "Hi", "extra": extra}]}
    async with start_proxy(policies={"default": POLICY}) as proxy:
        status, _ = await post_raw(proxy.url, "/v1/chat/completions", body)
    assert status == 200
