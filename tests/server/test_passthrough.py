"""Wildcard passthrough routes as a hostile client tries them: a path that could leave its route
upstream (dot segments, encoded separators, backslashes, control characters) is a 400 and never
reaches the upstream; the allowed path and its query arrive exactly as meant.

Requests go over a raw socket: HTTP clients (the openai SDK, aiohttp) normalise paths first."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

FILES_POLICY = """
routes:
  - name: files
    match: {path: "/v1/files/*"}
    upstream: files
    passthrough: true
"""


class Recorder:
    """A test-local upstream that answers every path and records each raw request target."""

    def __init__(self) -> None:
        self.targets: list[str] = []
        self.headers: list[dict[str, str]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> Recorder:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._any)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _any(self, request: web.Request) -> web.Response:
        self.targets.append(request.raw_path)
        self.headers.append(dict(request.headers))
        if not request.path.startswith("/v1/files/"):
            return web.json_response({"admin": "the operator's account settings"})
        return web.json_response({"object": "file", "path": request.path, "query": dict(request.query)})


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    server = await Recorder().start()
    yield server
    await server.stop()


async def raw_get(url: str, target: bytes) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"GET " + target + b" HTTP/1.0\r\nHost: proxy\r\n\r\n")
        await writer.drain()
        reply = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def files_upstream(recorder: Recorder) -> dict[str, Any]:
    return {"files": {"base_url": recorder.url + "/v1", "api_key": "sk-upstream-secret"}}


ESCAPES = [
    b"/v1/files/..%2F..%2Fadmin",
    b"/v1/files/..%2f..%2fadmin",
    b"/v1/files/%2e%2e/%2e%2e/admin",
    b"/v1/files/%2E%2E%2F%2E%2E%2Fadmin",
    b"/v1/files/x/../../../admin",
    b"/v1/files/./x",
    b"/v1/files/abc%3Fpurpose=evil",
    b"/v1/files/abc%23frag",
    b"/v1/files/abc%00",
    b"/v1/files/..%5C..%5Cadmin",
    b"/v1/files/..\\..\\admin",
    b"/v1/files/%252e%252e%252fadmin",
    b"/v1/files//admin",
    b"/v1/files/x%0d%0aHost:%20evil",
    b"/v1/files/x%7f",
    b"/v1/files/caf%C3%A9",
    b"/v1/files/x?q=%00",
]


@pytest.mark.parametrize("target", ESCAPES, ids=[t.decode() for t in ESCAPES])
async def test_path_that_could_leave_its_route_is_400(start_proxy: Any, recorder: Recorder, target: bytes) -> None:
    async with start_proxy(policies={"default": FILES_POLICY}, upstreams=files_upstream(recorder)) as proxy:
        status, body = await raw_get(proxy.url, target)
    assert recorder.targets == []
    assert status == 400, body
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error"
    assert b"operator" not in body


async def test_allowed_path_and_query_arrive_as_meant(start_proxy: Any, recorder: Recorder) -> None:
    async with start_proxy(policies={"default": FILES_POLICY}, upstreams=files_upstream(recorder)) as proxy:
        status, body = await raw_get(proxy.url, b"/v1/files/file-abc_123/content?purpose=a%26b%3Dc&limit=2")
        unknown, _ = await raw_get(proxy.url, b"/v1/admin")
    assert status == 200, body
    assert json.loads(body) == {
        "object": "file",
        "path": "/v1/files/file-abc_123/content",
        "query": {"purpose": "a&b=c", "limit": "2"},
    }
    assert recorder.targets == ["/v1/files/file-abc_123/content?purpose=a%26b%3Dc&limit=2"]
    assert recorder.headers[0]["Authorization"] == "Bearer sk-upstream-secret"
    assert unknown == 404


async def test_traversal_never_reaches_the_fake_upstream_admin(start_proxy: Any) -> None:
    """The same attack against the shared fake upstream (default upstream): its /admin records nothing."""
    async with start_proxy(policies={"default": FILES_POLICY.replace("upstream: files", "")}) as proxy:
        status, _ = await raw_get(proxy.url, b"/v1/files/..%2F..%2Fadmin")
        ok, body = await raw_get(proxy.url, b"/v1/files/file-1")
        received = list(proxy.upstream.received)
    assert status == 400
    assert ok == 200, body
    assert [r.path for r in received] == ["/v1/files/file-1"]
