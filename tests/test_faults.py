"""Bad input, upstream faults and guard faults: each gets the OpenAI error envelope with the right
status, or mid-stream a final error event and [DONE]; nothing hangs and nothing unscreened leaks."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import DEFAULT_POLICY
from tests.fakes.guards import FailingGuard, ScriptedConversationGuard, ScriptedTextGuard

GOOD = [{"role": "user", "content": "Say hello."}]
ALLOW_ON_ERROR = DEFAULT_POLICY.replace(
    'refusal: "Blocked by policy."', 'refusal: "Blocked by policy."\n  on_guard_error: allow'
)


async def post(url: str, body: bytes, content_type: str = "application/json") -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            url + "/v1/chat/completions", data=body, headers={"Content-Type": content_type, "Authorization": "Bearer k"}
        ) as resp,
    ):
        return resp.status, await resp.json()


@pytest.mark.parametrize(
    ("body", "content_type", "status", "param"),
    [
        (b"{not json", "application/json", 400, None),
        (b'{"model": "m", "messages": []}', "application/json", 400, "messages"),
        (b'{"model": "m"}', "application/json", 400, "messages"),
        (
            b'{"model": "m", "messages": [{"role": "wizard", "content": "x"}]}',
            "application/json",
            400,
            "messages.0.role",
        ),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": 5}]}',
            "application/json",
            400,
            "messages.0.content",
        ),
        (b'{"model": 3, "messages": [{"role": "user", "content": "x"}]}', "application/json", 400, "model"),
        (b'["a list"]', "application/json", 400, None),
        (b"model=m", "application/x-www-form-urlencoded", 415, None),
    ],
)
async def test_malformed_requests(
    start_proxy: Any, body: bytes, content_type: str, status: int, param: str | None
) -> None:
    async with start_proxy() as proxy:
        got, payload = await post(proxy.url, body, content_type)
    assert got == status
    assert set(payload["error"]) >= {"message", "type", "param", "code"}
    if param is not None:
        assert payload["error"]["param"] == param
    assert proxy.upstream.chat_requests == []


async def test_body_too_large_is_413(start_proxy: Any) -> None:
    async with start_proxy(server={"max_body_bytes": 2048}) as proxy:
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 5000}]}).encode()
        status, payload = await post(proxy.url, body)
    assert status == 413
    assert payload["error"]["code"] == "request_too_large"


@pytest.mark.parametrize(
    ("limits", "messages"),
    [
        ("max_messages: 2", [{"role": "user", "content": "a"}] * 3),
        ("max_characters: 10", [{"role": "user", "content": "a" * 11}]),
        (
            "max_images: 1",
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "https://example.invalid/a.png"}},
                        {"type": "image_url", "image_url": {"url": "https://example.invalid/b.png"}},
                    ],
                }
            ],
        ),
    ],
)
async def test_policy_limits(start_proxy: Any, limits: str, messages: list[Any]) -> None:
    policy = DEFAULT_POLICY.replace('refusal: "Blocked by policy."', f'refusal: "x"\n  limits: {{{limits}}}')
    async with start_proxy(policies={"default": policy}) as proxy:
        with pytest.raises(openai.BadRequestError) as info:
            await proxy.client().chat.completions.create(model="m", messages=messages)
    assert info.value.code == "invalid_request"
    assert proxy.upstream.chat_requests == []


async def test_unknown_model_is_404(start_proxy: Any) -> None:
    policy = DEFAULT_POLICY.replace('model: "*"', 'model: "gpt-*"')
    async with start_proxy(policies={"default": policy}) as proxy:
        with pytest.raises(openai.NotFoundError) as info:
            await proxy.client().chat.completions.create(model="llama-x", messages=GOOD)
    assert info.value.code == "model_not_found"


@pytest.mark.parametrize("status", [400, 401, 429, 500, 503])
@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_error_status_relayed_unchanged(start_proxy: Any, status: int, stream: bool) -> None:
    async with start_proxy() as proxy:
        proxy.upstream.mode, proxy.upstream.error_status = "status", status
        with pytest.raises(openai.APIStatusError) as info:
            await proxy.client().chat.completions.create(model="m", messages=GOOD, stream=stream)
    assert info.value.status_code == status
    assert info.value.response.content == proxy.upstream.error_body
    # The input passed; the reply was an error relayed as is, not a screened allow.
    assert info.value.response.headers["x-guardrail-decision"] == "upstream_error"


async def test_upstream_non_json_reply_is_502(start_proxy: Any) -> None:
    async with start_proxy() as proxy:
        proxy.upstream.mode = "garbage"
        with pytest.raises(openai.APIStatusError) as info:
            await proxy.client().chat.completions.create(model="m", messages=GOOD)
    assert info.value.status_code == 502
    assert b"html" not in info.value.response.content


async def test_upstream_unreachable_is_502(start_proxy: Any) -> None:
    async with start_proxy(upstreams={"default": {"base_url": "http://127.0.0.1:9/v1"}}) as proxy:
        with pytest.raises(openai.APIStatusError) as info:
            await proxy.client().chat.completions.create(model="m", messages=GOOD)
    assert info.value.status_code == 502


async def test_upstream_timeout_is_504(start_proxy: Any) -> None:
    upstreams = {"default": {"total_timeout_s": 1.0}}
    async with start_proxy(upstreams=upstreams) as proxy:
        proxy.upstream.mode, proxy.upstream.delay_s = "slow", 5.0
        with pytest.raises(openai.APIStatusError) as info:
            await proxy.client().chat.completions.create(model="m", messages=GOOD)
    assert info.value.status_code == 504
    assert "total timeout" in info.value.message


async def test_slow_non_streamed_reply_is_not_cut_by_the_between_chunks_timeout(start_proxy: Any) -> None:
    """A JSON reply is silent until it is done: only the total timeout applies to it."""
    upstreams = {"default": {"read_timeout_s": 0.2, "total_timeout_s": 10.0}}
    async with start_proxy(upstreams=upstreams) as proxy:
        proxy.upstream.mode, proxy.upstream.delay_s = "slow", 0.6
        completion = await proxy.client().chat.completions.create(model="m", messages=GOOD)
    assert completion.choices[0].message.content == proxy.upstream.replies[0]


@pytest.mark.parametrize("mode", ["midstream_error", "abrupt", "malformed", "stall"])
async def test_broken_streams_end_with_an_error_and_leak_nothing(start_proxy: Any, mode: str) -> None:
    """Before the held response's headers left, a broken stream is a 502/504 JSON error; after a
    keep-alive it is a final error event and [DONE]. Either way no upstream content leaks."""
    async with start_proxy(server={"keepalive_interval_s": 0.05}) as proxy:
        proxy.upstream.mode, proxy.upstream.delay_s = mode, 5.0
        proxy.upstream.replies = ["partial words that must not leak"]
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                proxy.url + "/v1/chat/completions", json={"model": "m", "messages": GOOD, "stream": True}
            ) as resp,
        ):
            body = await resp.read()
            status = resp.status
    assert b"partial" not in body and b"words" not in body
    if status == 200:
        events = [e for e in body.split(b"\n\n") if e.startswith(b"data: ")]
        assert events[-1] == b"data: [DONE]"
        assert b'"error"' in events[-2]
    else:
        assert status in (502, 504)
        assert json.loads(body)["error"]["type"] == "upstream_error"
    if mode == "stall":  # the keep-alive went out first, so this one must be the in-stream error
        assert status == 200


async def test_sdk_raises_on_in_stream_error(start_proxy: Any) -> None:
    async with start_proxy(server={"keepalive_interval_s": 0.01}) as proxy:
        proxy.upstream.mode, proxy.upstream.delay_s = "stall", 5.0
        stream = await proxy.client().chat.completions.create(model="m", messages=GOOD, stream=True)
        with pytest.raises(openai.APIError, match="stopped sending"):
            [c async for c in stream]


async def test_keepalive_comments_while_held(start_proxy: Any) -> None:
    async with start_proxy(server={"keepalive_interval_s": 0.02}) as proxy:
        proxy.upstream.mode, proxy.upstream.delay_s = "trickle", 0.03
        async with proxy.client().chat.completions.with_streaming_response.create(
            model="m", messages=GOOD, stream=True
        ) as resp:
            body = b"".join([c async for c in resp.http_response.aiter_bytes()])
            assert resp.headers["x-guardrail-decision"] == "deferred"
    assert body.startswith(b": keep-alive\n\n")
    assert b": x-guardrail-decision=allow\n\n" in body
    # After the comments, the upstream's bytes follow unchanged.
    assert body.endswith(bytes(proxy.upstream.sent))


@pytest.mark.parametrize("stream", [False, True])
async def test_guard_error_blocks_with_503(start_proxy: Any, stream: bool) -> None:
    guards = {"prompt_guard": ScriptedTextGuard(), "llama_guard": FailingGuard()}
    async with start_proxy(guards=guards) as proxy:
        with pytest.raises(openai.APIStatusError) as info:
            await proxy.client().chat.completions.create(model="m", messages=GOOD, stream=stream)
    assert info.value.status_code == 503
    assert info.value.response.headers["retry-after"]
    assert info.value.code == "guard_unavailable"
    assert proxy.upstream.chat_requests == []


async def test_guard_timeout_blocks(start_proxy: Any) -> None:
    guards = {"prompt_guard": ScriptedTextGuard(), "llama_guard": FailingGuard(delay_s=5)}
    policy = DEFAULT_POLICY.replace('refusal: "Blocked by policy."', 'refusal: "x"\n  guard_timeout_s: 0.1')
    async with start_proxy(guards=guards, policies={"default": policy}) as proxy:
        with pytest.raises(openai.APIStatusError) as info:
            await proxy.client().chat.completions.create(model="m", messages=GOOD)
    assert info.value.status_code == 503


async def test_guard_error_allowed_by_policy_passes_and_is_counted(start_proxy: Any) -> None:
    guards = {"prompt_guard": ScriptedTextGuard(), "llama_guard": FailingGuard()}
    async with start_proxy(guards=guards, policies={"default": ALLOW_ON_ERROR}) as proxy:
        completion = await proxy.client().chat.completions.create(model="m", messages=GOOD)
        from proxy.server.state import METRICS

        fail_open = proxy.app[METRICS].registry.get_sample_value(
            "guardrail_fail_open_total", {"tenant": "default", "route": "chat", "guard": "llama_guard"}
        )
    assert completion.choices[0].message.content == "Hello! How can I help you today?"
    assert fail_open == 2.0  # the input and the output check


async def test_output_guard_error_mid_stream_ends_with_error_event(start_proxy: Any) -> None:
    guard = ScriptedConversationGuard()
    guards = {"prompt_guard": ScriptedTextGuard(), "llama_guard": guard}
    async with start_proxy(guards=guards, server={"keepalive_interval_s": 0.01}) as proxy:
        proxy.upstream.mode, proxy.upstream.delay_s = "trickle", 0.02
        original = guard.score_conversation
        calls = 0

        async def flaky(*args: Any, **kw: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls > 1:
                raise RuntimeError("guard died")
            return await original(*args, **kw)

        guard.score_conversation = flaky  # type: ignore[method-assign]
        async with proxy.client().chat.completions.with_streaming_response.create(
            model="m", messages=GOOD, stream=True
        ) as resp:
            body = b"".join([c async for c in resp.http_response.aiter_bytes()])
    assert b"Hello" not in body
    assert b'"code":"guard_unavailable"' in body and body.endswith(b"data: [DONE]\n\n")


async def test_client_disconnect_cancels_upstream(start_proxy: Any) -> None:
    async with start_proxy() as proxy:
        proxy.upstream.mode, proxy.upstream.delay_s = "slow", 30.0
        async with aiohttp.ClientSession() as http:
            task = asyncio.create_task(
                http.post(proxy.url + "/v1/chat/completions", json={"model": "m", "messages": GOOD}).__aenter__()
            )
            await asyncio.wait_for(proxy.upstream.got_chat.wait(), 5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        await asyncio.wait_for(proxy.upstream.disconnected.wait(), 5)


async def test_invalid_inline_image_is_400(start_proxy: Any) -> None:
    messages: list[Any] = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@not-base64@@"}}],
        }
    ]
    async with start_proxy() as proxy:
        with pytest.raises(openai.BadRequestError, match="not valid base64"):
            await proxy.client().chat.completions.create(model="m", messages=messages)
    assert proxy.upstream.chat_requests == []
