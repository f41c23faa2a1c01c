"""Fuzz the proxy over real sockets and count answers by status: a client fault must be a 4xx in the
OpenAI envelope, an upstream fault a 502/504, and nothing a 500 (issue: robust under hostile input).

The proxy runs in process with the tiny demo guards (real transformers models that react only to
trigger words) in front of a local upstream on 127.0.0.1 that answers each request with a valid or
a mutated reply (JSON or SSE). Requests are written as raw HTTP bytes, so header faults (non-UTF-8
keys, bad Content-Encoding, wrong Content-Length, odd Content-Type) are fuzzed too. Seeded: the same
--seed sends the same requests.

    python bench/fuzz.py                      # 10,000 requests, concurrency 16
    python bench/fuzz.py --requests 2000 --seed 7
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import copy
import gzip
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from proxy.app import build_app
from proxy.demo.run import POLICY, build_models
from proxy.observability import setup_logging
from proxy.server.state import READINESS
from proxy.settings import Settings

BASES: list[dict[str, Any]] = [
    {"model": "m", "messages": [{"role": "user", "content": "What is the capital of France?"}]},
    {"model": "m", "stream": True, "messages": [{"role": "user", "content": "Tell me a story."}]},
    {
        "model": "m",
        "n": 2,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "input_text", "text": "there"}]},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function",
                                                                    "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c", "content": "42"},
        ],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    },
]
ODD_VALUES: list[Any] = [
    None, True, 0, -1, 10**30, 1.5e308, "", "x" * 5000, "\ud800", "bo\u200bmb", [], {}, [[[[[]]]]],
    {"type": "weird"}, [{"type": "text"}], {"role": "user"}, "user", "assistant", "tool", 3.14,
]


def mutate_json(rng: random.Random, value: Any) -> Any:
    """Replace one random node of a JSON value by an odd value (or a deep nest)."""
    value = copy.deepcopy(value)
    nodes: list[tuple[Any, Any]] = []
    stack = [value]
    while stack:
        node = stack.pop()
        children: list[tuple[Any, Any]] = []
        if isinstance(node, dict):
            children = list(node.items())
        elif isinstance(node, list):
            children = list(enumerate(node))
        for key, child in children:
            nodes.append((node, key))
            stack.append(child)
    if not nodes:
        return value
    parent, key = rng.choice(nodes)
    choice = rng.random()
    if choice < 0.1:
        depth = rng.choice([70, 500, 3000])
        parent[key] = json.loads("[" * depth + "]" * depth) if depth < 900 else None
    elif choice < 0.2 and isinstance(parent, dict):
        del parent[key]
    else:
        parent[key] = copy.deepcopy(rng.choice(ODD_VALUES))
    return value


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if not buf:
            break
        pos = rng.randrange(len(buf))
        op = rng.random()
        if op < 0.4:
            buf[pos] = rng.randrange(256)
        elif op < 0.7:
            del buf[pos : pos + rng.randint(1, 20)]
        else:
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    return bytes(buf)


def request_bytes(rng: random.Random, port: int) -> bytes:
    body_obj = rng.choice(BASES)
    kind = rng.random()
    if kind < 0.45:
        body = json.dumps(mutate_json(rng, body_obj)).encode()
    elif kind < 0.65:
        body = mutate_bytes(rng, json.dumps(body_obj).encode())
    elif kind < 0.7:
        body = b"[" * 5000 + b"]" * 5000
    else:
        body = json.dumps(body_obj).encode()
    headers = {"Host": f"127.0.0.1:{port}", "Content-Type": "application/json", "Authorization": "Bearer k"}
    head_kind = rng.random()
    if head_kind < 0.05:
        headers["Authorization"] = "Bearer k\udcff\udcfe"
    elif head_kind < 0.1:
        headers["Content-Encoding"] = rng.choice(["gzip", "deflate", "br", "zstd", "x-odd"])
        if rng.random() < 0.5:
            body = gzip.compress(body)
    elif head_kind < 0.15:
        headers["Content-Type"] = rng.choice(["text/plain", "application/json; charset=latin-1", "", "a/b/c"])
    elif head_kind < 0.2:
        headers["Authorization"] = rng.choice(["", "Bearer", "Basic abc", "Bearer " + "k" * 9000])
    length = len(body)
    if rng.random() < 0.03:
        length = max(0, length - rng.randint(1, 10))
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    raw_head = f"POST /v1/chat/completions HTTP/1.1\r\n{head}Content-Length: {length}\r\nConnection: close\r\n\r\n"
    return raw_head.encode("utf-8", "surrogateescape") + body


class Upstream:
    """Answers with a valid reply, or (one time in three) a mutated one."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        text = "Once upon a time." if "story" in json.dumps(body) else "Paris."
        n = body.get("n") or 1
        broken = self.rng.random() < 0.33
        if not body.get("stream"):
            reply = {
                "id": "x", "object": "chat.completion", "created": 0, "model": "m",
                "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                            for i in range(n)],
            }
            data = json.dumps(mutate_json(self.rng, reply) if broken else reply).encode()
            return web.Response(body=mutate_bytes(self.rng, data) if broken and self.rng.random() < 0.3 else data,
                                content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(n):
            for word in [*text.split(" "), None]:
                delta = {"content": word + " "} if word else {}
                chunk: Any = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
                              "choices": [{"index": i, "delta": delta, "finish_reason": None if word else "stop"}]}
                if broken and self.rng.random() < 0.3:
                    chunk = mutate_json(self.rng, chunk)
                await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response


async def send(port: int, data: bytes) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 30)
        await asyncio.wait_for(reader.read(), 30)
    except (ConnectionError, TimeoutError):
        return -1
    finally:
        writer.close()
    parts = line.split()
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else -1


async def main(args: argparse.Namespace) -> None:
    setup_logging(args.log_level)
    upstream_app = web.Application()
    upstream_app.router.add_post("/v1/chat/completions", Upstream(args.seed).handle)
    up_runner = web.AppRunner(upstream_app)
    await up_runner.setup()
    up_site = web.TCPSite(up_runner, "127.0.0.1", 0)
    await up_site.start()
    up_port = up_site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    with tempfile.TemporaryDirectory() as tmp:
        lg, pg = build_models(Path(args.cache))
        (Path(tmp) / "default.yaml").write_text(POLICY)
        settings = Settings.model_validate(
            {
                "upstreams": {"default": {"base_url": f"http://127.0.0.1:{up_port}/v1", "api_key": "sk-up"}},
                "policies_dir": tmp,
                "guards": {
                    "prompt_guard": {"family": "prompt-guard-2", "model": str(pg)},
                    "llama_guard": {"family": "llama-guard-3-1b", "model": str(lg)},
                },
            }
        )
        app = build_app(settings)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        while not app[READINESS].ready:  # noqa: ASYNC110 - readiness is a flag, the guards load in the background
            await asyncio.sleep(0.1)
        rng = random.Random(args.seed)
        payloads = [request_bytes(rng, port) for _ in range(args.requests)]
        statuses: collections.Counter[int] = collections.Counter()
        gate = asyncio.Semaphore(args.concurrency)

        async def one(data: bytes) -> None:
            async with gate:
                statuses[await send(port, data)] += 1

        started = time.perf_counter()
        await asyncio.gather(*(one(p) for p in payloads))
        took = time.perf_counter() - started
        await runner.cleanup()
    await up_runner.cleanup()
    print(f"{args.requests} requests in {took:.1f} s (seed {args.seed}, concurrency {args.concurrency})")
    print("| status | count |\n|---|---|")
    for status, count in sorted(statuses.items()):
        print(f"| {status if status > 0 else 'no answer'} | {count} |")
    print(f"500s: {sum(c for s, c in statuses.items() if s >= 500 and s not in (502, 503, 504))}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--log-level", default="error", help="info shows every request's record (stdout)")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "guardrail-demo-models"))
    asyncio.run(main(parser.parse_args()))
