"""Benchmark of the stream modes: time to the first released token and total time, `stream: buffer`
vs `stream: incremental`, for a reply streamed at a fixed rate, with Llama Guard checking the reply.

One process: a fake OpenAI upstream on 127.0.0.1 that sends one SSE event per token (an English word
and a space, 5.7 characters on average: 1.4 tokens as `release_tokens` counts them, one in Llama 3's
tokenizer) at `--rate` tokens/s, the real proxy (build_app + start_server, the guard loaded by the
product's own loader and runner thread), and an aiohttp client that timestamps every content event.
The route has no input checks and one output check (Llama Guard), so what differs between rows is the
output path alone. Hold-back is measured at the client: for each token, the time from the upstream sending
it to the client receiving it.

Guards: `tiny` is the deterministic demo Llama Guard (proxy/demo/models.py, 2 layers); `lg3` is
Llama Guard 3 1B in its real shape with random weights (bench/guards_cpu.py), threshold 1.0 so no
random verdict blocks. With `prefix_cache_mb` present in GuardSettings, each row runs with the
prefix cache off (0) and on (the default).

    python bench/incremental.py                          # tiny: 600 tokens at 40/s
    python bench/incremental.py --guard lg3 --tokens 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from proxy.app import build_app
from proxy.observability import setup_logging
from proxy.server.connections import start_server
from proxy.server.state import METRICS, READINESS
from proxy.settings import GuardSettings, Settings

POLICY = """
routes:
  - name: chat
    match: {{path: /v1/chat/completions}}
    stream: {stream}
    release_tokens: {release_tokens}
    guard_timeout_s: 600
    input: []
    output:
      - {{guard: llama_guard, threshold: {threshold}}}
"""


WORDS = "the garden grows near a quiet river while people read books about cooking and travel".split()


def word(k: int) -> str:
    """Token `k` of the reply: an English word and its space (5.7 characters on average)."""
    return WORDS[k % len(WORDS)] + " "


class Upstream:
    """Streams `tokens` words at `rate` per second on an absolute schedule; remembers send times."""

    def __init__(self, tokens: int, rate: float) -> None:
        self.tokens, self.rate = tokens, rate
        self.sent: dict[int, float] = {}

    async def chat(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": "m"}

        def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return b"data: " + json.dumps({**base, "choices": [choice]}).encode() + b"\n\n"

        await response.write(event({"role": "assistant", "content": ""}))
        start = time.perf_counter()
        for k in range(self.tokens):
            await asyncio.sleep(max(0.0, start + k / self.rate - time.perf_counter()))
            self.sent[k] = time.perf_counter()
            await response.write(event({"content": word(k)}))
        await response.write(event({}, "stop") + b"data: [DONE]\n\n")
        return response


async def one_run(proxy_url: str, upstream: Upstream) -> dict[str, float]:
    body = {"model": "m", "messages": [{"role": "user", "content": "Tell me a long story."}], "stream": True}
    received: dict[int, float] = {}
    start = time.perf_counter()
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as http,
        http.post(proxy_url + "/v1/chat/completions", json=body) as resp,
    ):
        while piece := await resp.content.readuntil(b"\n\n"):
            now = time.perf_counter()
            if piece.startswith(b"data: {"):
                for choice in json.loads(piece[6:])["choices"]:
                    for _ in (choice["delta"].get("content") or "").split():
                        received[len(received)] = now  # tokens arrive in the order they were sent
    total = time.perf_counter() - start
    assert len(received) == upstream.tokens, f"got {len(received)} of {upstream.tokens} tokens"
    lags = [received[k] - upstream.sent[k] for k in received]
    return {
        "first_token_s": min(received.values()) - start,
        "total_s": total,
        "lag_mean_s": statistics.mean(lags),
        "lag_max_s": max(lags),
    }


async def bench(args: argparse.Namespace, model: Path, stream: str, cache_mb: float | None) -> dict[str, Any]:
    upstream = Upstream(args.tokens, args.rate)
    upstream_app = web.Application()
    upstream_app.router.add_post("/v1/chat/completions", upstream.chat)
    upstream_runner = web.AppRunner(upstream_app)
    await upstream_runner.setup()
    site = web.TCPSite(upstream_runner, "127.0.0.1", 0)
    await site.start()
    upstream_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    guard: dict[str, Any] = {"family": "llama-guard-3-1b", "model": str(model), "min_mass": 0.0}
    if cache_mb is not None:
        guard["prefix_cache_mb"] = cache_mb
    with tempfile.TemporaryDirectory() as tmp:
        threshold = 1.0 if args.guard == "lg3" else 0.5
        write_policy(Path(tmp), POLICY.format(stream=stream, release_tokens=args.release_tokens, threshold=threshold))
        settings = Settings.model_validate(
            {
                "upstreams": {"default": {"base_url": f"http://127.0.0.1:{upstream_port}/v1", "read_timeout_s": 600}},
                "policies_dir": tmp,
                "guards": {"llama_guard": guard},
            }
        )
        app = build_app(settings)
        runner, proxy_site = await start_server(app, "127.0.0.1", 0)
        try:
            while not app[READINESS].ready:
                if app[READINESS].error:
                    raise RuntimeError(app[READINESS].error)
                await asyncio.sleep(0.1)
            runs = [await one_run(f"http://127.0.0.1:{proxy_site.port}", upstream) for _ in range(args.repeat)]
            windows = app[METRICS].registry.get_sample_value(
                "guardrail_stream_holdback_tokens_count", {"route": "chat"}
            )
        finally:
            await runner.cleanup()
            await upstream_runner.cleanup()
    row: dict[str, Any] = {
        "guard": args.guard,
        "stream": stream if stream == "buffer" else f"incremental/{args.release_tokens}",
        "prefix_cache": "n/a" if cache_mb is None else ("off" if cache_mb == 0 else "on"),
        "tokens": args.tokens,
        "windows": (windows or 0) / args.repeat,
    }
    for key in runs[0]:
        row[key] = statistics.median(r[key] for r in runs)
    print(json.dumps(row), flush=True)
    return row


def write_policy(directory: Path, text: str) -> None:
    (directory / "default.yaml").write_text(text)


def build_model(kind: str, out: Path) -> Path:
    if kind == "tiny":
        from proxy.demo.models import build_llama_guard

        return build_llama_guard(out)
    sys.path.insert(0, str(Path(__file__).parent))
    from guards_cpu import make_lg3_1b  # type: ignore[import-not-found]

    path: Path = make_lg3_1b(out)
    return path


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| guard | stream | prefix cache | reply tokens | windows | first token s | total s | mean lag s | max lag s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['guard']} | {r['stream']} | {r['prefix_cache']} | {r['tokens']} | {r['windows']:.0f} | "
            f"{r['first_token_s']:.2f} | {r['total_s']:.2f} | {r['lag_mean_s']:.2f} | {r['lag_max_s']:.2f} |"
        )
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--guard", choices=["tiny", "lg3"], default="tiny")
    parser.add_argument("--tokens", type=int, default=600)
    parser.add_argument("--rate", type=float, default=40.0, help="upstream tokens per second")
    parser.add_argument("--release-tokens", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--streams", default="buffer,incremental")
    args = parser.parse_args()
    setup_logging("error")
    caches: list[float | None] = [0, 512] if "prefix_cache_mb" in GuardSettings.model_fields else [None]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = await asyncio.to_thread(build_model, args.guard, Path(tmp) / args.guard)
        for cache_mb in caches:
            for stream in args.streams.split(","):
                rows.append(await bench(args, model, stream, cache_mb))
    print(table(rows))


if __name__ == "__main__":
    asyncio.run(main())
