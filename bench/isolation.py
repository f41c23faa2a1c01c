"""Isolation bench: does one tenant's big request hurt another tenant's short ones?

The real proxy (build_app, the real transformers guards on the tiny deterministic models built into
a temp dir) in front of a local aiohttp upstream on 127.0.0.1. Tenant A sends short chat requests at
concurrency 8 for `--seconds`; meanwhile tenant B, one request at a time, sends either a
16,000-token prompt or a request whose upstream reply is 1 MB (screened by the output check).
Reports A's latency p50 / p99 / max and A's 503s, next to the same load without B, plus B's
statuses, the largest event-loop gap (a 10 ms ticker in the proxy's loop) and the peak RSS. Each
scenario runs in a fresh process (a stuck guard worker dies with it). Timings only: nothing here
asserts.

    python bench/isolation.py                        # every scenario, 20 s each
    python bench/isolation.py --seconds 10 --only baseline,prompt-16k --step-tokens 128
    cd /tmp/before && PYTHONPATH=. python /work/main/bench/isolation.py   # the same against other code
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

POLICY = """\
routes:
  - name: chat
    match: {path: /v1/chat/completions}
    input:
      - {guard: prompt_guard, threshold: 0.9}
      - {guard: llama_guard, threshold: 0.5}
    output:
      - {guard: llama_guard, threshold: 0.5}
"""
SENTENCE = "The quick brown fox jumps over the lazy dog while the garden grows. "
BIG_REPLY = "BIG-REPLY"
SCENARIOS = {
    "baseline": "A alone",
    "prompt-16k": "A + B sending a 16,000-token prompt",
    "prompt-16k-screened": "A + B's 16,000-token prompt with Llama Guard max_tokens 32768 (screened in chunks)",
    "reply-1mb": "A + B whose upstream reply is 1 MB",
}
KEY_A, KEY_B = "sk-tenant-a", "sk-tenant-b"


async def fake_upstream() -> tuple[web.AppRunner, str]:
    """A minimal OpenAI chat endpoint: 1 MB of text when the request names BIG_REPLY, else a greeting."""
    big = (SENTENCE * (1_000_000 // len(SENTENCE) + 1))[:1_000_000]

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        wants_big = any(BIG_REPLY in str(m.get("content", "")) for m in body.get("messages", []))
        content = big if wants_big else "Hello! How can I help you today?"
        return web.json_response(
            {
                "id": "chatcmpl-bench",
                "object": "chat.completion",
                "created": 0,
                "model": body.get("model", "m"),
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        )

    app = web.Application(client_max_size=8 * 1024 * 1024)
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}/v1"


async def start_proxy(
    models: dict[str, str], upstream_url: str, workdir: Path, scenario: str, step_tokens: int | None
) -> tuple[Any, str]:
    from proxy.app import build_app
    from proxy.server.state import READINESS
    from proxy.settings import GuardSettings, Settings

    (workdir / "default.yaml").write_text(POLICY)
    llama_guard: dict[str, Any] = {"family": "llama-guard-3-1b", "model": models["lg"]}
    prompt_guard: dict[str, Any] = {"family": "prompt-guard-2", "model": models["pg"]}
    if scenario == "prompt-16k-screened" and "max_tokens" in GuardSettings.model_fields:
        llama_guard["max_tokens"] = 32768  # code without caps screens the prompt anyway
    if step_tokens and "step_tokens" in GuardSettings.model_fields:
        llama_guard["step_tokens"] = prompt_guard["step_tokens"] = step_tokens
    settings = Settings.model_validate(
        {
            "upstreams": {"default": {"base_url": upstream_url, "api_key": "sk-upstream"}},
            "tenants": {"a": {"keys": [KEY_A], "policy": "default"}, "b": {"keys": [KEY_B], "policy": "default"}},
            "policies_dir": str(workdir),
            "guards": {"prompt_guard": prompt_guard, "llama_guard": llama_guard},
        }
    )
    app = build_app(settings)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    while not (app[READINESS].ready or app[READINESS].error):  # noqa: ASYNC110 (readiness is a plain flag)
        await asyncio.sleep(0.05)
    if app[READINESS].error:
        raise SystemExit(f"guards failed to load: {app[READINESS].error}")
    return runner, f"http://127.0.0.1:{port}/v1/chat/completions"


async def post(http: aiohttp.ClientSession, url: str, key: str, content: str, timeout_s: float) -> tuple[int, float]:
    body = {"model": "m", "messages": [{"role": "user", "content": content}]}
    start = time.perf_counter()
    try:
        async with http.post(
            url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as resp:
            await resp.read()
            status = resp.status
    except TimeoutError:
        status = 0  # the client gave up
    return status, time.perf_counter() - start


async def run_one(
    scenario: str, models: dict[str, str], big_prompt: str, seconds: float, step_tokens: int | None
) -> dict[str, Any]:
    import proxy

    upstream, upstream_url = await fake_upstream()
    with tempfile.TemporaryDirectory() as tmp:
        server, url = await start_proxy(models, upstream_url, Path(tmp), scenario, step_tokens)
        a_results: list[tuple[int, float]] = []
        b_results: list[tuple[int, float]] = []
        async with aiohttp.ClientSession() as http:
            for i in range(8):  # warm-up: first calls pay one-off costs
                await post(http, url, KEY_A, f"warm-up {i}: how long do cakes bake?", 60)
            deadline = time.monotonic() + seconds
            gaps: list[float] = []

            async def ticker() -> None:
                last = time.perf_counter()
                while time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                    now = time.perf_counter()
                    gaps.append(now - last - 0.01)
                    last = now

            tick = asyncio.create_task(ticker())

            async def tenant_a(worker: int) -> None:
                n = 0
                while time.monotonic() < deadline:
                    a_results.append(
                        await post(http, url, KEY_A, f"Question {worker}.{n}: how long do cakes bake?", 120)
                    )
                    n += 1

            async def tenant_b() -> None:
                content = {"prompt-16k": big_prompt, "prompt-16k-screened": big_prompt}.get(
                    scenario, f"{BIG_REPLY}: tell me a long story"
                )
                while time.monotonic() < deadline:
                    b_results.append(await post(http, url, KEY_B, content, 300))

            b_task = asyncio.create_task(tenant_b()) if scenario != "baseline" else None
            await asyncio.gather(*(tenant_a(w) for w in range(8)))
            if b_task is not None:
                b_task.cancel()  # a disconnect: the proxy drops B's remaining work
                await asyncio.gather(b_task, return_exceptions=True)
            await tick
        await server.cleanup()
    await upstream.cleanup()
    latencies = sorted(lat for _, lat in a_results)
    return {
        "scenario": scenario,
        "code": str(Path(proxy.__file__).parent.parent),
        "a_requests": len(a_results),
        "a_p50_ms": statistics.median(latencies) * 1000,
        "a_p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
        "a_max_ms": latencies[-1] * 1000,
        "a_503": sum(status == 503 for status, _ in a_results),
        "a_other_errors": sum(status not in (200, 503) for status, _ in a_results),
        "b_statuses": sorted({status for status, _ in b_results}),
        "b_requests": len(b_results),
        "loop_gap_max_ms": max(gaps, default=0.0) * 1000,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def build_models(root: Path) -> tuple[dict[str, str], str]:
    """The tiny guards, and a user text of 16,000 tokens in Llama Guard's tokenizer."""
    from transformers import AutoTokenizer

    from proxy.demo.models import build_llama_guard, build_prompt_guard

    lg, pg = build_llama_guard(root / "lg3"), build_prompt_guard(root / "pg2")
    tok = AutoTokenizer.from_pretrained(lg)
    per_sentence = len(tok(SENTENCE * 100, add_special_tokens=False).input_ids) / 100
    text = SENTENCE * int(16_000 / per_sentence)
    return {"lg": str(lg), "pg": str(pg)}, text


def print_table(rows: list[dict[str, Any]], step_tokens: int | None) -> None:
    print(f"code: {rows[0]['code']}, step_tokens: {step_tokens or 'default'}")
    header = (
        "| scenario | A requests | A p50 ms | A p99 ms | A max ms | A 503s | B statuses (requests) "
        "| loop gap max ms | peak RSS MB |"
    )
    print(header)
    print("|" + "---|" * 9)
    for r in rows:
        statuses = ",".join(str(s) for s in r["b_statuses"]) or "-"
        print(
            f"| {r['scenario']} | {r['a_requests']} | {r['a_p50_ms']:.0f} | {r['a_p99_ms']:.0f} | {r['a_max_ms']:.0f} "
            f"| {r['a_503']} | {statuses} ({r['b_requests']}) | {r['loop_gap_max_ms']:.0f} | {r['peak_rss_mb']:.0f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated: " + ", ".join(SCENARIOS))
    parser.add_argument("--step-tokens", type=int, help="the guards' step_tokens (default: the code's default)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--models", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    if args.one:  # a child: one scenario, JSON out
        spec = json.loads(Path(args.models).read_text())
        result = asyncio.run(run_one(args.one, spec["models"], spec["prompt"], args.seconds, args.step_tokens))
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as tmp:
        models, prompt = build_models(Path(tmp))
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps({"models": models, "prompt": prompt}))
        rows = []
        for scenario in args.only.split(","):
            command = [sys.executable, __file__, "--one", scenario, "--models", str(spec_path)]
            command += ["--seconds", str(args.seconds)]
            command += ["--step-tokens", str(args.step_tokens)] if args.step_tokens else []
            child = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=args.seconds + 900,
            )
            lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
            if child.returncode != 0 or not lines:
                print(f"{scenario}: failed\n{child.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(lines[-1]))
            print(f"{scenario}: {SCENARIOS[scenario]}: done", file=sys.stderr)
        if rows:
            print_table(rows, args.step_tokens)


if __name__ == "__main__":
    main()
