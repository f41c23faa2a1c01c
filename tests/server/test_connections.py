"""Clients that stop sending, and too many clients: raw sockets against the proxy on 127.0.0.1.

Deadlines are small here (0.3 s) so a test waits on the socket's end, never on a sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from yarl import URL

from proxy.server.state import METRICS
from tests.conftest import Proxy

FAST = {"header_timeout_s": 0.3, "body_timeout_s": 0.3}
CHAT_BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()


@asynccontextmanager
async def raw(proxy: Proxy) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    url = URL(proxy.url)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):  # the proxy closed it first
            await writer.wait_closed()


def chat_request(body: bytes = CHAT_BODY, length: int | None = None) -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body) if length is None else length}\r\n\r\n".encode()
        + body
    )


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    async with asyncio.timeout(10):  # a bound for a broken server, far past every deadline here
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines if line)}
        return int(status_line.split()[1]), headers, await reader.readexactly(int(headers["content-length"]))


async def closed_by_peer(reader: asyncio.StreamReader) -> bytes | None:
    """What the proxy sent before it closed the connection (b"" for nothing, or a reset for unread
    bytes); None if it is still open after 5 s (far past every deadline these tests set)."""
    try:
        async with asyncio.timeout(5):
            return await reader.read()
    except ConnectionResetError:
        return b""
    except TimeoutError:
        return None


async def closed_by_peer_silently(reader: asyncio.StreamReader) -> bool:
    return await closed_by_peer(reader) == b""


def sample(proxy: Proxy, name: str, **labels: str) -> float:
    value = proxy.app[METRICS].registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def rejected(proxy: Proxy, reason: str) -> float:
    return sample(proxy, "guardrail_connections_rejected_total", reason=reason)


async def until(condition: Callable[[], bool]) -> None:
    """Wait for a state the server reaches on its own (a peer's close is handled a moment later)."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the server did not reach the expected state within 5 s")


async def test_silent_and_half_sent_headers_are_closed_after_header_timeout(start_proxy: Any) -> None:
    async with start_proxy(server=FAST) as proxy:
        async with raw(proxy) as (silent, _), raw(proxy) as (half, writer):
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nAuthoriz")
            await writer.drain()
            assert await closed_by_peer_silently(half)
            assert await closed_by_peer_silently(silent)
        await until(lambda: sample(proxy, "guardrail_open_connections") == 0)
        assert rejected(proxy, "header_timeout") == 2
        assert proxy.upstream.received == []


async def test_keep_alive_deadline_restarts_after_each_request(start_proxy: Any) -> None:
    """Requests on one connection back to back are served; the next request's headers, sent in part
    after the last answer, get the same deadline as a new connection's."""
    async with start_proxy(server=FAST) as proxy, raw(proxy) as (reader, writer):
        for _ in range(3):
            writer.write(chat_request())
            status, _, body = await read_response(reader)
            assert status == 200, body
        writer.write(b"GET /healthz HTTP/1.1\r\n")
        assert await closed_by_peer_silently(reader)
    assert rejected(proxy, "header_timeout") == 1
    assert len(proxy.upstream.chat_requests) == 3


async def test_request_slower_than_header_timeout_is_not_cut(start_proxy: Any) -> None:
    """The header deadline stops once the headers are in: a slow upstream reply still arrives."""
    async with start_proxy(server=FAST) as proxy:
        proxy.upstream.mode, proxy.upstream.delay_s = "slow", 1.0
        client = proxy.client()
        for _ in range(2):  # the second reuses the connection
            reply = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
            assert reply.choices[0].message.content == "Hello! How can I help you today?"
        assert rejected(proxy, "header_timeout") == 0


async def test_slow_reader_gets_the_whole_reply(start_proxy: Any) -> None:
    """A reply still in the write buffer is not an idle connection: a client that pauses reading
    for longer than the header deadline still receives all of it."""
    async with start_proxy(server=FAST) as proxy:
        proxy.upstream.replies = ["x" * 8_000_000]
        url = URL(proxy.url)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernel holds little for us
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (url.host, url.port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=2**20)
        try:
            writer.write(chat_request())
            await asyncio.sleep(1.5)  # the client under test stops reading (this is its behaviour)
            status, _, body = await read_response(reader)
        finally:
            writer.close()
        assert status == 200
        assert len(json.loads(body)["choices"][0]["message"]["content"]) == 8_000_000
        # No count of header timeouts here: once the reply has left the proxy's buffer, the idle
        # connection may rightly be closed while the kernel still delivers the rest to this client.


async def test_half_sent_body_is_answered_408_and_closed(start_proxy: Any) -> None:
    async with start_proxy(server=FAST) as proxy, raw(proxy) as (reader, writer):
        writer.write(chat_request(CHAT_BODY[:10], length=len(CHAT_BODY)))
        status, headers, body = await read_response(reader)
        assert status == 408
        assert json.loads(body)["error"] == {
            "message": "The request body did not arrive within 0.3 seconds.",
            "type": "invalid_request_error",
            "param": None,
            "code": "request_timeout",
        }
        assert headers["x-request-id"]
        assert await closed_by_peer_silently(reader)  # the rest of the body is not waited for
    assert rejected(proxy, "body_timeout") == 1
    assert rejected(proxy, "header_timeout") == 0  # one stalled request, counted once
    assert proxy.upstream.received == []


async def test_half_sent_body_on_any_route_is_cut(start_proxy: Any) -> None:
    """Passthrough reads its body through the same deadline: 408, and nothing reaches the upstream."""
    async with start_proxy(server=FAST) as proxy, raw(proxy) as (reader, writer):
        writer.write(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"model": "e'
        )
        rest = await closed_by_peer(reader)
        assert rest is not None
        assert rest.startswith(b"HTTP/1.1 408 "), rest
    assert rejected(proxy, "body_timeout") == 1
    assert rejected(proxy, "header_timeout") == 0
    assert proxy.upstream.received == []


async def test_connections_past_max_are_refused_and_released(start_proxy: Any) -> None:
    async with start_proxy(server={"max_connections": 3}) as proxy:
        fds_before = len(os.listdir("/proc/self/fd"))
        async with raw(proxy) as first, raw(proxy) as second, raw(proxy) as third:
            admitted = [first, second, third]
            for reader, writer in admitted:
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: proxy\r\n\r\n")
                assert (await read_response(reader))[0] == 200
            for _ in range(2):
                async with raw(proxy) as (extra, _):
                    assert await closed_by_peer_silently(extra)
            assert rejected(proxy, "max_connections") == 2
            assert sample(proxy, "guardrail_open_connections") == 3
            for reader, writer in admitted:  # the admitted ones keep working
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: proxy\r\n\r\n")
                assert (await read_response(reader))[0] == 200
            first[1].close()
            await until(lambda: sample(proxy, "guardrail_open_connections") == 2)
            async with raw(proxy) as (reader, writer):  # a freed place is taken again
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: proxy\r\n\r\n")
                assert (await read_response(reader))[0] == 200
        await until(lambda: sample(proxy, "guardrail_open_connections") == 0)
        await until(lambda: len(os.listdir("/proc/self/fd")) <= fds_before)
        assert rejected(proxy, "max_connections") == 2


async def test_metrics_name_the_connection_figures(start_proxy: Any) -> None:
    async with start_proxy(server=FAST) as proxy:
        async with raw(proxy) as (silent, _):
            assert await closed_by_peer_silently(silent)
        async with raw(proxy) as (reader, writer):
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: proxy\r\n\r\n")
            _, _, text = await read_response(reader)
    assert b"guardrail_open_connections 1.0" in text  # this one
    assert b'guardrail_connections_rejected_total{reason="header_timeout"} 1.0' in text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_serve_command_runs_the_same_server(tmp_path: Path) -> None:
    """`guardrail-proxy serve` (web.run_app owns the loop) applies the deadlines, and stops on SIGTERM."""
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "default.yaml").write_text("routes:\n  - {name: e, match: {path: /v1/embeddings}, passthrough: true}\n")
    config = tmp_path / "config.yaml"
    config.write_text(
        textwrap.dedent(f"""
        server: {{header_timeout_s: 0.3}}
        upstreams:
          default: {{base_url: "http://127.0.0.1:9/v1"}}
        policies_dir: {policies}
        """)
    )
    port = free_port()
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", str(port),
        stdout=asyncio.subprocess.DEVNULL, env=env,
    )  # fmt: skip
    try:
        streams = None
        for _ in range(600):  # the process imports its dependencies first
            assert process.returncode is None, "serve exited"
            try:
                streams = await asyncio.open_connection("127.0.0.1", port)
                break
            except ConnectionRefusedError:
                await asyncio.sleep(0.05)
        assert streams is not None, "serve did not listen within 30 s"
        reader, writer = streams
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: proxy\r\n\r\n")
        assert (await read_response(reader))[0] == 200
        writer.write(b"GET /healthz HTTP/1.1\r\n")
        assert await closed_by_peer_silently(reader)
        writer.close()
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
