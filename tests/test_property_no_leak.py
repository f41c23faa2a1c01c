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
@given(conversation=messages(), stream=st.booleans())
async def test_no_unscreened_text_reaches_the_upstream(
    start_proxy: Any, conversation: list[dict[str, Any]], stream: bool
) -> None:
    body = json.dumps({"model": "gpt-fake", "messages": conversation, "stream": stream}).encode()
    async with start_proxy(policies={"default": POLICY}) as proxy:
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                proxy.url + "/v1/chat/completions",
                data=body,
                headers={"Content-Type": "application/json", "Authorization": "Bearer k"},
            ) as resp,
        ):
            status, answer = resp.status, await resp.read()
        forwarded = [r.json for r in proxy.upstream.chat_requests]
    assert status < 500, answer
    for sent in forwarded:
        leaked = [t for t in read_texts(sent["messages"]) if carries_trigger(t)]
        assert not leaked, f"unscreened text reached the upstream: {leaked!r}"
    assert not carries_trigger(answer.decode("utf-8", "replace"))
