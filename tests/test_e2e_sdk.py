"""Every SDK feature round-trips unchanged when allowed: openai.AsyncOpenAI -> proxy -> fake upstream."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import openai
import pytest

MESSAGES: list[Any] = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


async def test_non_stream_roundtrip_forwards_body_and_relays_bytes(start_proxy: Any) -> None:
    async with start_proxy() as proxy:
        client = proxy.client()
        extra = {"vendor_field": {"x": 1}}
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-fake",
            messages=MESSAGES,
            seed=7,
            user="u-1",
            metadata={"team": "a"},
            temperature=0.2,
            response_format={"type": "json_object"},
            extra_body=extra,
        )
        completion = raw.parse()
    sent = proxy.upstream.chat_requests[0]
    assert sent.json == {
        "model": "gpt-fake",
        "messages": MESSAGES,
        "seed": 7,
        "user": "u-1",
        "metadata": {"team": "a"},
        "temperature": 0.2,
        "response_format": {"type": "json_object"},
        "vendor_field": {"x": 1},
    }
    assert raw.http_response.content == bytes(proxy.upstream.sent)
    assert completion.choices[0].message.content == "Hello! How can I help you today?"
    assert raw.headers["x-guardrail-decision"] == "allow"
    assert raw.headers["x-guardrail-policy"].startswith("default@")
    assert raw.headers["x-request-id"]
    # The upstream got the configured upstream key, never the client's.
    assert sent.headers["Authorization"] == "Bearer sk-upstream-secret"


async def test_stream_replays_upstream_bytes_exactly(start_proxy: Any) -> None:
    async with start_proxy() as proxy:
        client = proxy.client()
        async with client.chat.completions.with_streaming_response.create(
            model="gpt-fake", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        ) as resp:
            body = b"".join([chunk async for chunk in resp.http_response.aiter_bytes()])
            assert resp.headers["x-guardrail-decision"] == "allow"
    assert body == bytes(proxy.upstream.sent)
    assert body.endswith(b"data: [DONE]\n\n")


async def test_stream_sdk_sees_usage_chunk_and_text(start_proxy: Any) -> None:
    async with start_proxy() as proxy:
        stream = await proxy.client().chat.completions.create(
            model="gpt-fake", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == "Hello! How can I help you today?"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 15


async def test_n_greater_than_one_and_logprobs(start_proxy: Any) -> None:
    async with start_proxy() as proxy:
        proxy.upstream.replies = ["first answer", "second answer", "third answer"]
        completion = await proxy.client().chat.completions.create(
            model="gpt-fake", messages=MESSAGES, n=3, logprobs=True, top_logprobs=2
        )
    assert [c.message.content for c in completion.choices] == ["first answer", "second answer", "third answer"]
    assert completion.choices[0].logprobs is not None
    assert proxy.upstream.chat_requests[0].json["top_logprobs"] == 2


async def test_tools_and_streamed_tool_call_deltas(start_proxy: Any) -> None:
    async with start_proxy() as proxy:
        proxy.upstream.tool_call = {"name": "get_weather", "arguments": '{"city": "Paris"}'}
        completion = await proxy.client().chat.completions.create(
            model="gpt-fake", messages=MESSAGES, tools=TOOLS, tool_choice="auto"
        )
        call = completion.choices[0].message.tool_calls[0]
        assert call.function.name == "get_weather"
        stream = await proxy.client().chat.completions.create(
            model="gpt-fake", messages=MESSAGES, tools=TOOLS, tool_choice="auto", stream=True
        )
        args = ""
        async for chunk in stream:
            for c in chunk.choices:
                for tc in c.delta.tool_calls or []:
                    args += tc.function.arguments or ""
    assert json.loads(args) == {"city": "Paris"}
    assert proxy.upstream.chat_requests[0].json["tool_choice"] == "auto"


async def test_models_and_embeddings_passthrough_and_unknown_path(start_proxy: Any) -> None:
    async with start_proxy() as proxy:
        client = proxy.client()
        models = await client.models.list()
        assert [m.id for m in models.data] == ["gpt-fake"]
        emb = await client.embeddings.create(model="emb", input="hi")
        assert emb.data[0].embedding == [0.1, 0.2]
        with pytest.raises(openai.NotFoundError):
            await client.completions.create(model="gpt-fake", prompt="hi")


async def test_unknown_path_has_openai_error_shape(start_proxy: Any) -> None:
    async with (
        start_proxy() as proxy,
        aiohttp.ClientSession() as http,
        http.post(proxy.url + "/v1/audio/speech", json={"model": "x"}, headers={"Authorization": "Bearer k"}) as resp,
    ):
        assert resp.status == 404
        assert set((await resp.json())["error"]) >= {"message", "type", "param", "code"}


async def test_route_renames_the_model_and_changes_nothing_else(start_proxy: Any) -> None:
    from tests.conftest import DEFAULT_POLICY

    policy = DEFAULT_POLICY.replace(
        'match: {path: /v1/chat/completions, model: "*"}',
        'match: {path: /v1/chat/completions, model: "*"}\n    rename_model: vendor/model-x',
    )
    async with start_proxy(policies={"default": policy}) as proxy:
        await proxy.client().chat.completions.create(model="alias", messages=MESSAGES, seed=3, extra_body={"k": [1]})
    assert proxy.upstream.chat_requests[0].json == {
        "model": "vendor/model-x",
        "messages": MESSAGES,
        "seed": 3,
        "k": [1],
    }
