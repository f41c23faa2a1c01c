"""One writer per response: once a held stream's headers went out, any failure (inside the held
response's block, later in the handler, or deep in a guard) ends the SSE body with one final
error event and `data: [DONE]`; no second HTTP response is ever written into it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from proxy.errors import UpstreamError
from proxy.guards.guard import ConversationScore, Taxonomy, Turn
from proxy.observability import Metrics
from proxy.server.middleware import record_middleware
from proxy.server.state import METRICS
from proxy.streaming.held_response import HeldResponse
from tests.fakes.guards import ScriptedTextGuard
from tests.streaming.replies import post

SECRET = "internal detail 7f3a"


def final_error(body: bytes) -> dict[str, Any]:
    """The one error of an SSE body that ends with it and [DONE], with nothing of a second response."""
    assert b"HTTP/1.1" not in body
    assert SECRET.encode() not in body and b"Traceback" not in body
    events = [e for e in body.split(b"\n\n") if e.startswith(b"data:")]
    assert events[-1] == b"data: [DONE]"
    assert sum(b'"error"' in e for e in events) == 1
    error: dict[str, Any] = json.loads(events[-2][6:])["error"]
    return error


@asynccontextmanager
async def serve(handler: Any) -> AsyncIterator[str]:
    app = web.Application(middlewares=[record_middleware])
    app[METRICS] = Metrics()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("where", "exc", "code"),
    [
        ("inside", RuntimeError(SECRET), "internal_error"),
        ("after", RuntimeError(SECRET), "internal_error"),
        ("inside", UpstreamError("The upstream went away."), "upstream_error"),
        ("after", UpstreamError("The upstream went away."), "upstream_error"),
    ],
)
async def test_failure_after_headers_is_one_final_error_event(where: str, exc: Exception, code: str) -> None:
    """Raised inside the held response's block it ends the stream itself; raised later in the
    handler, the middleware hands it to the held response instead of writing a 500."""
    go = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        async with HeldResponse(request, {}, 0.01):
            await go.wait()
            if where == "inside":
                raise exc
        raise exc

    async with serve(handler) as url:
        answer = await post(url, stream=True, on_headers=go.set)
    assert answer.status == 200
    assert answer.headers["x-guardrail-decision"] == "deferred"
    assert final_error(answer.body)["code"] == code


async def test_failure_before_headers_is_a_json_error() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        async with HeldResponse(request, {}, 60):
            raise RuntimeError(SECRET)
        raise AssertionError("before its headers, a held response never swallows an error")

    async with serve(handler) as url:
        answer = await post(url, stream=True)
    assert answer.status == 500
    assert answer.json["error"]["code"] == "internal_error"
    assert SECRET.encode() not in answer.body


class Unprintable(Exception):
    """An exception whose text cannot be taken: it escapes the pipeline's guard-error handling."""

    def __str__(self) -> str:
        raise RuntimeError(SECRET)


@dataclass
class BreaksOnReply:
    """Passes the input check; on the reply, waits for `go`, then raises something unexpected."""

    go: asyncio.Event
    name: str = "llama_guard"
    calls: list[list[Turn]] = field(default_factory=list)

    async def score_conversation(
        self, turns: list[Turn], taxonomy: Taxonomy, *, categories_from: float = 0.5
    ) -> ConversationScore:
        self.calls.append(turns)
        if turns[-1].speaker == "Agent":
            await self.go.wait()
            raise Unprintable()
        return ConversationScore(0.01, 0.01, 1.0)


async def test_guard_failure_after_a_keepalive_through_the_proxy(start_proxy: Any) -> None:
    go = asyncio.Event()
    guards = {"prompt_guard": ScriptedTextGuard(), "llama_guard": BreaksOnReply(go)}
    async with start_proxy(guards=guards, server={"keepalive_interval_s": 0.01}) as proxy:
        proxy.upstream.replies = ["partial words that must not leak"]
        answer = await post(proxy.url, stream=True, on_headers=go.set)
    assert answer.status == 200
    assert b"partial" not in answer.body
    # internal_error while an unprintable exception escapes the pipeline; guard_unavailable if the
    # pipeline ever takes it as a guard error. Either way: one event, then [DONE].
    assert final_error(answer.body)["code"] in ("internal_error", "guard_unavailable")


async def test_failure_after_a_plain_response_started_never_writes_a_second_one() -> None:
    """A response other than a held stream (a passthrough relay) that already sent bytes cannot end
    with an error event; the connection is closed instead, so the client sees a broken reply."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        await response.write(b"first bytes ")
        raise UpstreamError("The upstream went away.")

    async with serve(handler) as url:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        raw = await asyncio.wait_for(reader.read(), 30)  # to EOF: the proxy closes the connection
        writer.close()
        await writer.wait_closed()
    assert raw.startswith(b"HTTP/1.1 200 ")
    assert raw.count(b"HTTP/1.1") == 1
    assert b"first bytes " in raw and not raw.endswith(b"0\r\n\r\n")  # the chunked body never ends
