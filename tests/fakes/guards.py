"""Scripted guards for pipeline tests, injected through build_app: they react to trigger words
and record what they were asked. The real models are tested in tests/guards with tiny models."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from proxy.guards.guard import ConversationScore, GuardError, ScreenText, Taxonomy, TextScore, Turn


@dataclass
class ScriptedTextGuard:
    name: str = "prompt_guard"
    triggers: tuple[str, ...] = ("ignore previous instructions",)
    hit: float = 0.99
    miss: float = 0.01
    calls: list[list[ScreenText]] = field(default_factory=list)

    async def score_texts(self, texts: list[ScreenText]) -> list[TextScore]:
        self.calls.append(list(texts))
        return [TextScore(self.hit if any(t in s.text.lower() for t in self.triggers) else self.miss) for s in texts]


@dataclass
class ScriptedConversationGuard:
    """Flags a trigger word in any turn, naming the word's category; `score` is what it returns."""

    name: str = "llama_guard"
    triggers: dict[str, str] = field(default_factory=lambda: {"bomb": "S9", "stocks": "S6", "heist": "S2"})
    hit: float = 0.97
    miss: float = 0.02
    calls: list[tuple[list[Turn], Taxonomy]] = field(default_factory=list)

    async def score_conversation(
        self, turns: list[Turn], taxonomy: Taxonomy, *, categories_from: float = 0.5
    ) -> ConversationScore:
        self.calls.append((list(turns), taxonomy))
        text = " ".join(t.text.lower() for t in turns)
        codes = tuple(dict.fromkeys(code for word, code in self.triggers.items() if word in text))
        if not codes:
            return ConversationScore(self.miss, self.miss, 1.0)
        kept = tuple(c for c in codes if c not in taxonomy.excluded)
        return ConversationScore(self.hit, self.hit, 1.0, categories=kept, all_excluded=not kept)


@dataclass
class FailingGuard:
    name: str = "llama_guard"
    error: str = "model crashed"
    delay_s: float = 0.0

    async def score_conversation(
        self, turns: list[Turn], taxonomy: Taxonomy, *, categories_from: float = 0.5
    ) -> ConversationScore:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        raise GuardError(self.error)
