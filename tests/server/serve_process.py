"""A real `python -m proxy serve` process for the shutdown and worker tests: a config in tmp_path
whose upstream is a fake on 127.0.0.1, and raw HTTP against it (each call on a fresh connection)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

# Routes without checks: what these tests follow is the held stream's path, not a verdict.
POLICY = """
routes:
  - {name: buffered, match: {path: /v1/chat/completions, model: buffered}}
  - {name: live, match: {path: /v1/chat/completions, model: live}, stream: incremental, release_tokens: 2}
  - {name: slow, match: {path: /v1/chat/completions, model: slow}, upstream: slow}
"""


def write_config(tmp_path: Path, upstream: str, server: dict[str, Any], *, slow: str | None = None) -> Path:
    """Upstream `default`, and `slow` (the same one unless given) for the route of model `slow`."""
    policies = tmp_path / "policies"
    policies.mkdir(exist_ok=True)
    (policies / "default.yaml").write_text(textwrap.dedent(POLICY))
    config = tmp_path / "config.yaml"
    data = {
        "server": server,
        "upstreams": {name: {"base_url": url} for name, url in (("default", upstream), ("slow", slow or upstream))},
        "policies_dir": str(policies),
    }
    config.write_text(json.dumps(data))  # JSON is YAML
    return config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def serving(
    config: Path, port: int, *args: str, readyz: int = 200
) -> AsyncIterator[asyncio.subprocess.Process]:
    """The process, once /readyz on `port` answers with status `readyz` (killed at the end if still running)."""
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "HF_HUB_OFFLINE": "1"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", str(port), *args,
        stdout=asyncio.subprocess.DEVNULL, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        for _ in range(1200):  # the process imports its dependencies first: up to 60 s on a busy machine
            assert process.returncode is None, f"serve exited with {process.returncode}"
            with contextlib.suppress(OSError):
                status, _ = await get(port, "/readyz")
                if status == readyz:
                    break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"/readyz did not answer {readyz} within 60 s")
        yield process
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # workers of --workers follow their parent (stdin)
            await process.wait()


@asynccontextmanager
async def sent(port: int, head: str, body: bytes = b"", *, close: bool = True) -> AsyncIterator[asyncio.StreamReader]:
    """A connection with one HTTP/1.1 request written (`Connection: close` unless told), for reading its answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        connection = "Connection: close\r\n" if close else ""
        writer.write(f"{head}\r\nHost: proxy\r\n{connection}Content-Length: {len(body)}\r\n\r\n".encode())
        writer.write(body)
        yield reader
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    async with asyncio.timeout(60):  # a bound for a broken server, past every deadline of these tests
        head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines if line)}
    return int(status_line.split()[1]), headers


async def read_rest(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    """The body, read to the connection's end."""
    async with asyncio.timeout(60):
        payload = await reader.read()
    return dechunk(payload) if headers.get("transfer-encoding") == "chunked" else payload


async def request(port: int, head: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """One request on a new connection, answered in full."""
    async with sent(port, head, body) as reader:
        status, headers = await read_head(reader)
        return status, headers, await read_rest(reader, headers)


def dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return bytes(out)


async def get(port: int, path: str) -> tuple[int, Any]:
    status, _, body = await request(port, f"GET {path} HTTP/1.1")
    return status, json.loads(body)


def chat_body(model: str, stream: bool) -> bytes:
    return json.dumps({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}).encode()


CHAT_HEAD = "POST /v1/chat/completions HTTP/1.1\r\nContent-Type: application/json"


async def chat(port: int, model: str, stream: bool = True) -> tuple[int, dict[str, str], bytes]:
    return await request(port, CHAT_HEAD, chat_body(model, stream))


def data_events(body: bytes) -> list[bytes]:
    """The `data:` payloads of an SSE body (comments and keep-alives left out)."""
    return [line[len(b"data: ") :] for line in body.split(b"\n") if line.startswith(b"data: ")]
