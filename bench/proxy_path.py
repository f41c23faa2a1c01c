"""Benchmark of the proxy's own path (no guard compute): what the proxy adds to a request over a
bare aiohttp relay, on the same machine, against the same fake upstream.

Processes: a fake OpenAI upstream on 127.0.0.1 (16-token replies, JSON or SSE with one write per
token), the server under test (a bare aiohttp relay written here, or the proxy with a route that
runs no checks, or the proxy with the tiny demo guards: Prompt Guard + Llama Guard on input, Llama
Guard on output; every request a new text, so no verdict cache answers), and an aiohttp client in
this process. Each proxy runs from a source tree given by
`--tree name=path` (PYTHONPATH), so one run measures the code before and after a change side by
side. The proxy logs its per-request JSON line to /dev/null (the formatting cost stays in).

    python bench/proxy_path.py                                   # this tree only
    python bench/proxy_path.py --tree before=/tmp/before-f2 --tree after=.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

TOKENS = 16
HERE = Path(__file__).resolve()

NO_CHECKS = """
routes:
  - name: chat
    match: {path: /v1/chat/completions}
    input: []
    output: []
"""
GUARDED = """
routes:
  - name: chat
    match: {path: /v1/chat/completions}
    input:
      - {guard: prompt_guard, threshold: 0.9}
      - {guard: llama_guard, threshold: 0.5}
    output:
      - {guard: llama_guard, threshold: 0.5}
"""
CHECKS_PER_REQUEST = 3
BODY = {"model": "m", "messages": [{"role": "user", "content": "What is the capital of France?"}]}


# ---- the servers, each run as `python bench/proxy_path.py serve-<kind> PORT ...` ----


async def upstream_handler(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    base = {"id": "chatcmpl-bench", "created": 0, "model": body.get("model", "m")}
    words = [f"word{i} " for i in range(TOKENS)]
    if not body.get("stream"):
        message = {"role": "assistant", "content": "".join(words)}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        return web.json_response({**base, "object": "chat.completion", "choices": [choice]})
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for word in words:
        chunk = {**base, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": word}}]}
        await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
    final = {**base, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    await response.write(f"data: {json.dumps(final)}\n\ndata: [DONE]\n\n".encode())
    await response.write_eof()
    return response


def relay_app(upstream: str) -> web.Application:
    """The baseline: read the body, POST it upstream on one shared session, copy the reply back."""
    app = web.Application()
    session_key = web.AppKey("session", aiohttp.ClientSession)

    async def session_ctx(app: web.Application) -> Any:
        app[session_key] = aiohttp.ClientSession()
        yield
        await app[session_key].close()

    async def relay(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {"Content-Type": "application/json"}
        async with app[session_key].post(upstream + "/v1/chat/completions", data=body, headers=headers) as reply:
            if reply.content_type != "text/event-stream":
                return web.Response(body=await reply.read(), status=reply.status, content_type=reply.content_type)
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            async for chunk in reply.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/v1/chat/completions", relay)
    return app


async def serve_forever(app: web.Application, port: int) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


async def serve_proxy(port: int, upstream: str, policy: str, models: str | None) -> None:
    import proxy
    from proxy.app import build_app
    from proxy.observability import setup_logging
    from proxy.server.connections import start_server
    from proxy.server.state import READINESS
    from proxy.settings import Settings

    print(f"proxy from {Path(proxy.__file__).parent}", file=sys.stderr, flush=True)
    setup_logging("info")
    tmp = tempfile.mkdtemp()
    (Path(tmp) / "default.yaml").write_text(policy)
    config: dict[str, Any] = {
        "upstreams": {"default": {"base_url": upstream + "/v1", "api_key": "bench-upstream-key"}},
        "policies_dir": tmp,
    }
    if models:
        config["guards"] = {
            "prompt_guard": {"family": "prompt-guard-2", "model": f"{models}/prompt-guard"},
            "llama_guard": {"family": "llama-guard-3-1b", "model": f"{models}/llama-guard"},
        }
    app = build_app(Settings.model_validate(config))
    await start_server(app, "127.0.0.1", port)
    while not app[READINESS].ready:
        if app[READINESS].error:
            raise SystemExit(app[READINESS].error)
        await asyncio.sleep(0.05)
    print("ready", flush=True)
    await asyncio.Event().wait()


def serve(argv: list[str]) -> None:
    kind, port = argv[0], int(argv[1])
    if kind == "serve-upstream":
        app = web.Application()
        app.router.add_post("/v1/chat/completions", upstream_handler)
        asyncio.run(serve_forever(app, port))
    elif kind == "serve-relay":
        asyncio.run(serve_forever(relay_app(argv[2]), port))
    else:  # serve-proxy PORT UPSTREAM nochecks|guarded [MODELS]
        policy = NO_CHECKS if argv[3] == "nochecks" else GUARDED
        asyncio.run(serve_proxy(port, argv[2], policy, argv[4] if len(argv) > 4 else None))


# ---- the driver ----


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, args: list[str], pythonpath: str | None = None) -> None:
        self.port = free_port()
        env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "TOKENIZERS_PARALLELISM": "false"}
        if pythonpath:
            env["PYTHONPATH"] = pythonpath
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE), args[0], str(self.port), *args[1:]],
            stdout=subprocess.PIPE,
            stderr=None,
            env=env,
        )
        assert self.proc.stdout is not None
        # The proxy's request log goes to stdout too: read the first line, then drain to nowhere.
        while (line := self.proc.stdout.readline()) != b"ready\n":
            if not line:
                raise SystemExit(f"{args[0]} failed to start")
        self.drain = subprocess.Popen(["cat"], stdin=self.proc.stdout, stdout=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()
        self.drain.wait()


_sent = 0


async def one(session: aiohttp.ClientSession, url: str, stream: bool, unique: bool = False) -> float:
    """One request, read to its end. `unique`: a text never sent before (no verdict cache hit)."""
    global _sent
    _sent += 1
    body: dict[str, Any] = {**BODY, "stream": stream}
    if unique:
        body["messages"] = [{"role": "user", "content": f"What is the capital of France? (question {_sent})"}]
    start = time.perf_counter()
    async with session.post(url + "/v1/chat/completions", json=body) as reply:
        data = await reply.read()
        if reply.status != 200 or (stream and not data.endswith(b"data: [DONE]\n\n")):
            raise SystemExit(f"bad reply {reply.status}: {data[:200]!r}")
    return time.perf_counter() - start


async def p50(url: str, stream: bool, n: int, unique: bool = False) -> float:
    async with aiohttp.ClientSession() as session:
        for _ in range(50):
            await one(session, url, stream, unique)
        times = [await one(session, url, stream, unique) for _ in range(n)]
    return statistics.median(times) * 1000


async def rate(url: str, concurrency: int, total: int, stream: bool = True, unique: bool = False) -> float:
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        left = total

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await one(session, url, stream, unique)

        await asyncio.gather(*(worker() for _ in range(concurrency)))  # warm-up: open the connections
        left = total
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return total / (time.perf_counter() - start)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used (Linux /proc): unlike a rate, what one stream costs
    the server does not move with what else runs on a shared machine."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(name: str, url: str, n: int, total: int, pid: int | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {
        "target": name,
        "p50_json_ms": asyncio.run(p50(url, False, n)),
        "p50_stream_ms": asyncio.run(p50(url, True, n)),
    }
    used = cpu_seconds(pid) if pid is not None else 0.0
    row["streams_per_s_c32"] = asyncio.run(rate(url, 32, total))
    if pid is not None:  # the rate run's warm-up round is `total` streams too
        row["cpu_ms_per_stream"] = (cpu_seconds(pid) - used) * 1000 / (2 * total)
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def with_server(args: list[str], pythonpath: str | None, n: int, total: int, name: str) -> dict[str, Any]:
    server = Server(args, pythonpath)
    try:
        return measure(name, server.url, n, total, server.proc.pid)
    finally:
        server.stop()


def build_demo_models() -> str:
    from proxy.demo.run import build_models

    cache = Path(tempfile.gettempdir()) / "guardrail-bench-demo-models"
    build_models(cache)
    return str(cache)


def report(rows: list[dict[str, Any]], direct: dict[str, Any], guarded: list[dict[str, Any]]) -> str:
    relay = next(r for r in rows if r["target"] == "relay")
    out = [
        "| target | added p50 JSON ms | added p50 stream ms | streams/s at c=32 | % of relay | server CPU ms/stream "
        "| relay CPU / server CPU |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cpu = r.get("cpu_ms_per_stream", 0.0)
        out.append(
            f"| {r['target']} | {r['p50_json_ms'] - direct['p50_json_ms']:.2f} | "
            f"{r['p50_stream_ms'] - direct['p50_stream_ms']:.2f} | {r['streams_per_s_c32']:.0f} | "
            f"{100 * r['streams_per_s_c32'] / relay['streams_per_s_c32']:.0f}% | {cpu:.3f} | "
            f"{100 * relay.get('cpu_ms_per_stream', 0.0) / cpu if cpu else 0:.0f}% |"
        )
    out.append(
        f"| (upstream direct) | p50 JSON {direct['p50_json_ms']:.2f} | p50 stream {direct['p50_stream_ms']:.2f} | "
        f"{direct['streams_per_s_c32']:.0f} | |"
    )
    if guarded:
        out += [
            "",
            f"Tiny demo guards ({CHECKS_PER_REQUEST} checks per request: Prompt Guard + Llama Guard on input, "
            "Llama Guard on output), non-streamed:",
            "",
            "| tree | p50 ms | guard machinery ms per check (p50 over no-checks route / 3) | requests/s at c=32 |",
            "|---|---|---|---|",
        ]
        for g in guarded:
            out.append(
                f"| {g['tree']} | {g['p50_json_ms']:.2f} | {g['per_check_ms']:.2f} | {g['req_per_s_c32']:.0f} |"
            )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tree", action="append", default=[], help="name=path of a source tree to run the proxy from")
    parser.add_argument("--n", type=int, default=400, help="sequential requests per p50")
    parser.add_argument("--total", type=int, default=2000, help="streams in the concurrency-32 run")
    parser.add_argument("--no-guards", action="store_true", help="skip the tiny demo guards")
    args = parser.parse_args()
    trees = [t.split("=", 1) for t in args.tree] or [["this", str(HERE.parent.parent)]]
    upstream = Server(["serve-upstream"])
    try:
        direct = measure("upstream", upstream.url, args.n, args.total)
        rows = [with_server(["serve-relay", upstream.url], None, args.n, args.total, "relay")]
        for name, path in trees:
            rows.append(
                with_server(["serve-proxy", upstream.url, "nochecks"], str(Path(path).resolve()), args.n, args.total,
                            f"proxy, no checks ({name})")
            )
        guarded = []
        if not args.no_guards:
            models = build_demo_models()
            for (name, path), plain in zip(trees, rows[1:], strict=True):
                server = Server(["serve-proxy", upstream.url, "guarded", models], str(Path(path).resolve()))
                try:
                    p = asyncio.run(p50(server.url, False, args.n // 2, unique=True))
                    r = asyncio.run(rate(server.url, 32, args.total // 4, stream=False, unique=True))
                finally:
                    server.stop()
                g = {"tree": name, "p50_json_ms": p, "per_check_ms": (p - plain["p50_json_ms"]) / CHECKS_PER_REQUEST,
                     "req_per_s_c32": r}
                print(json.dumps(g), file=sys.stderr, flush=True)
                guarded.append(g)
    finally:
        upstream.stop()
    print(report(rows, direct, guarded))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("serve-"):
        serve(sys.argv[1:])
    else:
        main()
