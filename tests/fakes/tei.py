"""A fake Hugging Face Text Embeddings Inference server on 127.0.0.1: `POST /predict` as TEI 1.9
parses and answers it (a string, a pair, or a batch `[[text], ...]`; `raw_scores`, `truncate`;
`--max-client-batch-size`; predictions sorted by score, labels from the model's id2label; errors as
`{"error", "error_type"}`), computed by a real (tiny) sequence classifier on the text it tokenizes
itself, so remote Prompt Guard scores can be compared with in-process ones.

`start_fake_tei(model_dir, host=..., port=...)` starts one (benchmarks use it too); `fault` selects a
broken mode for fault tests."""

from __future__ import annotations

import asyncio
import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import torch
from aiohttp import web
from transformers import AutoModelForSequenceClassification, AutoTokenizer

Fault = Literal["status", "malformed", "count", "nan", "labels", "huge", "hang"]
MAX_INPUT_LENGTH = 512


class FakeTEI:
    def __init__(self, model_dir: Path, *, max_client_batch_size: int = 32) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
        self.id2label = {int(k): str(v) for k, v in self.model.config.id2label.items()}
        self.max_client_batch_size = max_client_batch_size
        self.requests: list[dict[str, Any]] = []
        self.seen: list[list[int]] = []
        """The token ids (CLS and SEP included) of every input scored, in order."""
        self.headers: list[str | None] = []
        self.fault: Fault | None = None
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="fake-tei")  # one model, one forward at a time

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> FakeTEI:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/predict", self._predict)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.url = f"http://{host}:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
        self._worker.shutdown(wait=False)

    def _logits(self, batch: list[list[int]]) -> list[list[float]]:
        """One padded forward pass over a call's inputs (TEI batches them too)."""
        width = max(len(ids) for ids in batch)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([row + [pad] * (width - len(row)) for row in batch])
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in batch])
        with torch.inference_mode():
            out: list[list[float]] = self.model(input_ids=ids, attention_mask=mask).logits.float().tolist()
            return out

    async def _predict(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(request.headers.get("Authorization"))
        inputs, batch = _parse(body["inputs"])
        if batch and len(inputs) > self.max_client_batch_size:
            return _error(422, f"batch size {len(inputs)} > maximum allowed batch size {self.max_client_batch_size}")
        if self.fault == "hang":
            await self._stopping.wait()
        if self.fault == "status":
            return _error(424, "Inference failed", "backend")
        if any(not text for seq in inputs for text in seq):
            return _error(400, "`inputs` cannot be empty", "empty")
        encoded = [self.tokenizer(*seq, add_special_tokens=True).input_ids for seq in inputs]
        if not body.get("truncate", True) and any(len(ids) > MAX_INPUT_LENGTH for ids in encoded):
            return _error(422, f"`inputs` must have less than {MAX_INPUT_LENGTH} tokens")
        encoded = [ids[:MAX_INPUT_LENGTH] for ids in encoded]
        self.seen += encoded
        rows = await asyncio.get_running_loop().run_in_executor(self._worker, self._logits, encoded)
        results = [self._predictions(row, bool(body.get("raw_scores", False))) for row in rows]
        return self._answer(results if batch else results[0])

    def _predictions(self, logits: list[float], raw: bool) -> list[dict[str, Any]]:
        scores = logits if raw else _softmax(logits)
        labels = [self.id2label[i] for i in range(len(scores))]
        if self.fault == "nan":
            scores = [math.nan, *scores[1:]]
        if self.fault == "labels":
            labels = [f"CLASS_{i}" for i in range(len(scores))]
        pairs = sorted(zip(scores, labels, strict=True), key=lambda p: p[0], reverse=True)  # as TEI does
        return [{"score": score, "label": label} for score, label in pairs]

    def _answer(self, data: Any) -> web.Response:
        if self.fault == "malformed":
            return web.Response(text='[[{"score": 0.1, "label"', content_type="application/json")
        if self.fault == "count":
            data = data[:-1]
        if self.fault == "huge":
            data = [*data, "x" * 1_000_000]
        return web.Response(text=json.dumps(data), content_type="application/json")


def _parse(inputs: Any) -> tuple[list[list[str]], bool]:
    """TEI's PredictInput: a string; [a] or [a, b] (one sequence or pair); a batch [[a], [a, b], ...]."""
    if isinstance(inputs, str):
        return [[inputs]], False
    if inputs and isinstance(inputs[0], str):
        return [list(inputs)], False
    return [list(seq) for seq in inputs], True


def _softmax(logits: list[float]) -> list[float]:
    top = max(logits)
    exps = [math.exp(x - top) for x in logits]
    return [e / sum(exps) for e in exps]


def _error(status: int, message: str, kind: str = "validation") -> web.Response:
    return web.json_response({"error": message, "error_type": kind}, status=status)


async def start_fake_tei(
    model_dir: Path, *, host: str = "127.0.0.1", port: int = 0, max_client_batch_size: int = 32
) -> FakeTEI:
    """A started fake TEI serving the Prompt Guard-style classifier in `model_dir` (loaded in a thread);
    its address is `.url`, `await fake.stop()` ends it."""
    fake = await asyncio.to_thread(FakeTEI, model_dir, max_client_batch_size=max_client_batch_size)
    return await fake.start(host, port)
