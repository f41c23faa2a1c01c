"""Graceful shutdown of a real `serve` process: SIGTERM while held streams are in flight.

The fake upstream holds its streams open at a gate the test releases, so "in flight" is a state the
test controls; every wait is on observable state (the upstream's record, /readyz, a refused connect).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

from tests.fakes.upstream import FakeUpstream
from tests.server.serve_process import (
    CHAT_HEAD,
    chat,
    chat_body,
    data_events,
    free_port,
    get,
    read_head,
    read_rest,
    sent,
    serving,
    write_config,
)

REPLY_EVENTS = FakeUpstream().chunks({"model": "m"})  # role, 7 words, finish, [DONE]


async def until(condition: Callable[[], bool | Awaitable[bool]], what: str) -> None:
    """Poll a state the process reaches on its own (bounded far past any deadline here)."""
    for _ in range(1200):
        reached = condition()
        if await reached if inspect.isawaitable(reached) else reached:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not reached within 60 s: {what}")


async def refuses(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


def content(body: bytes) -> str:
    text = ""
    for event in data_events(body):
        if event != b"[DONE]":
            text += "".join(c["delta"].get("content") or "" for c in json.loads(event)["choices"])
    return text


async def test_sigterm_drains_held_streams_then_exits_0(tmp_path: Path, upstream: FakeUpstream) -> None:
    """/readyz turns 503 at once while new connections are still taken; after the grace period they
    are refused; the held (buffered) and incremental streams in flight finish with every byte; exit 0."""
    upstream.mode = "raw"
    upstream.raw_chunks = [*REPLY_EVENTS[:3], None, *REPLY_EVENTS[3:]]
    server = {"shutdown_grace_s": 2, "drain_timeout_s": 120, "keepalive_interval_s": 0.2}
    config = write_config(tmp_path, upstream.url, server)
    port = free_port()
    async with serving(config, port) as process:
        streams = [asyncio.create_task(chat(port, model)) for model in ("buffered", "live")]
        await until(lambda: len(upstream.chat_requests) == 2, "both streams reached the upstream")

        answers: list[tuple[int, object]] = []

        async def draining() -> bool:  # asked on a new connection each time: they are still taken
            answers.append(await get(port, "/readyz"))
            return answers[-1][0] == 503

        process.send_signal(signal.SIGTERM)
        await until(draining, "readyz turned 503")
        assert answers[-1] == (503, {"status": "draining", "pid": process.pid})
        async with sent(port, "GET /healthz HTTP/1.1", close=False) as reader:  # a client that would keep it
            status, headers = await read_head(reader)
            assert (status, headers["connection"]) == (200, "close")  # its next request goes elsewhere
            assert await reader.read() == b'{"status": "ok"}'  # and the proxy closes it
        await until(lambda: refuses(port), "the listener closed after the grace period")
        assert not any(s.done() for s in streams)  # held at the upstream's gate, still in flight

        upstream.gate.set()
        (b_status, b_headers, buffered), (l_status, _, live) = await asyncio.gather(*streams)
        assert await asyncio.wait_for(process.wait(), 60) == 0

    assert (b_status, l_status) == (200, 200)
    assert b_headers["x-guardrail-decision"] in ("allow", "deferred")
    assert data_events(buffered) == [e.removeprefix(b"data: ").rstrip(b"\n") for e in REPLY_EVENTS]
    assert content(live) == content(b"".join(REPLY_EVENTS)) == "Hello! How can I help you today? "
    assert data_events(live)[-1] == b"[DONE]"


async def test_drain_deadline_cuts_with_error_event_and_503(tmp_path: Path, upstream: FakeUpstream) -> None:
    """Past drain_timeout_s a held stream ends with the proxy's error event and [DONE], never with the
    text it held unchecked; a request with no answer yet gets 503 shutting_down; exit status 3."""
    upstream.mode = "raw"
    unchecked = b'data: {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [{"index": 0, "delta": {"content": "UNCHECKED-TEXT"}, "finish_reason": null}]}\n\n'  # noqa: E501
    upstream.raw_chunks = [REPLY_EVENTS[0], unchecked, None, REPLY_EVENTS[-1]]
    slow = await FakeUpstream(mode="slow", delay_s=600).start()
    try:
        server = {"shutdown_grace_s": 0, "drain_timeout_s": 1, "keepalive_interval_s": 0.1}
        config = write_config(tmp_path, upstream.url, server, slow=slow.url)
        port = free_port()
        async with serving(config, port) as process, sent(port, CHAT_HEAD, chat_body("buffered", True)) as stream:
            status, headers = await read_head(stream)  # sent at the first keep-alive: the decision is deferred
            assert (status, headers["x-guardrail-decision"]) == (200, "deferred")
            await until(lambda: b"UNCHECKED-TEXT" in upstream.sent, "the upstream sent the text the proxy holds")
            waiting = asyncio.create_task(chat(port, "slow", stream=False))
            await until(lambda: len(slow.chat_requests) == 1, "the JSON request reached its upstream")

            process.send_signal(signal.SIGTERM)
            body = await read_rest(stream, headers)
            json_status, json_headers, json_body = await waiting
            assert await asyncio.wait_for(process.wait(), 60) == 3
    finally:
        await slow.stop()

    assert b"UNCHECKED-TEXT" not in body
    events = data_events(body)
    assert events[-1] == b"[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "shutting_down"
    assert json_status == 503
    assert json_headers["retry-after"] == "1"
    assert json.loads(json_body)["error"]["code"] == "shutting_down"


async def test_sigint_skips_the_grace_period(tmp_path: Path, upstream: FakeUpstream) -> None:
    """An interactive stop has no load balancer to warn: an idle process exits 0 at once, where a
    grace period of an hour would hold it."""
    config = write_config(tmp_path, upstream.url, {"shutdown_grace_s": 3600})
    port = free_port()
    async with serving(config, port) as process:
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), 60) == 0


async def test_sigterm_before_ready_skips_the_grace_period(tmp_path: Path, upstream: FakeUpstream) -> None:
    """A process whose /readyz never said ready (its guard failed to load) had no traffic from any load
    balancer: SIGTERM stops it at once, where a grace period of an hour would hold it."""
    config = write_config(tmp_path, upstream.url, {"shutdown_grace_s": 3600})
    data = json.loads(config.read_text())
    data["guards"] = {"prompt_guard": {"family": "prompt-guard-2", "model": str(tmp_path / "no-such-model")}}
    config.write_text(json.dumps(data))
    port = free_port()
    async with serving(config, port, readyz=503) as process:
        await until(lambda: failed(port), "the guard's load failed")
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 60) == 0


async def failed(port: int) -> bool:
    return bool((await get(port, "/readyz"))[1]["status"] == "failed")
