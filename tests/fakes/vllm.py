"""A fake guard server on 127.0.0.1 speaking vLLM's `/v1/completions` (token-id prompts), Ollama's
`/api/generate` (raw text) and TGI's `/generate` (text), with top logprobs computed by a real (tiny)
causal LM, so remote scores can be compared with local ones. Text prompts get a BOS added and
special-token strings parsed, as those servers do."""

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
        self.broken = False  # answer completions with a body of the wrong shape
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> FakeVLLM:
        app = web.Application()
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/api/generate", self._ollama)
        app.router.add_post("/generate", self._tgi)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1"  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _run(self, ids: list[int], max_tokens: int, top: int) -> tuple[dict[str, float], str]:
        with torch.inference_mode():
            x = torch.tensor([ids])
            logprobs = torch.log_softmax(self.model(input_ids=x).logits[0, -1].float(), -1)
            values, indices = logprobs.topk(top)
            tokens = self.tokenizer.convert_ids_to_tokens(indices.tolist())
            top_map = {t: float(v) for t, v in zip(tokens, values.tolist(), strict=True)}
            out = self.model.generate(input_ids=x, max_new_tokens=max_tokens, do_sample=False)
        return top_map, self.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)

    def _text_ids(self, text: str) -> list[int]:
        return [self.tokenizer.bos_token_id, *self.tokenizer(text, add_special_tokens=False).input_ids]

    async def _ollama(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        assert body["raw"] is True
        top, text = await asyncio.to_thread(
            self._run, self._text_ids(body["prompt"]), body["options"]["num_predict"], body["top_logprobs"]
        )
        first = {"token": "", "logprob": 0.0, "top_logprobs": [{"token": t, "logprob": v} for t, v in top.items()]}
        return web.json_response({"model": body["model"], "response": text, "done": True, "logprobs": [first]})

    async def _tgi(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        params = body["parameters"]
        top, text = await asyncio.to_thread(
            self._run, self._text_ids(body["inputs"]), params["max_new_tokens"], params["top_n_tokens"]
        )
        tokens = [{"id": 0, "text": t, "logprob": v, "special": False} for t, v in top.items()]
        return web.json_response({"generated_text": text, "details": {"top_tokens": [tokens]}})

    def _complete(self, ids: list[int], max_tokens: int, top: int) -> dict[str, Any]:
        top_map, text = self._run(ids, max_tokens, top)
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
        if self.broken:
            return web.json_response({"object": "error", "detail": "no choices here"})
        if not isinstance(body["prompt"], list):
            return web.json_response({"error": "this fake takes token ids"}, status=400)
        result = await asyncio.to_thread(self._complete, body["prompt"], body["max_tokens"], body["logprobs"])
        return web.json_response(result)
