"""Prompt Guard 1 and 2 on transformers, in process.

Long texts are never truncated: each text is cut into windows of `window_tokens` (CLS and SEP
included) overlapping by `window_overlap_tokens`; every window of a request goes into one forward
pass and a text's score is the max over its windows. Past `max_windows` per request the check
fails (the policy's `on_guard_error` decides). Scores: PG2 P(class 1, malicious); PG1 P(jailbreak)
for user text and P(injection)+P(jailbreak) for third-party text (reference §3.2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.guards.guard import GuardError, ScreenText, TextScore
from proxy.guards.hub import explain, load_kwargs, pick_dtype, quiet_transformers
from proxy.guards.runner import GuardRunner
from proxy.settings import GuardSettings


def windows(ids: list[int], size: int, overlap: int) -> list[list[int]]:
    """Consecutive slices of `size` ids, each starting `size - overlap` after the previous, covering all."""
    if len(ids) <= size:
        return [ids]
    step = size - overlap
    out = []
    start = 0
    while True:
        out.append(ids[start : start + size])
        if start + size >= len(ids):
            return out
        start += step


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
class _Item:
    texts: tuple[ScreenText, ...]


class _Model:
    def __init__(self, settings: GuardSettings, name: str) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        quiet_transformers()
        kwargs = load_kwargs(settings.revision)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(settings.model, **kwargs)
            model = AutoModelForSequenceClassification.from_pretrained(
                settings.model, dtype=pick_dtype(settings.device, settings.dtype), **kwargs
            )
        except Exception as exc:
            raise explain(name, settings.model, exc) from exc
        self.model = model.to(settings.device).eval()
        self.torch = torch
        self.settings = settings
        self.name = name
        labels = {k.upper(): v for k, v in (model.config.label2id or {}).items()}
        self.three_labels = settings.family == "prompt-guard-1"
        if self.three_labels and model.config.num_labels != 3:
            raise GuardError(f"guard {name!r}: prompt-guard-1 needs 3 labels, the model has {model.config.num_labels}")
        self.injection = labels.get("INJECTION", 1)
        self.jailbreak = labels.get("JAILBREAK", 2)
        self.cls = self.tokenizer.cls_token_id
        self.sep = self.tokenizer.sep_token_id
        self.pad = self.tokenizer.pad_token_id or 0

    def _ids(self, text: str) -> list[int]:
        if self.settings.normalize_whitespace:
            text = normalize_whitespace(text, self.tokenizer.tokenize)
        return list(self.tokenizer(text, add_special_tokens=False, verbose=False).input_ids)

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

    def score(self, items: list[_Item]) -> list[list[TextScore] | Exception]:
        torch = self.torch
        size = self.settings.window_tokens - 2
        overlap = min(self.settings.window_overlap_tokens, size - 1)
        plan: list[tuple[int, int, list[int]]] = []  # (item, text, window ids)
        results: list[list[TextScore] | Exception] = []
        for i, item in enumerate(items):
            per_text = [windows(self._ids(t.text), size, overlap) for t in item.texts]
            total = sum(len(w) for w in per_text)
            if total > self.settings.max_windows:
                results.append(GuardError(f"{total} windows exceed max_windows={self.settings.max_windows}"))
                continue
            results.append([])
            for j, wins in enumerate(per_text):
                plan.extend((i, j, w) for w in wins)
        if not plan:
            return results
        probs = torch.cat(
            [
                self._forward([w for _, _, w in plan[start : start + self.settings.forward_batch]])
                for start in range(0, len(plan), self.settings.forward_batch)
            ]
        )
        best: dict[tuple[int, int], tuple[float, int]] = {}
        for row, (i, j, _) in enumerate(plan):
            source = items[i].texts[j].source
            if not self.three_labels:
                value = float(probs[row, 1])
            elif source == "user":
                value = float(probs[row, self.jailbreak])
            else:
                value = float(probs[row, self.injection] + probs[row, self.jailbreak])
            score, count = best.get((i, j), (0.0, 0))
            best[(i, j)] = (max(score, value), count + 1)
        for i, item in enumerate(items):
            if isinstance(results[i], list):
                results[i] = [TextScore(*best[(i, j)]) for j in range(len(item.texts))]
        return results


class PromptGuard:
    """A TextGuard backed by a local transformers classifier, run on a GuardRunner."""

    def __init__(self, name: str, settings: GuardSettings, runner: GuardRunner) -> None:
        self.name = name
        self.settings = settings
        self.runner = runner
        self._model: _Model | None = None

    async def load(self) -> None:
        self._model = await self.runner.call(lambda: _Model(self.settings, self.name))

    def _run(self, items: list[_Item]) -> list[list[TextScore] | Exception]:
        assert self._model is not None
        return self._model.score(items)

    async def score_texts(self, texts: list[ScreenText]) -> list[TextScore]:
        if self._model is None:
            raise GuardError(f"guard {self.name!r} is not loaded")
        if not texts:
            return []
        (result,) = await self.runner.submit(self._run, [_Item(tuple(texts))], key=(id(self), "score"))
        if isinstance(result, Exception):
            raise result
        return result
