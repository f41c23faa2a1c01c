"""Prompt Guard 1 and 2 on transformers, in process; its `Windowing` (texts -> windows of ids, with the
caps) and `Classes` (which probabilities make the score) also serve the TEI backend (guards/tei.py).

Long texts are never truncated: each text is cut into windows of `window_tokens` (CLS and SEP
included) overlapping by `window_overlap_tokens`; a text's score is the max over its windows. A
check is two kinds of runner job: one tokenizes the request's texts (past `max_windows` for one text,
or `max_tokens` for all of them, the check fails before any forward pass), then its windows go to the
model: at most `forward_batch` of them in one job merged with other requests' windows, more as bulk
steps of about `step_tokens` (at least one window, at most `forward_batch`) that yield to ordinary
jobs (see runner), so a short request waits for at most the one step already running; a cancelled
check submits no more steps.
Scores: PG2 P(class 1, malicious); PG1 P(jailbreak) for user text and P(injection)+P(jailbreak) for
third-party text (reference §3.2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from proxy.guards.guard import GuardError, GuardLimitExceeded, ScreenText, TextScore, tokens_at_least
from proxy.guards.hub import explain, load_kwargs, pick_dtype, quantize, quiet_transformers
from proxy.guards.runner import GuardRunner, current_tenant
from proxy.guards.verdict_cache import VerdictCache, digest_text
from proxy.settings import GuardSettings


def window_spans(word_starts: Sequence[bool], size: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) of each window over a text's ids (`word_starts[i]`: id i begins a whitespace-
    delimited word): at most `size` ids, each starting about `size - overlap` after the previous,
    together covering every id. A window starts and ends at a word start wherever one is in reach (a
    word is a few ids; reach is `size - overlap` ids), so its text tokenizes on its own to exactly its
    ids: what a remote backend (TEI) is sent scores as in process. A word longer than that is cut."""
    count = len(word_starts)
    spans: list[tuple[int, int]] = []
    start, step = 0, size - overlap
    while start + size < count:
        end = _last_word_start(word_starts, start + 1, start + size) or start + size
        spans.append((start, end))
        start = _last_word_start(word_starts, start + 1, min(start + step, end)) or min(start + step, end)
    spans.append((start, count))
    return spans


def _last_word_start(word_starts: Sequence[bool], low: int, high: int) -> int | None:
    for index in range(high, low - 1, -1):
        if word_starts[index]:
            return index
    return None


def windows(ids: list[int], size: int, overlap: int, word_starts: Sequence[bool] | None = None) -> list[list[int]]:
    """Consecutive slices of at most `size` ids covering all, cut as `window_spans` says (every id a
    word start when `word_starts` is not known)."""
    return [ids[a:b] for a, b in window_spans(word_starts or [True] * len(ids), size, overlap)]


def normalize_whitespace(text: str, tokenize: Any) -> str:
    """Undo whitespace tricks that split words into harmless fragments (reference §3.4): drop all
    whitespace, tokenize the compacted text, and put one space back only before tokens whose first
    character originally followed whitespace. Falls back to the raw text if tokens can't be placed."""
    kept: list[int] = []
    for index, char in enumerate(text):
        if not char.isspace():
            kept.append(index)
    compact = "".join(text[i] for i in kept)
    if not compact:
        return text
    try:
        pieces = tokenize(compact)
        out: list[str] = []
        cursor = 0
        for piece in pieces:
            surface = piece.replace("▁", "").replace("Ġ", "")
            if not surface:
                continue
            found = compact.find(surface, cursor)
            if found < 0:
                return text
            original = kept[found]
            if out and original > 0 and text[original - 1].isspace():
                out.append(" ")
            out.append(compact[cursor : found + len(surface)] if found > cursor else surface)
            cursor = found + len(surface)
        out.append(compact[cursor:])
        return "".join(out)
    except Exception:  # a tokenizer that cannot round-trip its pieces: keep the raw text
        return text


@dataclass(frozen=True)
class Classes:
    """Which class probabilities make a text's score (reference §3.2), read from the model's config."""

    three_labels: bool
    injection: int
    jailbreak: int

    @classmethod
    def from_config(cls, config: Any, settings: GuardSettings, name: str) -> Classes:
        labels = {k.upper(): v for k, v in (config.label2id or {}).items()}
        three_labels = settings.family == "prompt-guard-1"
        if three_labels and config.num_labels != 3:
            raise GuardError(f"guard {name!r}: prompt-guard-1 needs 3 labels, the model has {config.num_labels}")
        return cls(three_labels, labels.get("INJECTION", 1), labels.get("JAILBREAK", 2))

    def value(self, probs: list[float], source: str) -> float:
        if not self.three_labels:
            return probs[1]
        if source == "user":
            return float(probs[self.jailbreak])
        return float(probs[self.injection] + probs[self.jailbreak])


@dataclass(frozen=True)
class Cut:
    """A text as Prompt Guard scores it: the text given to the tokenizer, its ids, its windows, and
    each window's [start, end) in characters of that text (empty without a fast tokenizer)."""

    prepared: str
    ids: list[int]
    windows: list[list[int]]
    spans: list[tuple[int, int]]


class Windowing:
    """A request's texts -> windows of token ids, with the caps; every Prompt Guard backend (in process,
    TEI) windows through this one class, so a text is cut the same way wherever it is scored."""

    def __init__(self, tokenizer: Any, settings: GuardSettings, name: str) -> None:
        self.tokenizer = tokenizer
        self.settings = settings
        self.name = name
        self.size = settings.window_tokens - 2  # CLS and SEP are added around each window
        self.overlap = min(settings.window_overlap_tokens, self.size - 1)

    def prepare(self, text: str) -> str:
        """The text exactly as the tokenizer is given it."""
        if self.settings.normalize_whitespace:
            return normalize_whitespace(text, self.tokenizer.tokenize)
        return text

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer(self.prepare(text), add_special_tokens=False, verbose=False).input_ids)

    def cut(self, text: str) -> Cut:
        prepared = self.prepare(text)
        if not self.tokenizer.is_fast:  # no offsets: windows are cut anywhere (in process only)
            ids = self.ids(text)
            return Cut(prepared, ids, windows(ids, self.size, self.overlap), [])
        enc = self.tokenizer(prepared, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids, offsets = list(enc.input_ids), enc.offset_mapping
        # A SentencePiece word's first piece holds the whitespace before it (the first word has none).
        starts = [i == 0 or prepared[a : a + 1].isspace() for i, (a, _) in enumerate(offsets)]
        spans = window_spans(starts, self.size, self.overlap)
        chars = [(offsets[a][0], offsets[b - 1][1]) if b > a else (0, 0) for a, b in spans]
        return Cut(prepared, ids, [ids[a:b] for a, b in spans], chars)

    def plan(self, requests: list[tuple[ScreenText, ...]]) -> list[list[list[list[int]]] | Exception]:
        """Each request's windows per text, or that request's own error (unencodable text, caps)."""
        return [self._plan_one(texts) for texts in requests]

    def _plan_one(self, texts: tuple[ScreenText, ...]) -> list[list[list[int]]] | Exception:
        limit, total = self.settings.token_limit, 0
        out: list[list[list[int]]] = []
        for number, text in enumerate(texts):
            try:
                head = tokens_at_least(lambda t: len(self.ids(t)), text.text, limit - total)
                if head is not None:
                    return GuardLimitExceeded("the request's text", total + head, limit, self.name, at_least=True)
                cut = self.cut(text.text)
            except Exception as exc:  # the tokenizer's own error types; the text itself is never quoted
                return GuardError(f"guard {self.name!r}: text {number} cannot be tokenized ({type(exc).__name__})")
            total += len(cut.ids)
            if total > limit:
                return GuardLimitExceeded("the request's text", total, limit, self.name)
            wins = cut.windows
            if len(wins) > self.settings.max_windows:
                return GuardError(
                    f"guard {self.name!r}: text {number} needs {len(wins)} windows, "
                    f"over max_windows={self.settings.max_windows}"
                )
            out.append(wins)
        return out


class _Model:
    def __init__(self, settings: GuardSettings, name: str) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from proxy.guards.deberta import cache_relative_positions

        quiet_transformers()
        kwargs = load_kwargs(settings.revision)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(settings.model, **kwargs)
            model = AutoModelForSequenceClassification.from_pretrained(
                settings.model, dtype=pick_dtype(settings.device, settings.dtype), **kwargs
            )
        except Exception as exc:
            raise explain(name, settings.model, exc) from exc
        self.model = quantize(model.to(settings.device).eval(), settings.quantize)
        cache_relative_positions(self.model)
        self.torch = torch
        self.settings = settings
        self.name = name
        self.classes = Classes.from_config(model.config, settings, name)
        self.windowing = Windowing(self.tokenizer, settings, name)
        self.plan = self.windowing.plan
        self.cls = self.tokenizer.cls_token_id
        self.sep = self.tokenizer.sep_token_id
        self.pad = self.tokenizer.pad_token_id or 0

    def _ids(self, text: str) -> list[int]:
        return self.windowing.ids(text)

    def _forward(self, wins: list[list[int]]) -> Any:
        """Class probabilities for windows (CLS + ids + SEP), padded to the longest of them."""
        torch = self.torch
        width = max(len(w) for w in wins) + 2
        ids = torch.full((len(wins), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(wins), width), dtype=torch.long)
        for row, win in enumerate(wins):
            seq = [self.cls, *win, self.sep]
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        with torch.inference_mode():
            logits = self.model(input_ids=ids.to(self.model.device), attention_mask=mask.to(self.model.device)).logits
            return torch.softmax(logits.float() / self.settings.temperature, dim=-1).cpu()

    def forward(self, wins: list[list[int]]) -> list[list[float]]:
        """Class probabilities of each window, `forward_batch` windows per forward pass."""
        step = self.settings.forward_batch
        out: list[list[float]] = []
        for start in range(0, len(wins), step):
            out += self._forward(wins[start : start + step]).tolist()
        return out

    def value(self, probs: list[float], source: str) -> float:
        return self.classes.value(probs, source)


class PromptGuard:
    """A TextGuard backed by a local transformers classifier, run on a GuardRunner."""

    def __init__(self, name: str, settings: GuardSettings, runner: GuardRunner) -> None:
        self.name = name
        self.settings = settings
        self.runner = runner
        self.verdicts: VerdictCache[TextScore] = VerdictCache(settings.verdict_cache_entries)
        self._model: _Model | None = None

    async def load(self) -> None:
        self._model = await self.runner.call(lambda: _Model(self.settings, self.name))

    def _plan(self, requests: list[tuple[ScreenText, ...]]) -> list[list[list[list[int]]] | Exception]:
        assert self._model is not None
        return self._model.plan(requests)

    def _forward(self, wins: list[list[int]]) -> list[list[float]]:
        assert self._model is not None
        return self._model.forward(wins)

    def _step_windows(self) -> int:
        return max(1, min(self.settings.forward_batch, self.settings.step_tokens // self.settings.window_tokens))

    async def score_texts(self, texts: list[ScreenText]) -> list[TextScore]:
        """Texts scored before (same tenant, text and source) come from the verdict cache; the rest
        are scored together (`_score_uncached`, which a remote backend replaces) and remembered."""
        tenant = current_tenant.get()
        keys = [(tenant, digest_text(t.text), t.source) for t in texts]
        known = [self.verdicts.get(key) for key in keys]
        missing = [n for n, score in enumerate(known) if score is None]
        fresh = await self._score_uncached([texts[n] for n in missing])
        for n, score in zip(missing, fresh, strict=True):
            self.verdicts.put(keys[n], score)
            known[n] = score
        return [score for score in known if score is not None]

    async def _score_uncached(self, texts: list[ScreenText]) -> list[TextScore]:
        model = self._model
        if model is None:
            raise GuardError(f"guard {self.name!r} is not loaded")
        if not texts:
            return []
        (plan,) = await self.runner.submit(self._plan, [tuple(texts)], key=(id(self), "plan"))
        if isinstance(plan, Exception):
            raise plan
        flat = [(number, win) for number, wins in enumerate(plan) for win in wins]
        best = [0.0] * len(texts)
        # A check of one forward pass is merged with others; a longer one goes as bulk steps of its own.
        long: object | None = object() if len(flat) > self.settings.forward_batch else None
        piece = len(flat) if long is None else self._step_windows()
        for start in range(0, len(flat), piece):
            chunk = flat[start : start + piece]
            probs = await self.runner.submit(
                self._forward, [win for _, win in chunk], key=long or (id(self), "forward"), bulk=long is not None
            )
            for (number, _), row in zip(chunk, probs, strict=True):
                best[number] = max(best[number], model.value(row, texts[number].source))
        return [TextScore(best[n], len(wins)) for n, wins in enumerate(plan)]
