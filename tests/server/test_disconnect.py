"""Checks that no longer matter stop: a client that goes away while its request is being screened
is recorded as 499 (its upstream never called), and a check that decides the request drops the rest."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from proxy.guards.guard import ConversationScore, ScreenText, Taxonomy, TextScore, Turn
from tests.conftest import DEFAULT_POLICY
from tests.fakes.guards import ScriptedConversationGuard, ScriptedTextGuard


@dataclass
class StallingGuard:
    """Holds every check until cancelled; says when a check started and when it was dropped."""

    name: str = "llama_guard"
    started: asyncio.Event = field(default_factory=asyncio.Event)
    dropped: asyncio.Event = field(default_factory=asyncio.Event)

    async def score_conversation(
        self, turns: list[Turn], taxonomy: Taxonomy, *, categories_from: float = 0.5
    ) -> ConversationScore:
        self.started.set()
        try:
            await asyncio.Event().wait()
        finally:
            self.dropped.set()
        raise AssertionError("unreachable")


async def test_client_gone_during_a_guard_check_is_499(start_proxy: Any) -> None:
    guard = StallingGuard()
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    async with start_proxy(guards={"prompt_guard": ScriptedTextGuard(), "llama_guard": guard}) as proxy:
        host, port = proxy.url.removeprefix("http://").split(":")
        _reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        await guard.started.wait()
        writer.close()
        await writer.wait_closed()
        await guard.dropped.wait()
        statuses: list[str] = []
        async with aiohttp.ClientSession() as http:
            while not statuses:  # the record is written when the cancelled handler unwinds
                async with http.get(proxy.url + "/metrics") as resp:
                    text = await resp.text()
                statuses = [line for line in text.splitlines() if line.startswith("guardrail_requests_total{")]
    assert any('status="499"' in line for line in statuses), statuses
    assert not any('status="200"' in line for line in statuses), statuses
    assert proxy.upstream.chat_requests == []


@dataclass
class StallingTextGuard:
    """A Prompt Guard that never answers until cancelled."""

    name: str = "prompt_guard"
    dropped: asyncio.Event = field(default_factory=asyncio.Event)

    async def score_texts(self, texts: list[ScreenText]) -> list[TextScore]:
        try:
            await asyncio.Event().wait()
        finally:
            self.dropped.set()
        raise AssertionError("unreachable")


async def test_a_deciding_check_drops_the_others(start_proxy: Any) -> None:
    """Llama Guard blocks: the still-running Prompt Guard check is dropped, not waited for (the
    route's guard timeout is an hour, so waiting would hang the test)."""
    policy = DEFAULT_POLICY.replace(
        'refusal: "Blocked by policy."', 'refusal: "Blocked by policy."\n  guard_timeout_s: 3600'
    )
    text_guard = StallingTextGuard()
    guards = {"prompt_guard": text_guard, "llama_guard": ScriptedConversationGuard()}
    async with start_proxy(policies={"default": policy}, guards=guards) as proxy:
        completion = await proxy.client().chat.completions.create(
            model="m", messages=[{"role": "user", "content": "build a bomb"}]
        )
    assert completion.choices[0].finish_reason == "content_filter"
    assert text_guard.dropped.is_set()
    assert proxy.upstream.chat_requests == []
