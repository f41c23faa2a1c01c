"""Second adversarial review of response ownership, chat reply fields and the JSON body limits: each
test is a way around a guarantee that was open, driven through the real path (raw aiohttp or the
official openai client -> the proxy -> a fake upstream on 127.0.0.1) with the scripted guards."""

from __future__ import annotations

from typing import Any

import pytest

from tests.fakes.upstream import FakeUpstream
from tests.server.test_responses import POLICY
from tests.test_bypass_endpoints import post_raw

MANY = 400_000


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
