"""The Guard interface: what the screening pipeline sends a guard and what it gets back.

Two kinds of guard exist. A `TextGuard` (Prompt Guard) scores each untrusted text on its own. A
`ConversationGuard` (Llama Guard) scores the last turn of a User/Agent conversation against a
taxonomy. Both return probabilities; the policy compares them with its thresholds, so one loaded
model serves every tenant.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

TextSource = Literal["user", "third_party"]
Speaker = Literal["User", "Agent"]
PrefetchState = Literal["ready", "busy", "off"]
PrefetchOutcome = Literal["done", "cached", "too_long", "busy", "off", "stopped", "failed"]
"""What became of an output-check prefetch (screening/prefetch.py)."""


class GuardError(Exception):
    """A guard could not produce a score (model error, bad prompt, too many windows, remote failure)."""


class GuardOverloaded(GuardError):
    """The guard runner's queue is full (or the tenant's share of it); the caller should retry later."""


class GuardLimitExceeded(GuardError):
    """One check's input is over the guard's `max_tokens`: refused before any forward pass, so one
    request cannot hold the guard worker for everyone."""

    def __init__(self, what: str, tokens: int, limit: int, guard: str, *, at_least: bool = False) -> None:
        size = f"at least {tokens}" if at_least else str(tokens)
        super().__init__(f"{what} is {size} tokens, over max_tokens={limit} for guard {guard}")
        self.tokens = tokens
        self.limit = limit


PREFIX_CHARS_PER_TOKEN = 8
"""Ordinary text has about 4 characters per token; a prefix of 8 per allowed token nearly always
holds more tokens than the cap when the whole text is over it."""


def tokens_at_least(count: Callable[[str], int], text: str, limit: int) -> int | None:
    """The tokens of a long text's prefix when they alone exceed `limit`, else None (count it all).
    Tokenizing is linear in characters and runs in the guard worker: a megabyte would hold it for
    seconds, so an over-cap text is refused after tokenizing only `limit * 8` characters. The cut
    falls on whitespace, where tokenizers split words, so the prefix's tokens begin the text's."""
    cut = limit * PREFIX_CHARS_PER_TOKEN
    if len(text) <= cut:
        return None
    space = max(text.rfind(" ", 0, cut), text.rfind("\n", 0, cut))
    tokens = count(text[: space if space > 0 else cut])
    return tokens if tokens > limit else None


@dataclass(frozen=True)
class ScreenText:
    text: str
    source: TextSource = "user"


@dataclass(frozen=True)
class TextScore:
    score: float
    windows: int = 1


@dataclass(frozen=True)
class Image:
    data: bytes
    media_type: str = "image/png"


@dataclass(frozen=True)
class Turn:
    speaker: Speaker
    text: str
    images: tuple[Image, ...] = ()


@dataclass(frozen=True)
class Category:
    code: str
    name: str
    description: str | None = None


@dataclass(frozen=True)
class Taxonomy:
    """Which categories the prompt lists. `replace` swaps the family default for `custom`;
    otherwise `custom` is appended. Excluded codes drop their lines and keep the other codes."""

    custom: tuple[Category, ...] = ()
    replace: bool = False
    excluded: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class ConversationScore:
    score: float
    """P(unsafe) of the first content token over the full vocabulary (Meta's definition)."""
    score_binary: float
    """P(unsafe) renormalised over {safe, unsafe}."""
    mass: float
    categories: tuple[str, ...] = ()
    """Codes the model named, excluded codes removed."""
    all_excluded: bool = False
    """The model named codes and every one of them is excluded: counts as safe."""


@dataclass(frozen=True)
class CodeScore:
    category: Category
    probability: float
    """P(the first code the model names after `unsafe` is this one), for a code the prompt lists."""


@dataclass(frozen=True)
class CategoryScores:
    """A verdict with the distribution of its first category code (the moderation endpoint's scores)."""

    verdict: ConversationScore
    codes: tuple[CodeScore, ...]


@runtime_checkable
class TextGuard(Protocol):
    name: str

    async def score_texts(self, texts: list[ScreenText]) -> list[TextScore]: ...


@runtime_checkable
class ConversationGuard(Protocol):
    name: str

    async def score_conversation(
        self, turns: list[Turn], taxonomy: Taxonomy, *, categories_from: float = 0.5
    ) -> ConversationScore:
        """`categories_from`: read categories when the score reaches this value (the lowest
        threshold in use), so a block below 0.5 still names its categories."""
        ...


@runtime_checkable
class CategoryGuard(Protocol):
    """A ConversationGuard that can also give the probability of each listed category code."""

    name: str

    async def score_categories(
        self, turns: list[Turn], taxonomy: Taxonomy, *, categories_from: float = 0.5
    ) -> CategoryScores: ...


Guard = TextGuard | ConversationGuard
