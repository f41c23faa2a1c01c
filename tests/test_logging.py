"""Logs as an operator reads them: every line JSON, no key or raw request bytes, even when aiohttp's
own parser rejects a request, and the client's model string escaped and cut short."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from proxy.observability import setup_logging
from proxy.server.state import loggable

TENANT_KEY = "tenant-key-7f3a9c2b"
TENANTS = {"acme": {"keys": [TENANT_KEY], "policy": "default"}}
# Requests aiohttp's parser refuses before any proxy code runs; each quotes a key in the bad bytes.
MALFORMED = [
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-secret-key\x00\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TENANT_KEY.encode() + b"\x00\r\n\r\n",
    b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Broken Bearer sk-secret-key\r\n\r\n",
    b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX\x01Bad: " + TENANT_KEY.encode() + b"\r\n\r\n",
    b"GET /v1/models " + TENANT_KEY.encode() + b" HTTP/1.1\r\n\r\n",
    b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization : Bearer sk-secret-key\r\n\r\n",
]


async def send_raw(url: str, data: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        return await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()


def json_lines(out: str) -> list[dict[str, Any]]:
    lines = [line for line in out.splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # raises on any line that is not JSON


async def test_parser_errors_are_json_without_keys(start_proxy: Any, capsys: pytest.CaptureFixture[str]) -> None:
    async with start_proxy(tenants=TENANTS) as proxy:
        setup_logging("info", secrets=[TENANT_KEY])  # the configured keys, as `serve` passes them
        for data in MALFORMED:
            reply = await send_raw(proxy.url, data)
            assert reply.startswith(b"HTTP/1.") and b" 400 " in reply.split(b"\r\n")[0]
        await proxy.client(TENANT_KEY).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    out = capsys.readouterr().out
    for secret in ("sk-secret-key", TENANT_KEY, "sk-upstream-secret"):
        assert secret not in out
    records = json_lines(out)
    errors = [r for r in records if r.get("logger") == "aiohttp.server"]
    assert len(errors) == len(MALFORMED)
    assert {r["error_type"] for r in errors} <= {"BadHttpMessage", "BadHttpMethod", "BadStatusLine"}
    assert all("exception" not in r and r["reason"] for r in errors)
    assert any(r.get("event") == "request" and r.get("tenant") == "acme" for r in records)


def test_credentials_in_any_log_line_are_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    import logging

    setup_logging("info", secrets=[TENANT_KEY])
    logging.getLogger("some.library").warning(
        "headers %s", {"authorization": "Basic dXNlcjpwYXNz", "x-api-key": TENANT_KEY + "-suffix"}
    )
    try:
        raise ValueError(f"bad token Bearer {TENANT_KEY} and sk-proj-abcdef123456")
    except ValueError:
        logging.getLogger("asyncio").exception("callback failed")
    out = capsys.readouterr().out
    for secret in (TENANT_KEY, "dXNlcjpwYXNz", "sk-proj-abcdef123456"):
        assert secret not in out
    records = json_lines(out)
    assert [r["logger"] for r in records] == ["some.library", "asyncio"]
    assert "ValueError: bad token Bearer [redacted]" in records[1]["exception"]


async def test_model_is_logged_escaped_and_cut(start_proxy: Any, capsys: pytest.CaptureFixture[str]) -> None:
    model = "gpt\x1b[31m\u202e\x00" + "A" * 5000
    async with start_proxy() as proxy:
        await proxy.client().chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    request = next(r for r in json_lines(capsys.readouterr().out) if r.get("event") == "request")
    logged = request["model"]
    assert logged.startswith("gpt\\x1b[31m\\u202e\\x00AAAA")
    assert logged.endswith("...(5010 chars)")
    assert len(logged) < 100
    assert all(c.isprintable() for c in logged)


@pytest.mark.parametrize(
    ("model", "logged"),
    [
        ("gpt-4o-mini", "gpt-4o-mini"),
        ("naïve-模型", "naïve-模型"),
        ("a\nb\tc", "a\\nb\\tc"),
        ("zero\u200bwidth", "zero\\u200bwidth"),
        ("lone\ud800", "lone\\ud800"),
        ("x" * 65, "x" * 64 + "...(65 chars)"),
    ],
)
def test_loggable(model: str, logged: str) -> None:
    assert loggable(model) == logged


async def test_path_is_logged_escaped_and_cut(start_proxy: Any, capsys: pytest.CaptureFixture[str]) -> None:
    path = "/v1/" + "%E2%80%AE" + "b" * 500
    async with start_proxy() as proxy, aiohttp.ClientSession() as http, http.get(proxy.url + path) as resp:
        assert resp.status == 400  # a path outside RFC 3986 characters
    request = next(r for r in json_lines(capsys.readouterr().out) if r.get("event") == "request")
    assert request["path"].startswith("/v1/\\u202ebbb")
    assert len(request["path"]) < 160
