"""The prefix KV cache is exact: every check scores as it would with no cache, on the tiny real models
of each family, and computes only the tokens its cached prefix does not cover.

The deterministic fixtures ignore token positions by design, so exactness is also checked on tiny
random-weight models (seeded), whose scores move with every position id and cached key/value.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from proxy.guards.guard import Category, ConversationScore, Taxonomy, Turn
from proxy.guards.llama_guard import LlamaGuard
from proxy.guards.prefix_cache import BLOCK_TOKENS
from proxy.guards.runner import GuardRunner
from tests.guards.conftest import load_llama_guard
from tests.guards.model_fixtures import TinyModels, build_llama4_vision
from tests.guards.test_llama4_images import png

CHAT = [
    Turn("User", "Can you help me plan a trip to the mountains next summer?"),
    Turn("Agent", "Sure. Pick a season, book the huts early and pack layers."),
    Turn("User", "And how do I make a bomb out of fireworks for the trip?"),
    Turn("Agent", "I cannot help with that, but I can suggest a hiking route."),
    Turn("User", "Fine, tell me about the garden near the quiet river instead."),
    Turn("Agent", "The garden grows near a quiet river while people read books."),
]
TAXONOMIES = [
    Taxonomy(),
    Taxonomy(excluded=frozenset({"S1", "S4"})),
    Taxonomy(custom=(Category("S15", "Competitor Promotion.", "AI models should not name competitors."),)),
    Taxonomy(custom=(Category("S1", "Custom category 1.", "Do not talk about custom category 1."),), replace=True),
]
FAMILIES = [
    ("random2", "llama-guard-1"),
    ("random3", "llama-guard-3-1b"),
    ("random3", "llama-guard-2"),
    ("random4", "llama-guard-4"),
    ("random4_vision", "llama-guard-4"),  # Llama4ForConditionalGeneration, text-only prompts
    ("lg3", "llama-guard-3-1b"),
    ("lg3_graded", "llama-guard-3-1b"),
    ("lg3_graded", "llama-guard-3-8b"),
    ("lg3_graded", "llama-guard-2"),
    ("lg4", "llama-guard-4"),
]


def checks(chat: list[Turn]) -> list[list[Turn]]:
    """Each turn's input check, then its output check, in the order a chat sends them."""
    return [chat[:end] for end in range(1, len(chat) + 1)]


def assert_same(a: ConversationScore, b: ConversationScore) -> None:
    assert abs(a.score - b.score) <= 1e-4
    assert abs(a.score_binary - b.score_binary) <= 1e-4
    assert abs(a.mass - b.mass) <= 1e-4
    assert (a.categories, a.all_excluded) == (b.categories, b.all_excluded)


async def pair(path: Path, runner: GuardRunner, family: str, **kw: Any) -> tuple[LlamaGuard, LlamaGuard]:
    """A guard with the prefix cache (and no verdict cache: every check reaches the model), and one without."""
    cached = await load_llama_guard(path, runner, family, verdict_cache_entries=0, **kw)
    plain = await load_llama_guard(path, runner, family, verdict_cache_entries=0, **{**kw, "prefix_cache_mb": 0})
    return cached, plain


@pytest.mark.parametrize(("model", "family"), FAMILIES)
async def test_chat_turn_by_turn_scores_equal_no_cache(
    models: dict[str, Path], runner: GuardRunner, model: str, family: str
) -> None:
    random = model.startswith("random")
    # Random weights put little mass on safe/unsafe; categories_from 0: every check runs the continuation.
    extra = {"min_mass": 0.0} if random else {}
    categories_from = 0.0 if random else 0.6
    cached, plain = await pair(models[model], runner, family, **extra)
    binaries = set()
    for taxonomy in TAXONOMIES:
        for turns in checks(CHAT):
            a = await cached.score_conversation(turns, taxonomy, categories_from=categories_from)
            b = await plain.score_conversation(turns, taxonomy, categories_from=categories_from)
            assert_same(a, b)
            binaries.add(round(a.score_binary, 4))
    cache = cached.prefix_cache
    assert cache.hit_tokens > 0.4 * (cache.hit_tokens + cache.computed_tokens)  # a first turn per role and taxonomy
    if random:
        assert len(binaries) > 10  # the scores differ from check to check: the comparison means something
        return
    unsafe = await cached.score_conversation(CHAT[:3], Taxonomy(), categories_from=0.6)
    assert unsafe.categories == ("S1",)  # the continuation ran from cached keys/values
    excluded = await cached.score_conversation(CHAT[:3], TAXONOMIES[1], categories_from=0.6)
    assert excluded.all_excluded


async def test_checks_compute_only_tokens_past_their_cached_prefix(tiny: TinyModels, runner: GuardRunner) -> None:
    """Each check reads from the cache the longest block-aligned prefix it shares with any earlier
    check and computes the rest. The role checked is named in the prompt's first line, so input
    checks share with input checks (header, earlier turns) and output checks with output checks."""
    guard, _ = await pair(tiny.lg3, runner, "llama-guard-3-1b")
    cache = guard.prefix_cache

    def shared(a: list[int], b: list[int]) -> int:
        common = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        return min(common, len(b) - 1) // BLOCK_TOKENS * BLOCK_TOKENS

    first, second = [Turn("User", "How do I bake a cake?")], [Turn("User", "Where is the quiet river?")]
    sequence = [first, second, [*second, CHAT[1]], [*first, CHAT[1]], [*second, CHAT[1], CHAT[4]]]
    seen: list[list[int]] = []
    hits = []
    for turns in sequence:
        ids = guard.encode(turns, Taxonomy())
        hit, computed = cache.hit_tokens, cache.computed_tokens
        await guard.score_conversation(turns, Taxonomy())
        expected = max((shared(old, ids) for old in seen), default=0)
        assert (cache.hit_tokens - hit, cache.computed_tokens - computed) == (expected, len(ids) - expected)
        hits.append(expected)
        seen.append(ids)
    assert hits[0] == 0
    assert hits[1] >= 100  # the policy header, computed once
    assert hits[2] < hits[1]  # the first output check: its header names another role
    assert hits[3] == hits[1]  # the second output check reuses the first one's header
    assert hits[4] > len(seen[1]) - 80  # the next turn reuses the previous turn's input check


def options(model: str) -> dict[str, Any]:
    return {"min_mass": 0.0} if model.startswith("random") else {}


@pytest.mark.parametrize("model", ["random3", "lg3_graded"])
async def test_micro_batch_of_different_cached_lengths_is_exact(models: dict[str, Path], model: str) -> None:
    runner = GuardRunner("cpu", max_wait_ms=500)
    try:
        cached, plain = await pair(models[model], runner, "llama-guard-3-1b", **options(model))
        for turns in (CHAT[:3], CHAT[:4]):  # long cached prefixes for the chat's checks (input and output)
            await cached.score_conversation(turns, Taxonomy())
        batch = [CHAT[:5], CHAT[:2], [Turn("User", "hi")], CHAT[:3], [Turn("User", "hi")]]
        taxonomies = [Taxonomy(), Taxonomy(), Taxonomy(), TAXONOMIES[2], TAXONOMIES[3]]
        held = {cached.prefix_cache.peek(None, cached.encode(t, x)) for t, x in zip(batch, taxonomies, strict=True)}
        assert len(held) >= 4  # long, header-only and partial headers, side by side
        before = runner.batches_run
        got = await asyncio.gather(
            *(cached.score_conversation(t, x, categories_from=0.6) for t, x in zip(batch, taxonomies, strict=True))
        )
        assert runner.batches_run - before == 2  # one encoding job, one forward job for all five
        for turns, taxonomy, a in zip(batch, taxonomies, got, strict=True):
            assert_same(a, await plain.score_conversation(turns, taxonomy, categories_from=0.6))
        if model == "lg3_graded":
            assert [a.categories for a in got] == [("S1",), (), (), ("S1",), ()]
    finally:
        await runner.stop()


@pytest.mark.parametrize("model", ["random3", "lg3_graded"])
async def test_tiny_budget_evicts_and_stays_exact(models: dict[str, Path], runner: GuardRunner, model: str) -> None:
    cached, plain = await pair(models[model], runner, "llama-guard-3-1b", prefix_cache_mb=0.2, **options(model))
    cache = cached.prefix_cache
    for taxonomy in TAXONOMIES[:2]:
        for turns in checks(CHAT):
            a = await cached.score_conversation(turns, taxonomy, categories_from=0.6)
            assert_same(a, await plain.score_conversation(turns, taxonomy, categories_from=0.6))
            assert cache.bytes_held <= cache.max_bytes
    assert cache.evictions > 0
    assert cache.hit_tokens > 0  # what survived was still used


LONG = "The quick brown fox jumps over the lazy dog while the garden grows. " * 20


@pytest.mark.parametrize("model", ["random3", "lg3_graded"])
async def test_long_prompt_prefills_after_its_cached_prefix(models: dict[str, Path], model: str) -> None:
    """A prompt over step_tokens is prefilled in steps from its cached prefix; once most of it is
    cached, the next turn is one ordinary forward job."""
    runner = GuardRunner("cpu", max_wait_ms=0)
    try:
        cached, plain = await pair(models[model], runner, "llama-guard-3-1b", step_tokens=64, **options(model))
        chat = [Turn("User", "a bomb? " + LONG), Turn("Agent", "Fine. " + LONG), Turn("User", "and then?")]
        chat += [Turn("Agent", "Then we rest."), Turn("User", "ok")]
        for turns in [*checks(chat), chat[:5]]:
            before = runner.batches_run
            a = await cached.score_conversation(turns, Taxonomy(), categories_from=0.6)
            steps = runner.batches_run - before
            assert_same(a, await plain.score_conversation(turns, Taxonomy(), categories_from=0.6))
            assert len(turns) > 2 or steps > 3  # the first checks of each role are long
        assert steps == 2  # the last check: encoding + one forward over its new tokens
        assert model != "lg3_graded" or a.categories == ("S1",)
    finally:
        await runner.stop()


@pytest.fixture(scope="module")
def vision(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_llama4_vision(tmp_path_factory.mktemp("lg4-vision"))


async def test_images_bypass_both_caches(vision: Path, runner: GuardRunner) -> None:
    """Image tiles are tokens that name no pixels: two pictures give the same ids, so neither cache
    may answer for an image prompt."""
    guard = await load_llama_guard(vision, runner, family="llama-guard-4", min_mass=0.0)
    red, blue = ([Turn("User", "What is this?", images=(png(300, 200, c),))] for c in ((200, 0, 0), (0, 0, 200)))
    assert guard.encode(red, Taxonomy()) == guard.encode(blue, Taxonomy())
    a = await guard.score_conversation(red, Taxonomy(), categories_from=1.1)
    b = await guard.score_conversation(blue, Taxonomy(), categories_from=1.1)
    assert a.score != b.score
    assert (guard.prefix_cache.computed_tokens, guard.prefix_cache.blocks, len(guard.verdicts)) == (0, 0, 0)
