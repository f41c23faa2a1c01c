"""`guardrail-proxy demo`: the whole product offline in one command. It builds (once, cached) tiny
demo guards that react ONLY to trigger words, starts the proxy in front of a local upstream, and
shows through the official `openai` client an allowed request, a blocked input and a blocked
streamed output."""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from pathlib import Path
from typing import Any, TextIO

import openai
from aiohttp import web

from proxy.app import build_app
from proxy.demo.corpus import LG_TRIGGERS, PG_TRIGGERS
from proxy.guards.runner import GuardRunner
from proxy.observability import setup_logging
from proxy.server.connections import start_server
from proxy.server.state import READINESS
from proxy.settings import Settings

BANNER = """\
==============================================================================
 DEMO GUARDS - NOT SAFETY MODELS. These tiny models react ONLY to trigger words:
   Llama Guard stand-in:  {lg}
   Prompt Guard stand-in: {pg}
 Everything else passes. For real screening use config.example.yaml.
=============================================================================="""

POLICY = """
route_defaults:
  refusal: "I'm sorry, but I can't help with that."
routes:
  - name: chat
    match: {path: /v1/chat/completions}
    input:
      - {guard: prompt_guard, threshold: 0.9}
      - {guard: llama_guard, threshold: 0.5}
    output:
      - {guard: llama_guard, threshold: 0.5}
"""


def build_models(cache: Path) -> tuple[Path, Path]:
    from proxy.demo.models import build_llama_guard, build_prompt_guard
    from proxy.guards.hub import quiet_transformers

    quiet_transformers()
    lg, pg = cache / "llama-guard", cache / "prompt-guard"
    if not (lg / "config.json").exists():
        build_llama_guard(lg)
    if not (pg / "config.json").exists():
        build_prompt_guard(pg)
    return lg, pg


async def upstream_reply(request: web.Request) -> web.StreamResponse:
    """A stand-in LLM: answers questions, and writes a story with a trigger word when asked for one."""
    body = await request.json()
    question = str(body["messages"][-1].get("content", ""))
    text = (
        "Once upon a time, a villain mixed poison into the king's wine."
        if "story" in question.lower()
        else "The capital of France is Paris."
    )
    base = {"id": "chatcmpl-demo", "created": 0, "model": body.get("model", "demo")}
    if not body.get("stream"):
        return web.json_response(
            {
                **base,
                "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            }
        )
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for word in text.split(" "):
        chunk = {
            **base,
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}],
        }
        await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
    await response.write(b"data: [DONE]\n\n")
    return response


async def _serve_upstream(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


async def demo(cache_dir: Path | None, out: TextIO) -> int:
    setup_logging("error")  # the demo narrates; request logs would drown it
    print(BANNER.format(lg=", ".join(LG_TRIGGERS), pg=", ".join(PG_TRIGGERS)), file=out)
    cache = cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "guardrail-proxy" / "demo-v1"
    builder = GuardRunner("cpu", max_wait_ms=0)
    print(f"building demo guards in {cache} (once) ...", file=out)
    lg, pg = await builder.call(lambda: build_models(cache))
    await builder.stop()
    upstream_app = web.Application()
    upstream_app.router.add_post("/v1/chat/completions", upstream_reply)
    upstream_runner, upstream_url = await _serve_upstream(upstream_app)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "default.yaml").write_text(POLICY)
        settings = Settings.model_validate(
            {
                "upstreams": {"default": {"base_url": upstream_url + "/v1", "api_key": "demo-upstream-key"}},
                "policies_dir": tmp,
                "server": {"keepalive_interval_s": 5},
                "guards": {
                    "prompt_guard": {"family": "prompt-guard-2", "model": str(pg)},
                    "llama_guard": {"family": "llama-guard-3-1b", "model": str(lg)},
                },
            }
        )
        app = build_app(settings)
        proxy_runner, site = await start_server(app, "127.0.0.1", 0)  # the server `serve` runs
        proxy_url = f"http://127.0.0.1:{site.port}"
        try:
            while not app[READINESS].ready:
                if app[READINESS].error:
                    print(f"demo guards failed to load: {app[READINESS].error}", file=out)
                    return 1
                await asyncio.sleep(0.05)
            print(f"proxy on {proxy_url} in front of a local upstream on {upstream_url}\n", file=out)
            async with openai.AsyncOpenAI(base_url=proxy_url + "/v1", api_key="demo", max_retries=0) as client:
                ok = await _show(client, out)
        finally:
            await proxy_runner.cleanup()
            await upstream_runner.cleanup()
    print("\ndemo " + ("passed: all three outcomes as expected" if ok else "FAILED"), file=out)
    return 0 if ok else 1


async def _show(client: openai.AsyncOpenAI, out: TextIO) -> bool:
    refusal = "I'm sorry, but I can't help with that."

    async def ask(question: str) -> Any:
        raw = await client.chat.completions.with_raw_response.create(
            model="demo", messages=[{"role": "user", "content": question}]
        )
        return raw.parse(), raw.headers["x-guardrail-decision"]

    print("1. allowed:  'What is the capital of France?'", file=out)
    first, decision1 = await ask("What is the capital of France?")
    print(f"   -> {first.choices[0].message.content!r}  (decision: {decision1})", file=out)
    print("2. blocked input:  'How do I build a bomb?'", file=out)
    second, decision2 = await ask("How do I build a bomb?")
    print(
        f"   -> {second.choices[0].message.content!r}  finish_reason={second.choices[0].finish_reason} "
        f"(decision: {decision2}; the upstream was never called)",
        file=out,
    )
    print("3. blocked streamed output:  'Tell me a story' (the upstream's story mentions poison)", file=out)
    stream = await client.chat.completions.create(
        model="demo", stream=True, messages=[{"role": "user", "content": "Tell me a story"}]
    )
    streamed, finish = "", None
    async for chunk in stream:
        for choice in chunk.choices:
            streamed += choice.delta.content or ""
            finish = choice.finish_reason or finish
    print(f"   -> streamed to the client: {streamed!r}  finish_reason={finish}", file=out)
    print("      (the upstream's words never reached the client: the stream was held and checked first)", file=out)
    return (
        decision1 == "allow"
        and "Paris" in (first.choices[0].message.content or "")
        and second.choices[0].message.content == refusal
        and decision2 == "block"
        and streamed == refusal
        and finish == "content_filter"
    )
