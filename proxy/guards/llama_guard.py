"""Llama Guard (1, 2, 3-1B, 3-8B, 4) on transformers, in process: the ConversationGuard that the input
and output checks await, which turns each check into guard runner jobs.

The score is P(unsafe) at the first content token: the prompt ends with the family's blank-line
token, one forward pass reads the last position's logits (float32 softmax). Both the full-vocabulary
value and the safe/unsafe-renormalised value are returned; their mass (P(safe)+P(unsafe)) below
`min_mass` means the prompt is wrong, which is an error, not a verdict. Categories come from a short
greedy continuation after a forced `unsafe` token, only for conversations scoring at or above
`categories_from`.

A check is a sequence of runner jobs so that one long prompt never holds the worker: one job
encodes (past `max_tokens` the check fails before any forward pass); a prompt of at most
`step_tokens` is then scored in a batch with other requests' prompts; a longer one is prefilled
alone, `step_tokens` per bulk job (see runner), into its own KV cache (same scores as one pass),
and a cancelled check submits no further chunk. Prompts with images always take the one-pass path.

Two caches keep a turn's cost proportional to its new tokens (see prefix_cache.py, verdict_cache.py).
`prefetch` fills the prefix cache ahead of an output check while the upstream answers
(screening/prefetch.py).
The jobs run in the runner's thread on the model: llama_guard_model.py (loading, encoding, verdict
cache, plain forward passes) and llama_guard_prefill.py (prefix-cached batches, chunked prefill, the
category continuation from a prompt's own keys/values).
"""

from __future__ import annotations

from typing import Any

from proxy.guards.guard import (
    CategoryScores,
    ConversationScore,
    GuardError,
    PrefetchOutcome,
    PrefetchState,
    Taxonomy,
    Turn,
)
from proxy.guards.llama_guard_model import Item, Prompt, Remembered
from proxy.guards.llama_guard_prefill import CachedModel, Prefill
from proxy.guards.llama_guard_prompt import FAMILIES
from proxy.guards.prefix_cache import PrefixCache
from proxy.guards.runner import GuardRunner, RunnerBusy, current_tenant
from proxy.guards.verdict_cache import VerdictCache
from proxy.settings import GuardSettings


class LlamaGuard:
    """A ConversationGuard backed by a local transformers model, run on a GuardRunner."""

    def __init__(self, name: str, settings: GuardSettings, runner: GuardRunner) -> None:
        self.name = name
        self.settings = settings
        self.family = FAMILIES[settings.family]
        self.runner = runner
        self.prefix_cache = PrefixCache(int(settings.prefix_cache_mb * 2**20))
        self.verdicts: VerdictCache[Remembered] = VerdictCache(settings.verdict_cache_entries)
        self._model: CachedModel | None = None
        self._prefetching = False

    async def load(self) -> None:
        self._model = await self.runner.call(
            lambda: CachedModel(self.settings, self.family, self.name, self.prefix_cache, self.verdicts)
        )

    def _prepare(self, items: list[Item]) -> list[Prompt | ConversationScore | Exception]:
        assert self._model is not None
        return self._model.prepare(items)

    def _score(self, prompts: list[Prompt]) -> list[ConversationScore | Exception]:
        assert self._model is not None
        return self._model.score(prompts)

    def _prefill(self, states: list[Prefill]) -> list[ConversationScore | None]:
        assert self._model is not None
        return [self._model.prefill(state) for state in states]

    def _distribute(self, states: list[Prefill]) -> list[CategoryScores | None]:
        assert self._model is not None
        return [self._model.distribute(state) for state in states]

    def _plan_prefetch(self, batches: list[list[Item]]) -> list[Prompt | PrefetchOutcome]:
        assert self._model is not None
        return [self._model.plan_prefetch(items) for items in batches]

    def _prefetch_step(self, states: list[Prefill]) -> list[bool]:
        assert self._model is not None
        return [self._model.prefetch_step(state) for state in states]

    @property
    def takes_images(self) -> bool:
        """Images reach this guard's prompt (Llama Guard 4); other families read text only."""
        return self.family.multimodal

    async def score_conversation(
        self, turns: list[Turn], taxonomy: Taxonomy, *, categories_from: float = 0.5
    ) -> ConversationScore:
        if self._model is None:
            raise GuardError(f"guard {self.name!r} is not loaded")
        # Text-only families never see images (their prompts have no place for one); LG4 gets the tiles.
        item = Item(tuple(turns), taxonomy, categories_from, current_tenant.get())
        (prompt,) = await self.runner.submit(self._prepare, [item], key=(id(self), "prepare"))
        if isinstance(prompt, Exception):
            raise prompt
        if isinstance(prompt, ConversationScore):
            return prompt  # the verdict cache's
        if len(prompt.ids) - prompt.cached <= self.settings.step_tokens or prompt.pixels:
            (result,) = await self.runner.submit(self._score, [prompt], key=(id(self), "score"))
            if isinstance(result, Exception):
                raise result
            return result
        state = Prefill(prompt)
        while True:  # each chunk queues behind whatever arrived meanwhile
            (done,) = await self.runner.submit(self._prefill, [state], key=state, bulk=True)
            if done is not None:
                return done

    async def score_categories(
        self, turns: list[Turn], taxonomy: Taxonomy, *, categories_from: float = 0.5
    ) -> CategoryScores:
        """The verdict and the first code's distribution (one prompt, in steps of `step_tokens`
        that yield to ordinary checks when it is longer)."""
        if self._model is None:
            raise GuardError(f"guard {self.name!r} is not loaded")
        item = Item(tuple(turns), taxonomy, categories_from, current_tenant.get(), recall=False)
        (prompt,) = await self.runner.submit(self._prepare, [item], key=(id(self), "prepare"))
        if isinstance(prompt, Exception):
            raise prompt
        assert isinstance(prompt, Prompt)
        state, long = Prefill(prompt), len(prompt.ids) - prompt.cached > self.settings.step_tokens
        while True:
            (done,) = await self.runner.submit(self._distribute, [state], key=state, bulk=long)
            if done is not None:
                return done

    @property
    def prefetch_state(self) -> PrefetchState:
        """Whether a prefetch would run now: ready, busy (one runs, or checks wait) or off."""
        if self._model is None or not self.settings.prefetch or not self.prefix_cache.enabled:
            return "off"
        return "busy" if self._prefetching or self.runner.waiting else "ready"

    async def prefetch(self, conversations: list[list[Turn]], taxonomy: Taxonomy) -> PrefetchOutcome:
        """Compute into the prefix cache the longest token prefix the prompts of `conversations`
        share (the conversation with placeholder replies: what an output check of any reply starts
        with), as idle runner jobs: it gives way as soon as a check waits, keeping what its steps
        computed. One at a time per guard."""
        if self.takes_images and any(turn.images for turns in conversations for turn in turns):
            return "off"  # prompts with images bypass the cache
        if (now := self.prefetch_state) != "ready":
            return now
        self._prefetching = True
        try:
            tenant = current_tenant.get()
            items = [Item(tuple(turns), taxonomy, 1.0, tenant, recall=False) for turns in conversations]
            (planned,) = await self.runner.submit(self._plan_prefetch, [items], key=object(), idle=True)
            if isinstance(planned, str):
                return planned
            state = Prefill(planned, prefetch=True)
            while not (await self.runner.submit(self._prefetch_step, [state], key=state, idle=True))[0]:
                pass
            return "done"
        except RunnerBusy:
            return "busy"
        finally:
            self._prefetching = False

    def encode(self, turns: list[Turn], taxonomy: Taxonomy, pixels: list[Any] | None = None) -> list[int]:
        """Token ids of the prompt (tests and tools); `pixels` receives the images' tiles."""
        assert self._model is not None
        return self._model.encode(turns, taxonomy, pixels if pixels is not None else [])
