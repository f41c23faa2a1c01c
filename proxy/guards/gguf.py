"""Llama Guard from a GGUF file in process (llama-cpp-python), for CPU-only hosts.

The prompt is built with the same pieces as the transformers backend and tokenized by the GGUF's
own vocabulary: special tokens by name, text with special-token parsing off (a user cannot forge a
turn). One evaluation gives the last position's logits; the score is P(unsafe) as everywhere else.
A prompt over `max_tokens` fails before evaluation; the context holds `max_tokens` plus the
category continuation. One evaluation is one runner step: the single llama.cpp context cannot be
shared between interleaved prompts, so the token cap is what bounds another request's wait.
"""

from __future__ import annotations

import math
from typing import Any

from proxy.guards.guard import ConversationScore, GuardError, GuardLimitExceeded, Taxonomy, Turn
from proxy.guards.llama_guard_prompt import FAMILIES, Special, Text, build, merge_text, read_categories, read_verdict
from proxy.guards.runner import GuardRunner
from proxy.settings import GuardSettings


def softmax_at(logits: Any, ids: list[int]) -> float:
    """The summed probability of `ids` under softmax(logits), computed in float64."""
    import numpy as np

    values = np.asarray(logits, dtype=np.float64)
    top = values.max()
    norm = top + math.log(float(np.exp(values - top).sum()))
    return float(np.exp(values[ids] - norm).sum())


class _Model:
    def __init__(self, settings: GuardSettings, name: str, n_ctx: int | None = None) -> None:
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise GuardError(
                f"guard {name!r}: backend llama-cpp needs llama-cpp-python: pip install 'guardrail-proxy[gguf]'"
            ) from exc
        try:
            # The prompt, the forced `unsafe` token and the category continuation.
            n_ctx = n_ctx or settings.token_limit + settings.max_new_tokens + 1
            self.llm = Llama(model_path=settings.model, n_ctx=n_ctx, logits_all=False, verbose=False)
        except (ValueError, OSError, RuntimeError) as exc:
            raise GuardError(f"guard {name!r} could not load GGUF {settings.model!r}: {exc}") from exc
        self.family = FAMILIES[settings.family]
        self.settings = settings
        self.name = name
        self.safe_ids = [i for text in self.family.verdict_texts("safe") for i in self._single(text)]
        self.unsafe_ids = [i for text in self.family.verdict_texts("unsafe") for i in self._single(text)]
        if not self.safe_ids or not self.unsafe_ids:
            raise GuardError(f"guard {name!r}: the GGUF vocabulary has no single token for safe/unsafe")
        self.stop_ids = {
            self.llm.token_eos(),
            *[self._special(t) for t in self.family.stop_tokens if self._is_special(t)],
        }

    def _single(self, text: str) -> list[int]:
        ids = self.llm.tokenize(text.encode(), add_bos=False, special=False)
        return ids if len(ids) == 1 else []

    def _is_special(self, token: str) -> bool:
        return len(self.llm.tokenize(token.encode(), add_bos=False, special=True)) == 1

    def _special(self, token: str) -> int:
        ids = self.llm.tokenize(token.encode(), add_bos=False, special=True)
        if len(ids) != 1:
            raise GuardError(f"guard {self.name!r}: {token} is not one token in this GGUF; is family right?")
        return int(ids[0])

    def encode(self, turns: list[Turn], taxonomy: Taxonomy) -> list[int]:
        ids: list[int] = []
        for piece in merge_text(build(self.family, turns, taxonomy)):
            if isinstance(piece, Special):
                ids.append(self._special(piece.token))
            elif isinstance(piece, Text):
                try:
                    data = piece.text.encode()
                except UnicodeEncodeError as exc:  # a lone surrogate; the text itself is never quoted
                    raise GuardError(f"guard {self.name!r}: the conversation cannot be encoded ({exc.reason})") from exc
                ids.extend(self.llm.tokenize(data, add_bos=False, special=False))
            else:
                raise GuardError(
                    f"guard {self.name!r}: GGUF guards cannot screen images (use the transformers backend)"
                )
        return ids

    def _last_logits(self) -> Any:
        """The last evaluated position's logits, read from the context (llama-cpp-python keeps no
        copy unless logits_all, which would cost n_ctx x vocab floats)."""
        import llama_cpp
        import numpy as np

        pointer = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(self.llm.n_vocab(),)).copy()

    def _next_logits(self, ids: list[int]) -> Any:
        self.llm.reset()
        self.llm.eval(ids)
        return self._last_logits()

    def score(self, turns: list[Turn], taxonomy: Taxonomy, categories_from: float) -> ConversationScore:
        ids = self.encode(turns, taxonomy)
        if len(ids) > self.settings.token_limit:
            raise GuardLimitExceeded("the conversation", len(ids), self.settings.token_limit, self.name)
        logits = self._next_logits(ids)
        unsafe, binary, mass = read_verdict(
            self.family, softmax_at(logits, self.safe_ids), softmax_at(logits, self.unsafe_ids), self.settings.min_mass
        )
        if max(unsafe, binary) < categories_from:
            return ConversationScore(unsafe, binary, mass)
        generated: list[int] = []
        logits = self._next_logits([*ids, self.unsafe_ids[0]])
        for _ in range(self.settings.max_new_tokens):
            token = int(logits.argmax())
            if token in self.stop_ids:
                break
            generated.append(token)
            self.llm.eval([token])
            logits = self._last_logits()
        text = self.llm.detokenize(generated).decode("utf-8", errors="replace")
        kept, all_excluded = read_categories(text, taxonomy)
        return ConversationScore(unsafe, binary, mass, categories=kept, all_excluded=all_excluded)


class GGUFLlamaGuard:
    """A ConversationGuard on a GGUF file; llama.cpp calls run in the device runner's thread."""

    def __init__(self, name: str, settings: GuardSettings, runner: GuardRunner) -> None:
        self.name = name
        self.settings = settings
        self.runner = runner
        self._model: _Model | None = None

    async def load(self) -> None:
        self._model = await self.runner.call(lambda: _Model(self.settings, self.name))

    async def score_conversation(
        self, turns: list[Turn], taxonomy: Taxonomy, *, categories_from: float = 0.5
    ) -> ConversationScore:
        model = self._model
        if model is None:
            raise GuardError(f"guard {self.name!r} is not loaded")
        return await self.runner.call(lambda: model.score(turns, taxonomy, categories_from))

    async def encode(self, turns: list[Turn], taxonomy: Taxonomy) -> list[int]:
        model = self._model
        if model is None:
            raise GuardError(f"guard {self.name!r} is not loaded")
        return await self.runner.call(lambda: model.encode(turns, taxonomy))
