"""Llama Guard's prefix-cache-aware forward passes, in the guard runner's worker thread: a batch of
prompts scored after their cached prefixes, a long prompt fed `step_tokens` per runner job into its own
KV cache, and the category continuation (and code distribution) read from the scored prompt's own
keys/values. It extends llama_guard_model.py's Model; llama_guard.py submits its jobs.

The prefix cache supplies the key/values of a prompt's longest cached prefix: only the rest is
computed, and the step decision counts only those tokens. A batch mixes prompts with different cached
lengths in one forward pass: each row's cached keys/values are right-aligned in a zero-padded past of
the longest cached length, its new tokens left-padded after it, the attention mask covers exactly its
cached and new tokens, and its position ids continue from its cached length (masked slots get zero
weight, so the holes change nothing). Prompts with images bypass the cache: their ids name tiles, not
pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from proxy.guards.guard import (
    CategoryScores,
    CodeScore,
    ConversationScore,
    GuardError,
    PrefetchOutcome,
    tokens_at_least,
)
from proxy.guards.llama_guard_codes import CodeTokens, first_code_probabilities
from proxy.guards.llama_guard_model import Item, Model, Prompt
from proxy.guards.llama_guard_prompt import categories_for, read_categories, read_verdict
from proxy.guards.prefix_cache import batch_past, gather, one_sequence


@dataclass(eq=False)
class Prefill:
    """A long prompt between runner steps: how far it is prefilled, and its KV cache."""

    prompt: Prompt
    done: int = 0
    cache: Any = field(default=None, repr=False)
    hit: int = 0
    prefetch: bool = False
    """A prefetch (no score): its computed tokens count as prefetched."""


class CachedModel(Model):
    """The Model that scores through the prefix cache and prefills long prompts in steps."""

    _codes: CodeTokens | None = None

    def score(self, prompts: list[Prompt]) -> list[ConversationScore | Exception]:
        """Score a batch: prompts with images (or every prompt, with no prefix cache) in one pass
        each `forward_batch`, the others through the prefix cache."""
        results: list[ConversationScore | Exception | None] = [None] * len(prompts)
        plain = [i for i, p in enumerate(prompts) if p.pixels or not self.prefix.enabled]
        cached = [i for i, p in enumerate(prompts) if not (p.pixels or not self.prefix.enabled)]
        for rows, fn in ((plain, self._score_plain), (cached, self._score_cached)):
            if rows:
                for row, result in zip(rows, fn([prompts[r] for r in rows]), strict=True):
                    results[row] = result
        done = [r for r in results if r is not None]
        for prompt, result in zip(prompts, done, strict=True):
            self._remember(prompt, result)
        return done

    def _score_cached(self, prompts: list[Prompt]) -> list[ConversationScore | Exception]:
        results: list[ConversationScore | Exception] = []
        step = self.settings.forward_batch
        for start in range(0, len(prompts), step):
            results += self._forward_cached(prompts[start : start + step])
        self.prefix.trim()  # after the whole batch, so no row's prefix goes while another row uses it
        return results

    def _forward_cached(self, prompts: list[Prompt]) -> list[ConversationScore | Exception]:
        """One forward pass over each prompt's uncached tokens, after its cached prefix (layout
        in the module docstring); the new full blocks join the cache."""
        torch = self.torch
        paths = [self.prefix.lookup(p.item.tenant, p.ids) for p in prompts]
        hits = [len(path) * self.prefix.block_tokens for path in paths]
        news = [len(p.ids) - hit for p, hit in zip(prompts, hits, strict=True)]
        past_len, new_len = max(hits), max(news)
        ids = torch.full((len(prompts), new_len), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), past_len + new_len), dtype=torch.long)
        positions = torch.zeros((len(prompts), new_len), dtype=torch.long)
        for row, (prompt, hit, new) in enumerate(zip(prompts, hits, news, strict=True)):
            ids[row, new_len - new :] = torch.tensor(prompt.ids[hit:])
            mask[row, past_len - hit : past_len] = 1
            mask[row, past_len + new_len - new :] = 1
            positions[row, new_len - new :] = torch.arange(hit, len(prompt.ids))
        with torch.inference_mode():
            out = self.model(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=positions.to(self.device),
                past_key_values=batch_past(paths, past_len),
                use_cache=True,
                logits_to_keep=1,
            )
            probs = torch.softmax(out.logits[:, -1, :].float(), dim=-1)
            p_safe, p_unsafe = probs[:, self.safe_ids].sum(-1).tolist(), probs[:, self.unsafe_ids].sum(-1).tolist()
        layers = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        results: list[ConversationScore | Exception] = []
        for row, (prompt, hit, new) in enumerate(zip(prompts, hits, news, strict=True)):
            fresh = [(k[row, :, -new:], v[row, :, -new:]) for k, v in layers]
            self.prefix.insert(prompt.item.tenant, prompt.ids, hit, fresh)
            self.prefix.count(hit, new)
            try:
                unsafe, binary, mass = read_verdict(self.family, p_safe[row], p_unsafe[row], self.settings.min_mass)
            except GuardError as exc:
                results.append(exc)
                continue
            if max(unsafe, binary) < prompt.item.categories_from:
                results.append(ConversationScore(unsafe, binary, mass))
                continue
            cut = slice(past_len - hit, past_len)
            own = [
                (torch.cat([k[row, :, cut], fk], 1), torch.cat([v[row, :, cut], fv], 1))
                for (k, v), (fk, fv) in zip(layers, fresh, strict=True)
            ]
            state = Prefill(prompt, len(prompt.ids), one_sequence(own))
            kept, all_excluded = read_categories(self._continue_cached(state), prompt.item.taxonomy)
            results.append(ConversationScore(unsafe, binary, mass, categories=kept, all_excluded=all_excluded))
        return results

    def _feed(self, state: Prefill) -> Any | None:
        """Feed the next `step_tokens` of a prompt into its cache (starting after its cached prefix;
        a prompt with images in one pass); the last forward's output once the whole prompt is in."""
        torch = self.torch
        ids = state.prompt.ids
        tenant = state.prompt.item.tenant
        images = self._pixel_values([state.prompt.pixels]) if state.prompt.pixels else None
        if state.cache is None and self.prefix.enabled and images is None:
            path = self.prefix.lookup(tenant, ids)
            if path:
                state.cache, state.done = one_sequence(gather(path)), len(path) * self.prefix.block_tokens
                state.hit = state.done
        end = len(ids) if images is not None else min(state.done + self.settings.step_tokens, len(ids))
        extra = {"pixel_values": images} if images is not None else {}
        with torch.inference_mode():
            out = self.model(
                input_ids=torch.tensor([ids[state.done : end]], device=self.device),
                position_ids=torch.arange(state.done, end, device=self.device).unsqueeze(0),
                past_key_values=state.cache,
                use_cache=True,
                logits_to_keep=1,
                **extra,
            )
        begun, state.cache, state.done = state.done, out.past_key_values, end
        if state.prefetch:
            # Each step's blocks at once: a check that arrives meanwhile starts from them.
            self.prefix.insert(tenant, ids[:end], 0, [(layer.keys[0], layer.values[0]) for layer in state.cache.layers])
            self.prefix.count_prefetched(end - begun)
            self.prefix.trim()
        if end < len(ids):
            return None
        if self.prefix.enabled and images is None and not state.prefetch:
            # From position 0: blocks of its prefix evicted between steps are put back.
            self.prefix.insert(tenant, ids, 0, [(layer.keys[0], layer.values[0]) for layer in state.cache.layers])
            self.prefix.count(state.hit, len(ids) - state.hit)
            self.prefix.trim()
        return out

    def plan_prefetch(self, items: list[Item]) -> Prompt | PrefetchOutcome:
        """The longest common token prefix of the items' prompts, if the cache would gain a block
        from it: else "cached", or "too_long" past `max_tokens` (its check will fail anyway)."""
        limit = self.settings.token_limit
        if tokens_at_least(self._count, "\n".join(turn.text for turn in items[0].turns), limit) is not None:
            return "too_long"
        shared = self.encode(list(items[0].turns), items[0].taxonomy)
        if len(shared) > limit:
            return "too_long"
        for item in items[1:]:
            ids = self.encode(list(item.turns), item.taxonomy)
            n = min(len(shared), len(ids))
            shared = shared[: next((i for i in range(n) if shared[i] != ids[i]), n)]
        size = self.prefix.block_tokens
        if len(shared) // size * size <= self.prefix.peek(items[0].tenant, shared, scored=False):
            return "cached"
        return Prompt(items[0], shared, [])

    def prefetch_step(self, state: Prefill) -> bool:
        """The next step of a prefetch (`_feed` without a score); True once it is all cached."""
        return self._feed(state) is not None

    def prefill(self, state: Prefill) -> ConversationScore | None:
        """Feed the next `step_tokens` of a long prompt into its cache (starting after its cached
        prefix); after the last chunk, its score (and categories, read greedily from the same cache)."""
        torch = self.torch
        out = self._feed(state)
        if out is None:
            return None
        probs = torch.softmax(out.logits[0, -1, :].float(), dim=-1)
        p_safe, p_unsafe = float(probs[self.safe_ids].sum()), float(probs[self.unsafe_ids].sum())
        item = state.prompt.item
        unsafe, binary, mass = read_verdict(self.family, p_safe, p_unsafe, self.settings.min_mass)
        if max(unsafe, binary) < item.categories_from:
            result = ConversationScore(unsafe, binary, mass)
        else:
            kept, all_excluded = read_categories(self._continue_cached(state), item.taxonomy)
            result = ConversationScore(unsafe, binary, mass, categories=kept, all_excluded=all_excluded)
        self._remember(state.prompt, result)
        return result

    def distribute(self, state: Prefill) -> CategoryScores | None:
        """As `prefill`, and after the last chunk also the first code's distribution over the codes
        the prompt lists (llama_guard_codes.py); categories are read greedily as for a check."""
        out = self._feed(state)
        if out is None:
            return None
        probs = self.torch.softmax(out.logits[0, -1, :].float(), dim=-1)
        p_safe, p_unsafe = float(probs[self.safe_ids].sum()), float(probs[self.unsafe_ids].sum())
        item = state.prompt.item
        unsafe, binary, mass = read_verdict(self.family, p_safe, p_unsafe, self.settings.min_mass)
        if self._codes is None:
            self._codes = CodeTokens(self.tokenizer, self.device)
        listed = categories_for(self.family, item.taxonomy, any(turn.images for turn in item.turns))
        rows = [[self.unsafe_ids[0], *self._codes.ids(category.code)] for category in listed]
        layers = [(layer.keys, layer.values) for layer in state.cache.layers]
        chances = first_code_probabilities(self.model, layers, len(state.prompt.ids), rows, self._codes.continues)
        verdict = ConversationScore(unsafe, binary, mass)
        if max(unsafe, binary) >= item.categories_from:
            kept, all_excluded = read_categories(self._continue_cached(state), item.taxonomy)
            verdict = ConversationScore(unsafe, binary, mass, categories=kept, all_excluded=all_excluded)
        codes = tuple(CodeScore(c, p) for c, p in zip(listed, chances, strict=True))
        return CategoryScores(verdict, codes)

    def _continue_cached(self, state: Prefill) -> str:
        """The greedy continuation after a forced `unsafe`, from a prefilled cache (as `_continue`)."""
        torch = self.torch
        token, position, generated = self.unsafe_ids[0], len(state.prompt.ids), []
        with torch.inference_mode():
            for _ in range(self.settings.max_new_tokens):
                out = self.model(
                    input_ids=torch.tensor([[token]], device=self.device),
                    position_ids=torch.tensor([[position]], device=self.device),
                    past_key_values=state.cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
                state.cache, position = out.past_key_values, position + 1
                token = int(out.logits[0, -1, :].argmax())
                if token in self.stop_ids:
                    break
                generated.append(token)
        text: str = self.tokenizer.decode(generated, skip_special_tokens=True)
        return text
