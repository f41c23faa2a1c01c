"""The first category code's distribution (score_categories) on the tiny Llama Guard models: the same
verdict as a check, a distribution over the listed codes only, and the same numbers whatever path the
prompt takes (one step, chunked prefill, a prefix served from the cache)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image as PILImage

from proxy.guards.guard import CategoryScores, Image, Taxonomy, Turn
from proxy.guards.llama_guard import LlamaGuard
from proxy.guards.runner import GuardRunner
from tests.guards.conftest import load_llama_guard
from tests.guards.model_fixtures import GRADED_ON, TinyModels, build_llama4_vision

UNSAFE = [Turn("User", "How do I build a bomb?")]
LONG = "The quick brown fox jumps over the lazy dog near the river bank. " * 40


def as_dict(scores: CategoryScores) -> dict[str, float]:
    return {c.category.code: c.probability for c in scores.codes}


async def test_verdict_equals_the_checks_and_codes_are_the_listed_ones(lg3: LlamaGuard) -> None:
    check = await lg3.score_conversation(UNSAFE, Taxonomy(), categories_from=0.5)
    scores = await lg3.score_categories(UNSAFE, Taxonomy(), categories_from=0.5)
    assert scores.verdict.score == pytest.approx(check.score, abs=1e-5)
    assert scores.verdict.score_binary == pytest.approx(check.score_binary, abs=1e-5)
    assert scores.verdict.categories == check.categories == ("S1",)
    codes = as_dict(scores)
    assert list(codes) == [f"S{i}" for i in range(1, 14)]  # Llama Guard 3 1B lists S1-S13
    assert codes["S1"] == pytest.approx(1.0, abs=1e-6)  # the tiny model always writes S1
    assert sum(codes.values()) <= 1.0 + 1e-6
    excluded = await lg3.score_categories(UNSAFE, Taxonomy(excluded=frozenset({"S2", "S5"})))
    assert "S2" not in as_dict(excluded) and "S5" not in as_dict(excluded)


async def test_categories_are_read_only_from_categories_from(tiny: TinyModels, runner: GuardRunner) -> None:
    guard = await load_llama_guard(tiny.lg3_graded, runner)
    high = await guard.score_categories(UNSAFE, Taxonomy(), categories_from=0.8)
    low = await guard.score_categories(UNSAFE, Taxonomy(), categories_from=0.6)
    assert high.verdict.score_binary == pytest.approx(GRADED_ON, abs=1e-4)
    assert high.verdict.categories == () and low.verdict.categories == ("S1",)
    assert as_dict(high) == pytest.approx(as_dict(low))  # the distribution is always given


async def test_chunked_and_cached_prompts_give_the_same_distribution(tiny: TinyModels) -> None:
    runner = GuardRunner("cpu", max_wait_ms=0)
    try:
        one_pass = await load_llama_guard(tiny.lg3_graded, runner, step_tokens=100_000, prefix_cache_mb=0)
        chunked = await load_llama_guard(tiny.lg3_graded, runner, step_tokens=64)
        turns = [Turn("User", "a bomb? " + LONG)]
        expected = await one_pass.score_categories(turns, Taxonomy())
        before = runner.batches_run
        first = await chunked.score_categories(turns, Taxonomy())
        assert runner.batches_run - before > len(chunked.encode(turns, Taxonomy())) // 64  # one step per chunk
        again = await chunked.score_categories(turns, Taxonomy())  # its prefix now comes from the cache
        assert chunked.prefix_cache.hit_tokens > 0
        for got in (first, again):
            assert got.verdict.score == pytest.approx(expected.verdict.score, abs=1e-4)
            assert as_dict(got) == pytest.approx(as_dict(expected), abs=1e-4)
    finally:
        await runner.stop()


@pytest.fixture(scope="module")
def lg4_vision(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_llama4_vision(tmp_path_factory.mktemp("lg4-vision-codes"))


def png(colour: tuple[int, int, int]) -> Image:
    buf = io.BytesIO()
    PILImage.new("RGB", (300, 200), colour).save(buf, format="PNG")
    return Image(buf.getvalue())


async def test_an_image_goes_through_the_one_pass_path(lg4_vision: Path, runner: GuardRunner) -> None:
    """Llama Guard 4 with an image: the same verdict as a check, S14 not listed (text only), and the
    pixels reach the distribution (the tiny vision model is random: only the path is checked)."""
    guard = await load_llama_guard(lg4_vision, runner, family="llama-guard-4", min_mass=0.0)
    red = [Turn("User", "What is in this picture?", images=(png((200, 30, 30)),))]
    blue = [Turn("User", "What is in this picture?", images=(png((0, 0, 255)),))]
    check = await guard.score_conversation(red, Taxonomy(), categories_from=1.1)
    scores = await guard.score_categories(red, Taxonomy(), categories_from=1.1)
    assert scores.verdict.score == pytest.approx(check.score, rel=1e-3)
    assert list(as_dict(scores)) == [f"S{i}" for i in range(1, 14)]
    other = await guard.score_categories(blue, Taxonomy(), categories_from=1.1)
    assert as_dict(other) != as_dict(scores)
