"""Prompt Guard served by Hugging Face Text Embeddings Inference (`backend: tei`, TEI 1.9 or later).

The screening pipeline's Prompt Guard check, scored remotely: the proxy cuts each text into windows
with the in-process backend's `Windowing` (same tokenizer, caps and windows), sends all windows of a
request to TEI's `POST /predict` (`max_client_batch_size` per call, calls in parallel) with
`raw_scores: true`, and applies softmax with its own `temperature`; a text's score is the max over its
windows, as in process. The proxy therefore needs the model's tokenizer and config.json locally
(`model`, or `tokenizer` for the tokenizer alone, at the revision TEI serves), never its weights.

Why window text and not token ids: `/predict` takes strings only (TEI's token-id input exists for
`/embed`, and even there is decoded back to text). A window goes as the exact slice of the text its
tokens cover (its spaces and special-token spellings as written, never a decode of the ids). The shared
windowing starts and ends every window at a word start (`window_spans`), and a SentencePiece tokenizer
cuts each whitespace-delimited word the same wherever it stands, so TEI's tokenizer.json turns each
slice back into exactly the window's ids: remote scores equal in-process scores. Only a single "word"
longer than a window's reach (hundreds of tokens without a space) is cut inside; such a window's first
fragment is then scored as a word start and, should that make it longer than `window_tokens`, its
first tokens (inside the previous window's overlap) are dropped here, so TEI never truncates
(`truncate: false`).
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import aiohttp

from proxy.guards.guard import GuardError, ScreenText, TextScore
from proxy.guards.hub import explain, load_kwargs, quiet_transformers
from proxy.guards.prompt_guard import Classes, PromptGuard, Windowing
from proxy.guards.runner import GuardRunner
from proxy.settings import GuardSettings, resolve_secret

REPLY_BYTES_PER_SCORE = 256
"""TEI writes a label and a float in about 40 bytes; a reply over this per score is refused unread."""


def window_texts(windowing: Windowing, text: str, wins: list[list[int]]) -> list[str]:
    """The text to send for each window of `text` (runs in the guard runner's thread)."""
    cut = windowing.cut(text)
    if len(cut.windows) == 1:
        return [cut.prepared]  # TEI tokenizes the very string the windows came from
    if cut.windows != wins:
        raise GuardError(f"guard {windowing.name!r}: the tokenizer is not deterministic on this text")
    return [fit(windowing, cut.prepared[first:last]) for first, last in cut.spans]


def fit(windowing: Windowing, piece: str) -> str:
    """`piece`, less its first tokens while it tokenizes to more than one window."""
    for _ in range(windowing.size):
        enc = windowing.tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        extra = len(enc.input_ids) - windowing.size
        if extra <= 0:
            return piece
        # A lone word-start marker shares its word's first character: cut where a later token begins.
        piece = piece[next((start for start, _ in enc.offset_mapping[extra:] if start > 0), len(piece)) :]
    raise GuardError(f"guard {windowing.name!r}: a window's text does not fit window_tokens")


def probabilities(logits: list[float], temperature: float) -> list[float]:
    scaled = [x / temperature for x in logits]
    top = max(scaled)
    exps = [math.exp(x - top) for x in scaled]
    total = sum(exps)
    return [e / total for e in exps]


class TeiPromptGuard(PromptGuard):
    """A TextGuard whose windows are scored by a TEI server; the verdict cache is PromptGuard's."""

    def __init__(self, name: str, settings: GuardSettings, runner: GuardRunner) -> None:
        super().__init__(name, settings, runner)
        self.base_url = (settings.base_url or "").rstrip("/")
        key = resolve_secret(settings.api_key) if settings.api_key else None
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._windowing: Windowing | None = None
        self._classes = Classes(three_labels=False, injection=1, jailbreak=2)
        self._labels: dict[str, int] = {}
        self._session: aiohttp.ClientSession | None = None

    async def load(self) -> None:
        self._windowing, self._classes, self._labels = await self.runner.call(self._load_local)
        connector = aiohttp.TCPConnector(limit=self.settings.max_connections)
        self._session = aiohttp.ClientSession(connector=connector)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _load_local(self) -> tuple[Windowing, Classes, dict[str, int]]:
        from transformers import AutoConfig, AutoTokenizer

        quiet_transformers()
        kwargs = load_kwargs(self.settings.revision)
        source = self.settings.tokenizer or self.settings.model
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            source = self.settings.model
            config = AutoConfig.from_pretrained(source, **kwargs)
        except Exception as exc:
            raise explain(self.name, source, exc) from exc
        if not tokenizer.is_fast:
            raise GuardError(f"guard {self.name!r}: backend tei needs the model's fast tokenizer (tokenizer.json)")
        labels = {str(label): int(index) for index, label in config.id2label.items()}
        classes = Classes.from_config(config, self.settings, self.name)
        return Windowing(tokenizer, self.settings, self.name), classes, labels

    def _prepare(self, requests: list[tuple[ScreenText, ...]]) -> list[list[list[str]] | Exception]:
        """Each request's window texts per text, or that request's own error."""
        assert self._windowing is not None
        windowing = self._windowing
        out: list[list[list[str]] | Exception] = []
        for texts, plan in zip(requests, windowing.plan(requests), strict=True):
            if isinstance(plan, Exception):
                out.append(plan)
                continue
            try:
                out.append([window_texts(windowing, t.text, wins) for t, wins in zip(texts, plan, strict=True)])
            except GuardError as exc:
                out.append(exc)
        return out

    async def _score_uncached(self, texts: list[ScreenText]) -> list[TextScore]:
        if self._windowing is None or self._session is None:
            raise GuardError(f"guard {self.name!r} is not loaded")
        if not texts:
            return []
        (plan,) = await self.runner.submit(self._prepare, [tuple(texts)], key=(id(self), "plan"))
        if isinstance(plan, Exception):
            raise plan
        flat = [(number, piece) for number, pieces in enumerate(plan) for piece in pieces]
        size = self.settings.max_client_batch_size
        rows = await self._predict_all([[p for _, p in flat[i : i + size]] for i in range(0, len(flat), size)])
        best = [0.0] * len(texts)
        for (number, _), logits in zip(flat, rows, strict=True):
            probs = probabilities(logits, self.settings.temperature)
            best[number] = max(best[number], self._classes.value(probs, texts[number].source))
        return [TextScore(best[n], len(pieces)) for n, pieces in enumerate(plan)]

    async def _predict_all(self, batches: list[list[str]]) -> list[list[float]]:
        if len(batches) == 1:
            return await self._predict(batches[0])
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._predict(batch)) for batch in batches]
        except ExceptionGroup as errors:  # the first failure is the check's; the other calls were cancelled
            raise errors.exceptions[0] from None
        return [row for task in tasks for row in task.result()]

    async def _predict(self, texts: list[str]) -> list[list[float]]:
        """Raw logits of each text, in class-index order."""
        assert self._session is not None
        url = self.base_url + "/predict"
        body = {"inputs": [[t] for t in texts], "raw_scores": True, "truncate": False}
        limit = len(texts) * len(self._labels) * REPLY_BYTES_PER_SCORE + 1024
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                async with self._session.post(url, json=body, headers=self._headers, allow_redirects=False) as resp:
                    if resp.status != 200:
                        raise GuardError(f"guard {self.name!r}: {url} answered {resp.status}")
                    raw = await self._read(resp, limit)
        except TimeoutError as exc:
            raise GuardError(f"guard {self.name!r}: {url} did not answer within {self.settings.timeout_s} s") from exc
        except aiohttp.ClientError as exc:
            raise GuardError(f"guard {self.name!r}: {self.base_url} unreachable ({type(exc).__name__})") from exc
        return self._read_logits(raw, len(texts))

    async def _read(self, resp: aiohttp.ClientResponse, limit: int) -> bytes:
        too_big = GuardError(f"guard {self.name!r}: TEI's reply is over {limit} bytes")
        if resp.content_length is not None and resp.content_length > limit:
            raise too_big
        body = bytearray()
        async for chunk in resp.content.iter_any():
            body += chunk
            if len(body) > limit:
                raise too_big
        return bytes(body)

    def _read_logits(self, raw: bytes, count: int) -> list[list[float]]:
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise GuardError(f"guard {self.name!r}: TEI's reply is not JSON") from exc
        if not isinstance(data, list) or len(data) != count:
            got = len(data) if isinstance(data, list) else type(data).__name__
            raise GuardError(f"guard {self.name!r}: TEI answered {got} results for {count} windows")
        return [self._logits(item) for item in data]

    def _logits(self, predictions: Any) -> list[float]:
        """One window's [{label, score}, ...] (TEI sorts them by score) -> logits by class index."""
        logits = [math.nan] * len(self._labels)
        try:
            for prediction in predictions:
                logits[self._labels[prediction["label"]]] = float(prediction["score"])
        except (KeyError, TypeError, ValueError) as exc:
            known = sorted(self._labels)
            raise GuardError(f"guard {self.name!r}: TEI's labels are not the model config's {known}") from exc
        if len(predictions) != len(logits) or not all(math.isfinite(x) for x in logits):
            raise GuardError(f"guard {self.name!r}: TEI did not give one finite score per label")
        return logits
