"""The distribution of the first category code after a Llama Guard `unsafe` (the per-category scores of
the moderation endpoint), computed in the guard runner's thread from the scored prompt's keys/values.

P(first code = c | unsafe) is the product of the probabilities of c's tokens after the forced `unsafe`
(the newline and the code, as the tokenizer writes `unsafe\\n<code>`), times the probability that the
next token does not continue the code: a token whose vocabulary string starts with a letter, a digit or
`_` would make another code (`S1` then `0` is `S10`) or no code at all, as `read_categories` reads it.
Each code takes one forward pass of its few tokens over a fresh cache of the prompt's keys/values, so
memory stays one prompt's cache whatever the number of codes.
"""

from __future__ import annotations

from typing import Any

from proxy.guards.guard import GuardError

MAX_REMEMBERED_CODES = 4096
"""Token ids of codes already seen; custom codes are at most `[A-Z]\\d{1,3}`, so this holds them all."""


def _encode(tokenizer: Any, text: str) -> list[int]:
    ids: list[int] = tokenizer(text, add_special_tokens=False, split_special_tokens=True, verbose=False).input_ids
    return ids


def _continues(piece: str | None) -> bool:
    head = (piece or "")[:1]
    return head.isascii() and (head.isalnum() or head == "_")


class CodeTokens:
    """A tokenizer's spelling of each code after `unsafe`, and which tokens would continue a code."""

    def __init__(self, tokenizer: Any, device: str) -> None:
        import torch

        self.tokenizer = tokenizer
        self._head = _encode(tokenizer, "unsafe")
        self._ids: dict[str, list[int]] = {}
        pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self.continues = torch.tensor([_continues(piece) for piece in pieces], device=device)

    def ids(self, code: str) -> list[int]:
        """The tokens of `\\n<code>` as they follow `unsafe`."""
        found = self._ids.get(code)
        if found is None:
            full = _encode(self.tokenizer, f"unsafe\n{code}")
            if full[: len(self._head)] != self._head or len(full) == len(self._head):
                raise GuardError(f"the tokenizer does not spell category {code!r} after 'unsafe' on its own")
            found = full[len(self._head) :]
            if len(self._ids) < MAX_REMEMBERED_CODES:
                self._ids[code] = found
        return found


def first_code_probabilities(
    model: Any, layers: list[tuple[Any, Any]], prompt_len: int, rows: list[list[int]], continues: Any
) -> list[float]:
    """P(first code = row's code | unsafe) for each row `[unsafe, *code tokens]`, given the prompt's
    per-layer keys/values (left unchanged: each row extends its own copy)."""
    import torch
    from transformers import DynamicCache

    device = continues.device
    out: list[float] = []
    for row in rows:
        cache = DynamicCache([(keys, values) for keys, values in layers])
        with torch.inference_mode():
            logits = model(
                input_ids=torch.tensor([row], device=device),
                position_ids=torch.arange(prompt_len, prompt_len + len(row), device=device).unsqueeze(0),
                past_key_values=cache,
                use_cache=True,
            ).logits[0]
            probs = torch.softmax(logits.float(), dim=-1)
            chance = 1.0
            for step in range(1, len(row)):
                chance *= float(probs[step - 1, row[step]])
            width = min(probs.shape[-1], continues.shape[0])  # an lm_head may be wider than the vocabulary
            chance *= 1.0 - float(probs[-1, :width][continues[:width]].sum())
        if not -1e-6 <= chance <= 1.0 + 1e-6:  # NaN included: never a score
            raise GuardError(f"the distribution of category codes is not a probability ({chance!r})")
        out.append(min(max(chance, 0.0), 1.0))
    return out
