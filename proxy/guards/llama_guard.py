"""Llama Guard (1, 2, 3-1B, 3-8B, 4) on transformers, in process.

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
The verdict cache answers an exact prompt (same token ids and taxonomy) already scored, from the
encoding job; an entry read without categories does not serve a check that needs them. The prefix
cache supplies the key/values of a prompt's longest cached prefix: only the rest is computed, and
the step decision counts only those tokens. A batch mixes prompts with different cached lengths in
one forward pass: each row's cached keys/values are right-aligned in a zero-padded past of the
longest cached length, its new tokens left-padded after it, the attention mask covers exactly its
cached and new tokens, and its position ids continue from its cached length (masked slots get zero
weight, so the holes change nothing). The category continuation starts from the scored prompt's
own keys/values. Prompts with images bypass both caches: their ids name tiles, not pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from proxy.guards.guard import (
    CategoryScores,
    CodeScore,
    ConversationScore,
    GuardError,
    GuardLimitExceeded,
    Taxonomy,
    Turn,
    tokens_at_least,
)
from proxy.guards.hub import explain, load_kwargs, pick_dtype, quantize, quiet_transformers
from proxy.guards.llama_guard_codes import CodeTokens, first_code_probabilities
from proxy.guards.llama_guard_prompt import (
    FAMILIES,
    Family,
    build,
    categories_for,
    encode_hf,
    read_categories,
    read_verdict,
)
from proxy.guards.prefix_cache import PrefixCache, batch_past, gather, one_sequence
from proxy.guards.runner import GuardRunner, current_tenant
from proxy.guards.verdict_cache import VerdictCache, digest_ids
from proxy.settings import GuardSettings

Remembered = tuple[ConversationScore, bool]
"""A verdict cache entry: the score, and whether its categories were read."""


@dataclass(frozen=True)
class _Item:
    turns: tuple[Turn, ...]
    taxonomy: Taxonomy
    categories_from: float
    tenant: str | None = None
    recall: bool = True
    """Whether the verdict cache may answer (not for a category distribution, which it does not keep)."""


@dataclass(frozen=True)
class _Prompt:
    """An encoded check: token ids and the image tiles they refer to."""

    item: _Item
    ids: list[int]
    pixels: list[Any]
    cached: int = 0
    """Tokens the prefix cache held when the prompt was encoded (it may evict them before the forward)."""


@dataclass(eq=False)
class _Prefill:
    """A long prompt between runner steps: how far it is prefilled, and its KV cache."""

    prompt: _Prompt
    done: int = 0
    cache: Any = field(default=None, repr=False)
    hit: int = 0


class _Model:
    """Tokenizer, model and the family's token ids; used only in the runner's thread."""

    def __init__(
        self,
        settings: GuardSettings,
        family: Family,
        name: str,
        prefix: PrefixCache,
        verdicts: VerdictCache[Remembered],
    ) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        quiet_transformers()
        kwargs = load_kwargs(settings.revision)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(settings.model, **kwargs)
            config = AutoConfig.from_pretrained(settings.model, **kwargs)
            dtype = pick_dtype(settings.device, settings.dtype)
            if "Llama4ForConditionalGeneration" in (getattr(config, "architectures", None) or []):
                from transformers import AutoModelForImageTextToText

                model = AutoModelForImageTextToText.from_pretrained(settings.model, dtype=dtype, **kwargs)
            else:
                model = AutoModelForCausalLM.from_pretrained(settings.model, dtype=dtype, **kwargs)
        except Exception as exc:
            raise explain(name, settings.model, exc) from exc
        self.model = quantize(model.to(settings.device).eval(), settings.quantize)
        self.device = settings.device
        self.name = name
        self.family = family
        self.settings = settings
        self.torch = torch
        self.prefix = prefix
        self.verdicts = verdicts
        self._codes: CodeTokens | None = None
        vocab = self.tokenizer.get_vocab()
        self.safe_ids = self._verdict_ids(vocab, "safe")
        self.unsafe_ids = self._verdict_ids(vocab, "unsafe")
        if not self.safe_ids or not self.unsafe_ids:
            raise GuardError(f"guard {name!r}: the tokenizer has no single token for 'safe'/'unsafe'")
        self.stop_ids = [vocab[t] for t in family.stop_tokens if t in vocab]
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.stop_ids[0]
        missing = [t for t in (family.bos, family.header_start, family.header_end, family.eot) if t and t not in vocab]
        if missing:
            raise GuardError(f"guard {name!r}: tokenizer lacks {missing}; is family {family.name} right?")

    def _verdict_ids(self, vocab: dict[str, int], word: str) -> list[int]:
        ids = []
        for spelling in self.family.verdict_spellings:
            piece = spelling.format(w=word)
            if piece in vocab:
                ids.append(vocab[piece])
        if not ids:
            encoded = self.tokenizer.encode(word, add_special_tokens=False)
            if len(encoded) == 1:
                ids.append(encoded[0])
        return sorted(set(ids))

    def encode(self, turns: list[Turn], taxonomy: Taxonomy, pixels: list[Any] | None = None) -> list[int]:
        return encode_hf(build(self.family, turns, taxonomy), self.tokenizer, pixels)

    def _pixel_values(self, per_sequence: list[list[Any]]) -> Any:
        """The tiles of every image in the batch, in the order their tokens appear (row by row)."""
        tiles = [tile for images in per_sequence for image in images for tile in image]
        if not tiles:
            return None
        import numpy as np

        return self.torch.from_numpy(np.stack(tiles)).to(self.device, dtype=self.model.dtype)

    def _batch(self, sequences: list[list[int]]) -> tuple[Any, Any, Any]:
        torch = self.torch
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):  # left padding: the last position is the prompt's end
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return ids.to(self.device), mask.to(self.device), positions.to(self.device)

    def _first_token(self, sequences: list[list[int]], pixels: list[list[Any]]) -> tuple[list[float], list[float]]:
        """P(safe), P(unsafe) of the next token after each prompt (one forward pass, float32 softmax)."""
        torch = self.torch
        images = self._pixel_values(pixels)
        extra = {"pixel_values": images} if images is not None else {}
        with torch.inference_mode():
            ids, mask, positions = self._batch(sequences)
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1, **extra)
            probs = torch.softmax(out.logits[:, -1, :].float(), dim=-1)
            return probs[:, self.safe_ids].sum(-1).tolist(), probs[:, self.unsafe_ids].sum(-1).tolist()

    def prepare(self, items: list[_Item]) -> list[_Prompt | ConversationScore | Exception]:
        """Each item's prompt, or its own error (text the tokenizer cannot encode, over max_tokens)."""
        return [self._prepare_one(item) for item in items]

    def _prepare_one(self, item: _Item) -> _Prompt | ConversationScore | Exception:
        limit = self.settings.token_limit
        pixels: list[Any] = []
        try:
            head = tokens_at_least(self._count, "\n".join(turn.text for turn in item.turns), limit)
            if head is not None:
                return GuardLimitExceeded("the conversation", head, limit, self.name, at_least=True)
            ids = self.encode(list(item.turns), item.taxonomy, pixels)
        except GuardError as exc:
            return exc
        except Exception as exc:  # the tokenizer's own error types; the text itself is never quoted
            return GuardError(f"guard {self.name!r}: the conversation cannot be encoded ({type(exc).__name__})")
        if len(ids) > limit:
            return GuardLimitExceeded("the conversation", len(ids), limit, self.name)
        if pixels:
            return _Prompt(item, ids, pixels)
        found = self._recall(item, ids) if item.recall else None
        if found is not None:
            return found
        cached = self.prefix.peek(item.tenant, ids) if self.prefix.enabled else 0
        return _Prompt(item, ids, pixels, cached)

    @staticmethod
    def _verdict_key(item: _Item, ids: list[int]) -> tuple[Any, ...]:
        return (item.tenant, digest_ids(ids), item.taxonomy)

    def _recall(self, item: _Item, ids: list[int]) -> ConversationScore | None:
        """A score already computed for this exact prompt, if it serves this check's categories_from."""

        def serves(entry: Remembered) -> bool:
            return entry[1] or max(entry[0].score, entry[0].score_binary) < item.categories_from

        found = self.verdicts.get(self._verdict_key(item, ids), serves)
        if found is None:
            return None
        score = found[0]
        if max(score.score, score.score_binary) < item.categories_from:
            return ConversationScore(score.score, score.score_binary, score.mass)
        return score

    def _remember(self, prompt: _Prompt, score: ConversationScore | Exception) -> None:
        if prompt.pixels or not isinstance(score, ConversationScore) or not self.verdicts.enabled:
            return
        key = self._verdict_key(prompt.item, prompt.ids)
        read = max(score.score, score.score_binary) >= prompt.item.categories_from
        known = self.verdicts.peek(key)
        if read or known is None or not known[1]:  # never replace an entry that has categories
            self.verdicts.put(key, (score, read))

    def _count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def score(self, prompts: list[_Prompt]) -> list[ConversationScore | Exception]:
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

    def _score_plain(self, prompts: list[_Prompt]) -> list[ConversationScore | Exception]:
        items = [p.item for p in prompts]
        sequences = [p.ids for p in prompts]
        pixels = [p.pixels for p in prompts]
        chunk = self.settings.forward_batch
        p_safe: list[float] = []
        p_unsafe: list[float] = []
        for start in range(0, len(sequences), chunk):
            chunk_safe, chunk_unsafe = self._first_token(
                sequences[start : start + chunk], pixels[start : start + chunk]
            )
            p_safe += chunk_safe
            p_unsafe += chunk_unsafe
        results: list[ConversationScore | Exception] = []
        want = []
        for row, item in enumerate(items):
            try:
                unsafe, binary, mass = read_verdict(self.family, p_safe[row], p_unsafe[row], self.settings.min_mass)
            except GuardError as exc:
                results.append(exc)
                continue
            results.append(ConversationScore(score=unsafe, score_binary=binary, mass=mass))
            if max(unsafe, binary) >= item.categories_from:
                want.append(row)
        if want:
            self._add_categories(items, sequences, pixels, results, want)
        return results

    def _score_cached(self, prompts: list[_Prompt]) -> list[ConversationScore | Exception]:
        results: list[ConversationScore | Exception] = []
        step = self.settings.forward_batch
        for start in range(0, len(prompts), step):
            results += self._forward_cached(prompts[start : start + step])
        self.prefix.trim()  # after the whole batch, so no row's prefix goes while another row uses it
        return results

    def _forward_cached(self, prompts: list[_Prompt]) -> list[ConversationScore | Exception]:
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
            state = _Prefill(prompt, len(prompt.ids), one_sequence(own))
            kept, all_excluded = read_categories(self._continue_cached(state), prompt.item.taxonomy)
            results.append(ConversationScore(unsafe, binary, mass, categories=kept, all_excluded=all_excluded))
        return results

    def _feed(self, state: _Prefill) -> Any | None:
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
        state.cache, state.done = out.past_key_values, end
        if end < len(ids):
            return None
        if self.prefix.enabled and images is None:
            # From position 0: blocks of its prefix evicted between steps are put back.
            self.prefix.insert(tenant, ids, 0, [(layer.keys[0], layer.values[0]) for layer in state.cache.layers])
            self.prefix.count(state.hit, len(ids) - state.hit)
            self.prefix.trim()
        return out

    def prefill(self, state: _Prefill) -> ConversationScore | None:
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

    def distribute(self, state: _Prefill) -> CategoryScores | None:
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

    def _continue_cached(self, state: _Prefill) -> str:
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

    def _continue(self, prompts: list[list[int]], pixels: list[list[Any]]) -> list[str]:
        """Greedy continuations (at most max_new_tokens, stopping at the family's stop tokens)."""
        ids, mask, _ = self._batch(prompts)
        images = self._pixel_values(pixels)
        extra = {"pixel_values": images} if images is not None else {}
        with self.torch.inference_mode():
            out = self.model.generate(
                **extra,
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=self.settings.max_new_tokens,
                do_sample=False,
                eos_token_id=self.stop_ids,
                pad_token_id=self.pad_id,
            )
        return [self.tokenizer.decode(row[ids.shape[1] :], skip_special_tokens=True) for row in out]

    def _add_categories(
        self,
        items: list[_Item],
        sequences: list[list[int]],
        pixels: list[list[Any]],
        results: list[ConversationScore | Exception],
        rows: list[int],
    ) -> None:
        texts: list[str] = []
        for start in range(0, len(rows), self.settings.forward_batch):
            batch = rows[start : start + self.settings.forward_batch]
            texts += self._continue([[*sequences[r], self.unsafe_ids[0]] for r in batch], [pixels[r] for r in batch])
        for row, text in zip(rows, texts, strict=True):
            kept, all_excluded = read_categories(text, items[row].taxonomy)
            prev = results[row]
            assert isinstance(prev, ConversationScore)
            results[row] = ConversationScore(
                prev.score, prev.score_binary, prev.mass, categories=kept, all_excluded=all_excluded
            )


class LlamaGuard:
    """A ConversationGuard backed by a local transformers model, run on a GuardRunner."""

    def __init__(self, name: str, settings: GuardSettings, runner: GuardRunner) -> None:
        self.name = name
        self.settings = settings
        self.family = FAMILIES[settings.family]
        self.runner = runner
        self.prefix_cache = PrefixCache(int(settings.prefix_cache_mb * 2**20))
        self.verdicts: VerdictCache[Remembered] = VerdictCache(settings.verdict_cache_entries)
        self._model: _Model | None = None

    async def load(self) -> None:
        self._model = await self.runner.call(
            lambda: _Model(self.settings, self.family, self.name, self.prefix_cache, self.verdicts)
        )

    def _prepare(self, items: list[_Item]) -> list[_Prompt | ConversationScore | Exception]:
        assert self._model is not None
        return self._model.prepare(items)

    def _score(self, prompts: list[_Prompt]) -> list[ConversationScore | Exception]:
        assert self._model is not None
        return self._model.score(prompts)

    def _prefill(self, states: list[_Prefill]) -> list[ConversationScore | None]:
        assert self._model is not None
        return [self._model.prefill(state) for state in states]

    def _distribute(self, states: list[_Prefill]) -> list[CategoryScores | None]:
        assert self._model is not None
        return [self._model.distribute(state) for state in states]

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
        item = _Item(tuple(turns), taxonomy, categories_from, current_tenant.get())
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
        state = _Prefill(prompt)
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
        item = _Item(tuple(turns), taxonomy, categories_from, current_tenant.get(), recall=False)
        (prompt,) = await self.runner.submit(self._prepare, [item], key=(id(self), "prepare"))
        if isinstance(prompt, Exception):
            raise prompt
        assert isinstance(prompt, _Prompt)
        state, long = _Prefill(prompt), len(prompt.ids) - prompt.cached > self.settings.step_tokens
        while True:
            (done,) = await self.runner.submit(self._distribute, [state], key=state, bulk=long)
            if done is not None:
                return done

    def encode(self, turns: list[Turn], taxonomy: Taxonomy, pixels: list[Any] | None = None) -> list[int]:
        """Token ids of the prompt (tests and tools); `pixels` receives the images' tiles."""
        assert self._model is not None
        return self._model.encode(turns, taxonomy, pixels if pixels is not None else [])
