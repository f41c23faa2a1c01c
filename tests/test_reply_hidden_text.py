"""Reply text beside the message that a client may still show: a chat choice's `logprobs` (alternative
tokens, tokens or bytes that spell something other than the content, the refusal's tokens) and the
strings of unknown top-level fields of a chat or legacy completion. Driven through the real path (raw
aiohttp -> the proxy -> the fake upstream sending those fields) with the scripted trigger-word guards,
as a JSON reply, a held stream and an incremental stream: a trigger found only there is blocked and
not one byte of it reaches the client; a benign reply with them passes byte for byte."""

from __future__ import annotations

import io
import json
from typing import Any

import aiohttp
import pytest

from tests.conftest import DEFAULT_POLICY
from tests.fakes.upstream import FakeUpstream

TRIGGER = "bomb"  # the scripted Llama Guard flags it in any turn
REFUSAL = "Blocked by policy."
POLICY = DEFAULT_POLICY.replace(
    'match: {path: /v1/chat/completions, model: "*"}',
    'match: {path: [/v1/chat/completions, /v1/completions], model: "*"}',
)
INCREMENTAL = POLICY.replace(
    f'refusal: "{REFUSAL}"', f'refusal: "{REFUSAL}"\n  stream: incremental\n  release_tokens: 4'
)
BASE = {"id": "chatcmpl-x", "created": 1, "model": "m", "system_fingerprint": "fp"}
MODES = ["json", "buffer", "incremental"]


def entry(token: str, *alternatives: str, spelled: bytes | None = None) -> dict[str, Any]:
    """One chat token entry: `bytes` spell `spelled` (the token by default)."""
    said = list(spelled if spelled is not None else token.encode())
    top = [{"token": t, "logprob": -1.0, "bytes": list(t.encode())} for t in (token, *alternatives)]
    return {"token": token, "logprob": -0.1, "bytes": said, "top_logprobs": top}


# (content, logprobs, top-level fields): the trigger is in none of the content.
HIDDEN: dict[str, tuple[str, Any, dict[str, Any]]] = {
    "top-logprobs": ("Fine.", {"content": [entry("Fine", TRIGGER), entry(".")], "refusal": None}, {}),
    "tokens-other-than-the-content": ("Fine.", {"content": [entry("A "), entry(TRIGGER)], "refusal": None}, {}),
    "bytes-other-than-the-content": (
        "Fine.",
        {"content": [entry("Fine", spelled=b"a " + TRIGGER.encode()), entry(".")], "refusal": None},
        {},
    ),
    "alternative-bytes-other-than-its-token": (
        "Fine.",
        {"content": [{**entry("Fine."), "top_logprobs": [{"token": "Fine.", "bytes": list(TRIGGER.encode())}]}]},
        {},
    ),
    "refusal-tokens": ("Fine.", {"content": [entry("Fine"), entry(".")], "refusal": [entry(TRIGGER)]}, {}),
    "logprobs-not-an-object": ("Fine.", f"a {TRIGGER}", {}),
    "unknown-top-level-field": ("Fine.", None, {"vendor_note": f"a {TRIGGER} recipe"}),
    "nested-top-level-field": ("Fine.", None, {"vendor_extra": {"notes": [f"a {TRIGGER}"]}}),
}
BENIGN_LOGPROBS = {"content": [entry("Hello", "Hi"), entry(" there", " friend")], "refusal": None}
BENIGN_TOP = {"vendor_extra": {"kept": True, "note": "served by the fake"}, "service_tier": "default"}


def completion(content: str, logprobs: Any, top: dict[str, Any]) -> dict[str, Any]:
    message = {"role": "assistant", "content": content, "refusal": None}
    choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": "stop"}
    return {**BASE, "object": "chat.completion", "choices": [choice], **top}


def chunks(content: str, logprobs: Any, top: dict[str, Any]) -> list[bytes]:
    """A stream: the top-level fields in an event of their own before the text, the logprobs with it."""

    def event(choices: list[dict[str, Any]], **fields: Any) -> bytes:
        body = {**BASE, "object": "chat.completion.chunk", "choices": choices, **fields}
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    def choice(delta: dict[str, Any], finish: str | None = None, **fields: Any) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish, **fields}

    out = [event([choice({"role": "assistant", "content": ""})])]
    if top:
        out.append(event([], **top))
    out.append(event([choice({"content": content}, logprobs=logprobs)]))
    out += [event([choice({}, "stop")]), b"data: [DONE]\n\n"]
    return out


def serve(upstream: FakeUpstream, body: dict[str, Any], events: list[bytes]) -> None:
    upstream.mode = "raw"
    upstream.raw_body = json.dumps(body).encode()
    upstream.raw_chunks = list(events)


async def ask(proxy: Any, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
    data = io.BytesIO(json.dumps(body).encode())
    headers = {"Authorization": "Bearer k", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http, http.post(proxy.url + path, data=data, headers=headers) as resp:
        return resp.status, await resp.read()


def events_of(answer: bytes) -> bytes:
    """A stream's data events, without the proxy's keep-alive comments."""
    return b"".join(block + b"\n\n" for block in answer.split(b"\n\n") if block.startswith(b"data:"))


def choice_indexes(answer: bytes) -> set[int]:
    events = [block[5:] for block in events_of(answer).split(b"\n\n") if block.startswith(b"data:")]
    return {c["index"] for data in events if data.strip() != b"[DONE]" for c in json.loads(data)["choices"]}


def chat_request(mode: str) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "logprobs": True, "stream": mode != "json"}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(HIDDEN))
async def test_chat_text_beside_the_message_is_screened(
    start_proxy: Any, upstream: FakeUpstream, case: str, mode: str
) -> None:
    """A trigger only in a choice's logprobs or an unknown top-level field went to the client unread
    (chat read `logprobs` as a mirror of the content and never read top-level fields)."""
    content, logprobs, top = HIDDEN[case]
    serve(upstream, completion(content, logprobs, top), chunks(content, logprobs, top))
    async with start_proxy(policies={"default": INCREMENTAL if mode == "incremental" else POLICY}) as proxy:
        status, answer = await ask(proxy, "/v1/chat/completions", chat_request(mode))
    assert status == 200
    assert REFUSAL.encode() in answer
    assert TRIGGER.encode() not in answer
    assert json.dumps(list(TRIGGER.encode()))[1:-1].encode() not in answer  # its bytes, as a client decodes
    assert b"vendor_" not in answer  # a blocked reply keeps no unknown top-level field
    if mode != "json":  # the refusal answers the one choice there is
        assert choice_indexes(answer) == {0}


@pytest.mark.parametrize("mode", MODES)
async def test_benign_logprobs_and_vendor_fields_pass_byte_for_byte(
    start_proxy: Any, upstream: FakeUpstream, mode: str
) -> None:
    """Reading logprobs and top-level fields changes nothing for a reply that passes: the client gets
    the upstream's bytes."""
    body = completion("Hello there", BENIGN_LOGPROBS, BENIGN_TOP)
    events = chunks("Hello there", BENIGN_LOGPROBS, BENIGN_TOP)
    serve(upstream, body, events)
    async with start_proxy(policies={"default": INCREMENTAL if mode == "incremental" else POLICY}) as proxy:
        status, answer = await ask(proxy, "/v1/chat/completions", chat_request(mode))
    assert status == 200
    if mode == "json":
        assert answer == upstream.raw_body
    else:
        assert events_of(answer) == b"".join(events)


async def test_a_blocked_choice_takes_the_top_level_fields_with_it(start_proxy: Any, upstream: FakeUpstream) -> None:
    """With n=2 and one choice blocked by the vendor text read with it, the other choice is kept and the
    unknown field is not: every choice's check read it, the blocked one's too."""
    body = completion("Fine.", None, {"vendor_note": "benign words"})
    second = {**body["choices"][0], "index": 1, "message": {"role": "assistant", "content": f"a {TRIGGER}"}}
    body["choices"].append(second)
    serve(upstream, body, [])
    request = {**chat_request("json"), "n": 2}
    async with start_proxy(policies={"default": POLICY}) as proxy:
        status, answer = await ask(proxy, "/v1/chat/completions", request)
    reply = json.loads(answer)
    assert status == 200
    assert [c["message"]["content"] for c in reply["choices"]] == ["Fine.", REFUSAL]
    assert "vendor_note" not in reply
    assert reply["id"] == "chatcmpl-x" and reply["system_fingerprint"] == "fp"


@pytest.mark.parametrize("stream", [False, True])
async def test_completion_top_level_field_is_screened(start_proxy: Any, upstream: FakeUpstream, stream: bool) -> None:
    """A legacy completion's (or chunk's) unknown top-level field reached the client unread."""
    choice = {"text": "Fine.", "index": 0, "logprobs": None, "finish_reason": "stop"}
    reply = {**BASE, "object": "text_completion", "choices": [choice], "vendor_note": f"a {TRIGGER}"}
    serve(upstream, reply, [b"data: " + json.dumps(reply).encode() + b"\n\n", b"data: [DONE]\n\n"])
    async with start_proxy(policies={"default": POLICY}) as proxy:
        status, answer = await ask(proxy, "/v1/completions", {"model": "m", "prompt": "Hi", "stream": stream})
    assert status == 200
    assert REFUSAL.encode() in answer
    assert TRIGGER.encode() not in answer
    assert b"vendor_note" not in answer


def stream_of(*events: dict[str, Any]) -> list[bytes]:
    chunk = {**BASE, "object": "chat.completion.chunk"}
    return [b"data: " + json.dumps({**chunk, **e}).encode() + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]


def said(index: int, content: str, finish: str | None = None) -> dict[str, Any]:
    return {"index": index, "delta": {"content": content}, "logprobs": None, "finish_reason": finish}


async def test_a_field_repeated_in_every_chunk_is_read_once(start_proxy: Any, upstream: FakeUpstream) -> None:
    """A router's `provider` in every chunk is one string a client sees, not a word per chunk in what
    the guard reads; the stream still passes byte for byte."""
    events = stream_of(*({"choices": [said(0, word)], "provider": "fakeprov"} for word in ("Hel", "lo ", "there")))
    serve(upstream, {}, events)
    async with start_proxy(policies={"default": POLICY}) as proxy:
        status, answer = await ask(proxy, "/v1/chat/completions", chat_request("buffer"))
        guard = proxy.guards["llama_guard"]
    assert status == 200
    assert events_of(answer) == b"".join(events)
    agent = [t.text for turns, _ in guard.calls for t in turns if t.speaker == "Agent"]
    assert agent == ["Hello there\nfakeprov"]


@pytest.mark.parametrize("policy", [POLICY, INCREMENTAL], ids=["buffer", "incremental"])
async def test_a_blocked_choice_takes_the_chunks_top_level_fields_with_it(
    start_proxy: Any, upstream: FakeUpstream, policy: str
) -> None:
    """n=2 streamed, choice 1 blocked: choice 0's events go out, without the unknown top-level field
    that choice 1's check read too; choice 1 is refused."""
    events = stream_of(
        {"choices": [said(0, "Fine and well. "), said(1, f"a {TRIGGER} recipe. ")], "vendor_note": "benign words"},
        {"choices": [said(0, "", "stop"), said(1, "", "stop")]},
    )
    serve(upstream, {}, events)
    async with start_proxy(policies={"default": policy}) as proxy:
        status, answer = await ask(proxy, "/v1/chat/completions", {**chat_request("buffer"), "n": 2})
    assert status == 200
    assert TRIGGER.encode() not in answer and b"vendor_note" not in answer
    assert b"Fine and well. " in answer and REFUSAL.encode() in answer
    assert choice_indexes(answer) == {0, 1}
