"""Property: whatever request body a client sends, no text a model reads reaches the upstream
unscreened. Random conversations hide a trigger word (in plain, zero-width, full-width and bidi
spellings) in random fields; the scripted Llama Guard blocks the word wherever it sees it. So either
the proxy refuses, or the upstream gets a body without the word in any field a model reads."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.screening.normalize import guard_view
from tests.conftest import DEFAULT_POLICY

TRIGGER = "bomb"
SPELLINGS = ["bomb", "bo\u200bmb", "\uff42\uff4f\uff4d\uff42", "b\u202eom\u202cb", "BO\u2060MB", "b\u00adomb"]
TEXT = st.one_of(st.sampled_from(["hello", "fine words", "", "  ", "tool output 42"]), st.sampled_from(SPELLINGS))
# Keys whose values are identifiers or payloads, never text a model reads (and never a trigger here).
NOT_TEXT = frozenset({"id", "type", "tool_call_id", "url", "format", "data"})
POLICY = DEFAULT_POLICY.replace(
    'refusal: "Blocked by policy."', 'refusal: "Blocked by policy."\n  screen_system: true'
)

PART = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, TEXT),
    st.builds(lambda k, t: {"type": k, "text": t}, st.sampled_from(["input_text", "output_text"]), TEXT),
    st.builds(lambda t: {"type": "thinking", "thinking": t}, TEXT),
    st.builds(lambda t: {"type": "refusal", "refusal": t}, TEXT),
    st.just({"type": "image_url", "image_url": {"url": "https://example.invalid/a.png"}}),
    st.just({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}),
    st.builds(lambda t: {"type": "video_text", "text": t}, TEXT),
)
CONTENT = st.one_of(TEXT, st.lists(PART, min_size=1, max_size=3))
TOOL_CALLS = st.lists(
    st.builds(
        lambda name, args: {"id": "call_1", "type": "function", "function": {"name": name, "arguments": args}},
        st.sampled_from(["lookup", "run"]),
        TEXT,
    ),
    max_size=2,
)
EXTRAS = st.fixed_dictionaries(
    {},
    optional={
        "reasoning_content": TEXT,
        "reasoning": TEXT,
        "name": TEXT,
        "vendor_note": st.one_of(TEXT, st.fixed_dictionaries({"text": TEXT}), st.lists(TEXT, max_size=2)),
    },
)


@st.composite
def messages(draw: st.DrawFn) -> list[dict[str, Any]]:
    out = []
    for _ in range(draw(st.integers(min_value=1, max_value=5))):
        role = draw(st.sampled_from(["user", "assistant", "tool", "system", "developer"]))
        message: dict[str, Any] = {"role": role, "content": draw(CONTENT), **draw(EXTRAS)}
        if role == "assistant" and draw(st.booleans()):
            message["tool_calls"] = draw(TOOL_CALLS)
            message["content"] = draw(st.one_of(st.none(), CONTENT))
        if role == "tool":
            message["tool_call_id"] = "call_1"
        out.append(message)
    return out


def read_texts(value: Any, key: str = "") -> list[str]:
    """Every string of the forwarded messages a model could read."""
    if key in NOT_TEXT:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [t for k, v in value.items() for t in read_texts(v, k)]
    if isinstance(value, list):
        return [t for v in value for t in read_texts(v, key)]
    return []


def carries_trigger(text: str) -> bool:
    return TRIGGER in guard_view(text).lower()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(conversation=messages(), stream=st.booleans(), tool_text=st.one_of(st.none(), TEXT))
async def test_no_unscreened_text_reaches_the_upstream(
    start_proxy: Any, conversation: list[dict[str, Any]], stream: bool, tool_text: str | None
) -> None:
    tools = [] if tool_text is None else [{"type": "function", "function": {"name": "f", "description": tool_text}}]
    body = json.dumps({"model": "gpt-fake", "messages": conversation, "stream": stream, "tools": tools}).encode()
    async with start_proxy(policies={"default": POLICY}) as proxy:
        before = len(proxy.upstream.chat_requests)  # the fake upstream lives across examples
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                proxy.url + "/v1/chat/completions",
                data=body,
                headers={"Content-Type": "application/json", "Authorization": "Bearer k"},
            ) as resp,
        ):
            status, answer = resp.status, await resp.read()
        forwarded = [r.json for r in proxy.upstream.chat_requests[before:]]
    assert status < 500, answer
    for sent in forwarded:
        leaked = [t for t in read_texts([sent["messages"], sent["tools"]]) if carries_trigger(t)]
        assert not leaked, f"unscreened text reached the upstream: {leaked!r}"
    assert not carries_trigger(answer.decode("utf-8", "replace"))


# Reply side: random upstream replies (JSON and SSE) hide the trigger in random fields; the client
# must never see it, whatever the shape (a shape the output check cannot read is a 502).
STEXT = st.one_of(st.sampled_from(["Paris", "fine", "", " "]), st.sampled_from(SPELLINGS))
DELTA = st.fixed_dictionaries(
    {},
    optional={
        "role": st.just("assistant"),
        "content": st.one_of(STEXT, st.none(), st.lists(st.builds(lambda t: {"type": "text", "text": t}, STEXT))),
        "reasoning_content": STEXT,
        "reasoning": STEXT,
        "refusal": st.one_of(STEXT, st.none()),
        "tool_calls": st.lists(
            st.fixed_dictionaries(
                {"index": st.integers(0, 1)},
                optional={
                    "function": st.fixed_dictionaries(
                        {},
                        optional={
                            "name": STEXT,
                            "arguments": st.one_of(STEXT, STEXT, STEXT, st.fixed_dictionaries({"q": STEXT})),
                        },
                    )
                },
            ),
            max_size=2,
        ),
        "vendor_text": st.one_of(STEXT, st.fixed_dictionaries({"note": STEXT})),
    },
)
CHUNK = st.builds(
    lambda index, delta, finish, extra: {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "m",
        "choices": [{"index": index, "delta": delta, "finish_reason": finish}],
        **extra,
    },
    st.integers(0, 1),
    DELTA,
    st.sampled_from([None, "stop"]),
    st.one_of(
        st.just({}),
        st.just({}),
        st.just({}),
        st.fixed_dictionaries({"error": st.one_of(st.none(), st.fixed_dictionaries({"message": STEXT}))}),
    ),
)
DATA_EVENT = st.builds(lambda c: b"data: " + json.dumps(c, ensure_ascii=False).encode() + b"\n\n", CHUNK)
EVENT = st.one_of(
    DATA_EVENT,
    DATA_EVENT,
    DATA_EVENT,
    st.builds(lambda t: b": " + t.encode() + b"\n\n", STEXT),
    st.builds(lambda t, c: b"event: " + t.encode() + b"\ndata: " + json.dumps(c).encode() + b"\n\n", STEXT, CHUNK),
)
MESSAGE = st.builds(lambda d: {"role": "assistant", **{k: v for k, v in d.items() if k != "tool_calls"}}, DELTA)
COMPLETION = st.builds(
    lambda choices: {
        "id": "c",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [{"index": i, "message": m, "finish_reason": "stop"} for i, m in choices],
    },
    st.lists(st.tuples(st.integers(0, 2), MESSAGE), min_size=1, max_size=3),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    events=st.lists(EVENT, max_size=6),
    done=st.sampled_from([True, True, True, False]),
    completion=COMPLETION,
    stream=st.booleans(),
)
async def test_no_unscreened_text_reaches_the_client(
    start_proxy: Any, events: list[bytes], done: bool, completion: dict[str, Any], stream: bool
) -> None:
    async with start_proxy(policies={"default": POLICY}) as proxy:
        proxy.upstream.mode = "raw"
        proxy.upstream.raw_chunks = [*events, *([b"data: [DONE]\n\n"] if done else [])]
        proxy.upstream.raw_body = json.dumps(completion, ensure_ascii=False).encode()
        body = json.dumps({"model": "gpt-fake", "messages": [{"role": "user", "content": "hi"}], "stream": stream})
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                proxy.url + "/v1/chat/completions",
                data=body.encode(),
                headers={"Content-Type": "application/json", "Authorization": "Bearer k"},
            ) as resp,
        ):
            status, answer = resp.status, await resp.read()
    assert status < 500 or status in (502, 504), answer
    leaked = [t for t in client_texts(answer) if carries_trigger(t)]
    assert not leaked, f"unscreened text reached the client: {leaked!r}"


def client_texts(answer: bytes) -> list[str]:
    """The raw text of the answer and every string inside its JSON (escaped or not)."""
    text = answer.decode("utf-8", "replace")
    found = [text]
    try:
        found += read_texts(json.loads(text))
    except ValueError:
        for line in text.splitlines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                found += read_texts(json.loads(line[5:]))
    return found
