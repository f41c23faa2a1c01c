"""Llama Guard's model in the guard runner's worker thread: loads the tokenizer and weights, encodes a
check's prompt, answers from the verdict cache, and scores prompts in plain batched forward passes (the
path of prompts with images, and of every prompt when the prefix cache is off). llama_guard.py submits
the jobs; llama_guard_prefill.py adds the prefix-cached and chunked paths.

The verdict cache answers an exact prompt (same token ids and taxonomy) already scored, from the
encoding job; an entry read without categories does not serve a check that needs them. Prompts with
images bypass it: their ids name tiles, not pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.guards.guard import (
    ConversationScore,
    GuardError,
    GuardLimitExceeded,
    Taxonomy,
    Turn,
    tokens_at_least,
)
from proxy.guards.hub import explain, load_kwargs, pick_dtype, quantize, quiet_transformers
from proxy.guards.llama_guard_prompt import Family, build, encode_hf, read_categories, read_verdict
from proxy.guards.prefix_cache import PrefixCache
from proxy.guards.verdict_cache import VerdictCache, digest_ids
from proxy.settings import GuardSettings

Remembered = tuple[ConversationScore, bool]
"""A verdict cache entry: the score, and whether its categories were read."""


@dataclass(frozen=True)
class Item:
    turns: tuple[Turn, ...]
    taxonomy: Taxonomy
    categories_from: float
    tenant: str | None = None
    recall: bool = True
    """Whether the verdict cache may answer (not for a category distribution, which it does not keep)."""


@dataclass(frozen=True)
class Prompt:
    """An encoded check: token ids and the image tiles they refer to."""

    item: Item
    ids: list[int]
    pixels: list[Any]
    cached: int = 0
    """Tokens the prefix cache held when the prompt was encoded (it may evict them before the forward)."""


class Model:
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

    def prepare(self, items: list[Item]) -> list[Prompt | ConversationScore | Exception]:
        """Each item's prompt, or its own error (text the tokenizer cannot encode, over max_tokens)."""
        return [self._prepare_one(item) for item in items]

    def _prepare_one(self, item: Item) -> Prompt | ConversationScore | Exception:
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
            return Prompt(item, ids, pixels)
        found = self._recall(item, ids) if item.recall else None
        if found is not None:
            return found
        cached = self.prefix.peek(item.tenant, ids) if self.prefix.enabled else 0
        return Prompt(item, ids, pixels, cached)

    @staticmethod
    def _verdict_key(item: Item, ids: list[int]) -> tuple[Any, ...]:
        return (item.tenant, digest_ids(ids), item.taxonomy)

    def _recall(self, item: Item, ids: list[int]) -> ConversationScore | None:
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

    def _remember(self, prompt: Prompt, score: ConversationScore | Exception) -> None:
        if prompt.pixels or not isinstance(score, ConversationScore) or not self.verdicts.enabled:
            return
        key = self._verdict_key(prompt.item, prompt.ids)
        read = max(score.score, score.score_binary) >= prompt.item.categories_from
        known = self.verdicts.peek(key)
        if read or known is None or not known[1]:  # never replace an entry that has categories
            self.verdicts.put(key, (score, read))

    def _count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def _score_plain(self, prompts: list[Prompt]) -> list[ConversationScore | Exception]:
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
        items: list[Item],
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
