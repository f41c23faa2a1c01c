"""Upstream replies written byte for byte, and a raw client that reads the proxy's answer whole:
what the tests in this package send through the fake upstream's `raw` mode."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

GOOD = [{"role": "user", "content": "Say hello."}]
BASE = {"id": "chatcmpl-raw", "object": "chat.completion.chunk", "created": 1700000000, "model": "m"}
DONE = b"data: [DONE]\n\n"


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def chunk(*choices: dict[str, Any], **extra: Any) -> bytes:
    return sse({**BASE, "choices": list(choices), **extra})


def delta(index: int = 0, finish_reason: str | None = None, **fields: Any) -> dict[str, Any]:
    return {"index": index, "delta": fields, "finish_reason": finish_reason}


def stream_of(*deltas: dict[str, Any]) -> list[bytes | None]:
    """A well-formed stream around the given deltas: role first, stop last, then [DONE]."""
    indexes = sorted({d["index"] for d in deltas} or {0})
    head = [chunk(delta(i, role="assistant", content="")) for i in indexes]
    tail = [chunk(delta(i, finish_reason="stop")) for i in indexes]
    return [*head, *(chunk(d) for d in deltas), *tail, DONE]


def completion(*choices: Any, **extra: Any) -> bytes:
    body = {"id": "chatcmpl-raw", "object": "chat.completion", "created": 1700000000, "model": "m"}
    return json.dumps({**body, "choices": list(choices), **extra}).encode()


def choice(content: Any = "Hello.", index: Any = 0, **message: Any) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": content, **message}, "finish_reason": "stop"}


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def events(self) -> list[bytes]:
        """The data events of an SSE body, without their blank lines."""
        return [e for e in self.body.split(b"\n\n") if e.startswith(b"data:")]

    def text(self) -> str:
        """Every content delta of an SSE body, joined (what an SDK user would read)."""
        out = []
        for event in self.events:
            data = event[len(b"data: ") :]
            if data == b"[DONE]":
                continue
            for c in json.loads(data).get("choices") or []:
                out.append((c.get("delta") or {}).get("content") or "")
        return "".join(out)


async def post(
    url: str, *, stream: bool, n: int | None = None, on_headers: Callable[[], None] | None = None
) -> Answer:
    """POST a chat request; `on_headers` runs once the answer's headers arrived, before its body
    is read (e.g. to let a gated upstream go on only after a held stream's headers went out)."""
    body: dict[str, Any] = {"model": "m", "messages": GOOD, "stream": stream}
    if n is not None:
        body["n"] = n
    # A bound on the whole exchange: a stream that is never ended fails the test instead of hanging it.
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http,
        http.post(url + "/v1/chat/completions", json=body) as resp,
    ):
        if on_headers is not None:
            on_headers()
        return Answer(resp.status, dict(resp.headers), await resp.read())
