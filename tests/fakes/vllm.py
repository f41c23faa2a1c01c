"""A fake vLLM server on 127.0.0.1: `/v1/completions` with token-id prompts and top logprobs,
computed by a real (tiny) causal LM, so remote scores can be compared with local ones."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import torch
from aiohttp import web
from transformers import AutoModelForCausalLM, AutoTokenizer


class FakeVLLM:
    def __init__(self, model_dir: Path) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.requests: list[dict[str, Any]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> FakeVLLM:
        app = web.Application()
        app.router.add_post("/v1/completions", self._completions)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1"  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _complete(self, ids: list[int], max_tokens: int, top: int) -> dict[str, Any]:
        with torch.inference_mode():
            x = torch.tensor([ids])
            logprobs = torch.log_softmax(self.model(input_ids=x).logits[0, -1].float(), -1)
            values, indices = logprobs.topk(top)
            tokens = self.tokenizer.convert_ids_to_tokens(indices.tolist())
            top_map = {t: float(v) for t, v in zip(tokens, values.tolist(), strict=True)}
            out = self.model.generate(input_ids=x, max_new_tokens=max_tokens, do_sample=False)
        text = self.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
        return {
            "id": "cmpl-fake",
            "object": "text_completion",
            "model": "guard",
            "choices": [
                {
                    "index": 0,
                    "text": text,
                    "finish_reason": "stop",
                    "logprobs": {"tokens": [], "token_logprobs": [], "top_logprobs": [top_map]},
                }
            ],
        }

    async def _completions(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        if not isinstance(body["prompt"], list):
            return web.json_response({"error": "this fake takes token ids"}, status=400)
        result = await asyncio.to_thread(self._complete, body["prompt"], body["max_tokens"], body["logprobs"])
        return web.json_response(result)
