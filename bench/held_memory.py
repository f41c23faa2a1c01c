"""Held-reply bench (issue 7.3): what one large streamed reply costs the proxy while it is held for
the output check, and how long parsing many SSE events stalls the event loop.

The proxy runs in a subprocess (build_app, a route with an output check by a trivial in-process
guard that allows everything), a local upstream on 127.0.0.1 streams `--size-mb` of ~200-byte
chunks, and the bench reads the proxy's VmRSS from /proc while a client reads the answer. A 10 ms
ticker inside the proxy reports the worst event-loop gap. A second subprocess times `hold()` on
10,000 events that arrive in one read.

`--tree` points at another checkout (e.g. a `git worktree` of an older commit) to measure its code;
settings it does not know (the caps) are left out there.

    python bench/held_memory.py                          # this checkout: caps raised, default caps
    python bench/held_memory.py --tree /tmp/before-d     # an older checkout, no caps
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
POLICY = """
route_defaults:
  refusal: "Blocked."
routes:
  - name: chat
    match: {path: /v1/chat/completions, model: "*"}
    output:
      - {guard: llama_guard, threshold: 0.5}
"""
MiB = 1024 * 1024


def event(content: str) -> bytes:
    chunk = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
    }
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


def sized_event(size: int) -> bytes:
    overhead = len(event(""))
    words = ("lorem ipsum dolor sit amet " * (size // 4 + 1))[: max(1, size - overhead)]
    return event(words)


# ---------------------------------------------------------------- inside the proxy subprocess


def serve_proxy(upstream_url: str, policies_dir: str, max_held_bytes: int, max_events: int) -> None:
    from proxy.app import build_app
    from proxy.guards.guard import ConversationScore
    from proxy.settings import ServerSettings, Settings

    class AllowGuard:
        name = "llama_guard"

        async def score_conversation(self, turns: Any, taxonomy: Any, *, categories_from: float = 0.5) -> Any:
            return ConversationScore(0.01, 0.01, 1.0)

    server: dict[str, Any] = {"keepalive_interval_s": 5.0, "log_level": "warning"}
    if "max_held_bytes" in ServerSettings.model_fields:
        server |= {"max_held_bytes": max_held_bytes, "max_stream_events": max_events}
    settings = Settings.model_validate(
        {
            "server": server,
            "upstreams": {"default": {"base_url": upstream_url, "read_timeout_s": 300, "total_timeout_s": 900}},
            "policies_dir": policies_dir,
        }
    )
    app = build_app(settings, guards={"llama_guard": AllowGuard()})
    worst = [0.0]

    async def gap(request: web.Request) -> web.Response:
        value = worst[0]
        if "reset" in request.query:
            worst[0] = 0.0
        return web.json_response({"worst_gap_s": value})

    app.router.add_get("/bench/gap", gap)

    async def main() -> None:
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        print(f"BENCH_PORT {port}", flush=True)
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            worst[0] = max(worst[0], now - last)
            last = now

    asyncio.run(main())


def time_parse(events: int, repeat: int) -> None:
    from proxy.streaming import buffered

    body = b"".join(sized_event(200) for _ in range(events)) + b"data: [DONE]\n\n"
    kwargs: dict[str, Any] = {}
    if "max_bytes" in inspect.signature(buffered.hold).parameters:
        kwargs = {"max_bytes": 1 << 40, "max_events": 1 << 40}

    async def one_read() -> AsyncIterator[bytes]:
        yield body

    async def run() -> tuple[float, float]:
        worst, stop = 0.0, False

        async def tick() -> None:
            nonlocal worst
            last = time.perf_counter()
            while not stop:
                await asyncio.sleep(0.005)
                now = time.perf_counter()
                worst = max(worst, now - last)
                last = now

        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0.02)
        start = time.perf_counter()
        await buffered.hold(one_read(), **kwargs)
        took = time.perf_counter() - start
        stop = True
        await ticker
        return took, worst

    runs = [asyncio.run(run()) for _ in range(repeat)]
    print(
        json.dumps(
            {
                "events": events,
                "bytes": len(body),
                "parse_s": statistics.median(r[0] for r in runs),
                "worst_gap_s": max(r[1] for r in runs),
            }
        )
    )


# ---------------------------------------------------------------- the bench itself


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


def reset_peak(pid: int) -> None:
    """VmHWM back to the current RSS, so it shows the peak of what follows."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


async def start_upstream(size: int, event_bytes: int) -> tuple[web.AppRunner, str]:
    one = sized_event(event_bytes)
    piece = one * max(1, (64 * 1024) // len(one))
    finish = b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,"model":"m",'
    finish += b'"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'

    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        sent = 0
        try:
            while sent < size:
                await response.write(piece)
                sent += len(piece)
            await response.write(finish)
            await response.write_eof()
        except ConnectionError:
            pass  # the proxy stopped reading at a cap
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}/v1"


def subprocess_env(tree: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(tree),
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


async def run_stream(tree: Path, size: int, event_bytes: int, max_held: int, max_events: int) -> dict[str, Any]:
    runner, upstream_url = await start_upstream(size, event_bytes)
    with tempfile.TemporaryDirectory() as policies:
        (Path(policies) / "default.yaml").write_text(POLICY)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "serve-proxy",
            upstream_url,
            policies,
            str(max_held),
            str(max_events),
            cwd=tree,
            env=subprocess_env(tree),
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            line = b""
            while not line.startswith(b"BENCH_PORT "):  # the proxy's own log lines come first
                line = await proc.stdout.readline()
                if not line:
                    raise RuntimeError("the proxy subprocess exited before serving")
            port = int(line.split()[1])
            return await measure(proc.pid, f"http://127.0.0.1:{port}")
        finally:
            proc.terminate()
            await proc.wait()
            await runner.cleanup()


async def measure(pid: int, url: str) -> dict[str, Any]:
    body = {"model": "m", "messages": [{"role": "user", "content": "Say hello."}], "stream": True}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as http:
        # Warm up (first request imports and allocates), then measure a fresh peak.
        async with http.post(url + "/v1/chat/completions", json={**body, "stream": False}) as resp:
            await resp.read()
        await asyncio.sleep(0.5)
        before = rss_kib(pid)
        reset_peak(pid)
        async with http.get(url + "/bench/gap?reset=1") as resp:
            await resp.read()
        peak, done = before, False

        async def poll() -> None:
            nonlocal peak
            while not done:
                peak = max(peak, rss_kib(pid))
                await asyncio.sleep(0.01)

        poller = asyncio.create_task(poll())
        start, received = time.perf_counter(), 0
        async with http.post(url + "/v1/chat/completions", json=body) as resp:
            status = resp.status
            async for data in resp.content.iter_any():
                received += len(data)
        took = time.perf_counter() - start
        done = True
        await poller
        async with http.get(url + "/bench/gap") as resp:
            gap = (await resp.json())["worst_gap_s"]
        await asyncio.sleep(0.5)
        return {
            "status": status,
            "answer_bytes": received,
            "seconds": took,
            "rss_before_mib": before / 1024,
            "peak_growth_mib": (max(peak, rss_kib(pid, "VmHWM")) - before) / 1024,
            "after_growth_mib": (rss_kib(pid) - before) / 1024,
            "worst_gap_ms": gap * 1000,
        }


def parse_bench(tree: Path, events: int, repeat: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "parse", str(events), str(repeat)],
        cwd=tree,
        env=subprocess_env(tree),
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "serve-proxy":
        serve_proxy(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "parse":
        time_parse(int(sys.argv[2]), int(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, default=ROOT, help="checkout whose proxy package is measured")
    parser.add_argument("--size-mb", type=float, default=50.0)
    parser.add_argument("--event-bytes", type=int, default=200)
    parser.add_argument("--parse-events", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    size = int(args.size_mb * MiB)
    label = str(args.tree)

    parsed = parse_bench(args.tree, args.parse_events, args.repeat)
    print(f"tree: {label}")
    print(
        f"parse {parsed['events']} events ({parsed['bytes'] / MiB:.1f} MiB) in one read: "
        f"{parsed['parse_s'] * 1000:.0f} ms (median of {args.repeat}), worst loop gap "
        f"{parsed['worst_gap_s'] * 1000:.0f} ms"
    )
    caps = [
        ("raised: 64 MiB / 1,000,000 events", 64 * MiB, 1_000_000),
        ("default: 16 MiB / 100,000 events", 16 * MiB, 100_000),
    ]
    header = (
        f"{'caps (max_held_bytes / max_stream_events)':<42} {'status':>6} {'answer MiB':>10} {'s':>6} "
        f"{'RSS before':>10} {'peak +MiB':>9} {'after +MiB':>10} {'worst gap ms':>12}"
    )
    print(f"stream of {args.size_mb:g} MB in {args.event_bytes}-byte events")
    print(header)
    for name, max_held, max_events in caps:
        r = asyncio.run(run_stream(args.tree, size, args.event_bytes, max_held, max_events))
        print(
            f"{name:<42} {r['status']:>6} {r['answer_bytes'] / MiB:>10.1f} {r['seconds']:>6.1f} "
            f"{r['rss_before_mib']:>10.0f} {r['peak_growth_mib']:>9.0f} {r['after_growth_mib']:>10.0f} "
            f"{r['worst_gap_ms']:>12.0f}"
        )


if __name__ == "__main__":
    main()
