"""The moderation endpoint's screening: one input's checks (the route's input checks, each run to its
end so every score is reported) and their scores as an OpenAI moderation result (categories, scores,
and each guard's own numbers). Used by POST /v1/moderations (proxy/server/moderations.py).

A category's score is the check's P(unsafe) times P(the first code Llama Guard names is c | unsafe),
summed over the codes c that feed that OpenAI category (the first code is one event per code, so the
sum is the probability that it is any of them). Codes feed categories by the name the prompt lists.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from proxy.guards.guard import (
    CategoryGuard,
    CategoryScores,
    ConversationGuard,
    ConversationScore,
    Guard,
    Taxonomy,
    TextGuard,
    Turn,
)
from proxy.guards.llama_guard_prompt import FAMILIES, Family, categories_for
from proxy.policy.models import CheckSettings, RouteSettings
from proxy.protocol import ChatRequest
from proxy.screening.pipeline import CheckResult, Verdict, combine, screen

OPENAI_CATEGORIES = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)
# The categories whose score OpenAI also gives for images (the SDK's category_applied_input_types).
IMAGE_CATEGORIES = frozenset(
    {"self-harm", "self-harm/intent", "self-harm/instructions", "sexual", "violence", "violence/graphic"}
)

# Llama Guard's category names (LG1, LG2, LG3/LG4, as their prompts list them, lowercase without the
# period) -> the OpenAI categories they feed. Names not here (Specialized Advice, Privacy, Intellectual
# Property, Defamation, Elections, Code Interpreter Abuse, custom ones) feed none.
FEEDS: Mapping[str, tuple[str, ...]] = {
    "violent crimes": ("violence", "illicit", "illicit/violent"),
    "non-violent crimes": ("illicit",),
    "sex crimes": ("sexual", "illicit", "illicit/violent"),
    "child exploitation": ("sexual", "sexual/minors"),
    "indiscriminate weapons": ("illicit", "illicit/violent"),
    "hate": ("hate", "harassment"),
    "self-harm": ("self-harm", "self-harm/intent", "self-harm/instructions"),
    "sexual content": ("sexual",),
    "violence and hate": ("violence", "hate", "harassment"),
    "criminal planning": ("illicit",),
    "guns and illegal weapons": ("illicit", "illicit/violent"),
    "regulated or controlled substances": ("illicit",),
}
DEFAULT_FAMILY = FAMILIES["llama-guard-3-8b"]
"""How codes are named for a conversation guard that does not say its family."""


def feeds(name: str) -> tuple[str, ...]:
    return FEEDS.get(name.strip().rstrip(".").strip().lower(), ())


class _Capture:
    """Stands in for a Llama Guard in one check: asks for the code distribution when the guard can
    give it (else for the greedy codes of every verdict), and keeps what came back."""

    def __init__(self, guard: ConversationGuard) -> None:
        self.guard = guard
        self.name = guard.name
        self.scored: CategoryScores | ConversationScore | None = None

    async def score_conversation(
        self, turns: list[Turn], taxonomy: Taxonomy, *, categories_from: float = 0.5
    ) -> ConversationScore:
        if isinstance(self.guard, CategoryGuard):
            scores = await self.guard.score_categories(turns, taxonomy, categories_from=categories_from)
            self.scored = scores
            return scores.verdict
        scored = await self.guard.score_conversation(turns, taxonomy, categories_from=0.0)
        self.scored = scored
        if max(scored.score, scored.score_binary) < categories_from:  # the record names codes of hits only
            return ConversationScore(scored.score, scored.score_binary, scored.mass)
        return scored


@dataclass
class Outcome:
    """One check of one input: its settings, its result, and what a Llama Guard returned."""

    check: CheckSettings
    verdict: Verdict
    capture: _Capture | None
    family: Family

    @property
    def result(self) -> CheckResult:
        return self.verdict.results[0]


async def screen_input(route: RouteSettings, guards: Mapping[str, Guard], view: ChatRequest) -> list[Outcome]:
    """Every input check of `route` on one input, concurrently: each runs as a route of its own, so
    none is dropped when another has decided (a moderation reports every score)."""
    return list(await asyncio.gather(*(_run(route, check, guards[check.guard], view) for check in route.input)))


async def _run(route: RouteSettings, check: CheckSettings, guard: Guard, view: ChatRequest) -> Outcome:
    capture = _Capture(guard) if isinstance(guard, ConversationGuard) and not isinstance(guard, TextGuard) else None
    alone = route.model_copy(update={"input": (check,)})
    verdict = await screen(alone, {check.guard: capture or guard}, view)
    family = getattr(guard, "family", None)
    return Outcome(check, verdict, capture, family if isinstance(family, Family) else DEFAULT_FAMILY)


def verdict_of(outcomes: list[Outcome]) -> Verdict:
    return combine(*(o.verdict for o in outcomes))


def _score(outcome: Outcome, scored: ConversationScore) -> float:
    return scored.score if outcome.check.score == "full" else scored.score_binary


def code_scores(outcome: Outcome, taxonomy: Taxonomy) -> dict[str, tuple[str, float]]:
    """Code -> (its name, P(unsafe) x P(first code = it | unsafe)); a guard without the distribution
    gives each code it names the whole P(unsafe)."""
    scored = outcome.capture.scored if outcome.capture and not outcome.result.error else None
    if isinstance(scored, CategoryScores):
        unsafe = _score(outcome, scored.verdict)
        return {c.category.code: (c.category.name, unsafe * c.probability) for c in scored.codes}
    if isinstance(scored, ConversationScore):
        names = {c.code: c.name for c in categories_for(outcome.family, taxonomy)}
        return {code: (names.get(code, code), _score(outcome, scored)) for code in scored.categories}
    return {}


GUARD_FAILED = "the guard failed on this input; the proxy's log line for this request says why"


def _guard_numbers(outcome: Outcome, per_code: dict[str, tuple[str, float]]) -> dict[str, Any]:
    """A check's own numbers, under its guard's name in the result (an extra field of the SDK's type)."""
    result = outcome.result
    own: dict[str, Any] = {"threshold": outcome.check.threshold, "flagged": result.hit and result.enforced}
    if result.error:
        # The error's own text can name a remote guard's internal address: it stays in the log line.
        own["error"] = GUARD_FAILED
    elif result.skipped:
        own["skipped"] = True
    scored = outcome.capture.scored if outcome.capture and not result.error else None
    if scored is None:
        if result.score is not None:
            own["score"] = result.score
        return own
    own["score"] = _score(outcome, scored.verdict if isinstance(scored, CategoryScores) else scored)
    own["codes"] = list(result.categories)
    own["category_scores"] = {code: value for code, (_, value) in per_code.items()}
    return own


def moderation_result(outcomes: list[Outcome], taxonomy: Taxonomy, *, text: bool, images: bool) -> dict[str, Any]:
    """One entry of `results`: flagged when an enforced check hits at its threshold; a category is
    true when an enforced Llama Guard hit names a code that feeds it; its score is the largest over
    the route's Llama Guard checks."""
    scores = dict.fromkeys(OPENAI_CATEGORIES, 0.0)
    named: set[str] = set()
    extra: dict[str, Any] = {}
    for outcome in outcomes:
        per_code = code_scores(outcome, taxonomy)
        extra[outcome.check.guard] = _guard_numbers(outcome, per_code)
        sums = dict.fromkeys(OPENAI_CATEGORIES, 0.0)
        for name, value in per_code.values():
            for category in feeds(name):
                sums[category] += value
        for category, value in sums.items():
            scores[category] = max(scores[category], min(value, 1.0))
        if outcome.result.hit and outcome.result.enforced:
            named.update(c for code in outcome.result.categories for c in feeds(per_code.get(code, (code, 0.0))[0]))
    kinds = (["text"] if text else [], ["image"] if images else [])
    return {
        "flagged": any(o.result.hit and o.result.enforced for o in outcomes),
        "categories": {c: c in named for c in OPENAI_CATEGORIES},
        "category_scores": scores,
        "category_applied_input_types": {c: kinds[0] + (kinds[1] if c in IMAGE_CATEGORIES else []) for c in scores},
        **{k: v for k, v in extra.items() if k not in STANDARD_FIELDS},
    }


STANDARD_FIELDS = frozenset({"flagged", "categories", "category_scores", "category_applied_input_types"})
"""A guard named like one of these is not reported under its name (the standard field wins)."""
