"""The distribution of the first category code after a Llama Guard `unsafe` (the per-category scores of
the moderation endpoint), computed in the guard runner's thread from the scored prompt's keys/values.

P(first code = c | unsafe) is the product of the probabilities of c's tokens after the forced `unsafe`
(the newline and the code, as the tokenizer writes `unsafe\\n<code>`), times the probability that the
next token does not continue the code: a token whose vocabulary string starts with a letter, a digit or
`_` would make another code (`S1` then `0` is `S10`) or no code at all, as `read_categories` reads it.
The codes' few tokens go through forward passes over copies of the prompt's keys/values, several codes
per pass as long as the copies stay under `COPY_TOKENS` prompt tokens (a 300-token prompt: every code in
one pass).
"""

from __future__ import annotations

from typing import Any

from proxy.guards.guard import GuardError

COPY_TOKENS = 16384
"""Prompt tokens whose keys/values one pass may copy (one copy per row it holds)."""
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
    per-layer keys/values (left unchanged: each pass extends its own copies). Rows share a forward pass
    (a CPU pass costs about one read of the weights, whatever its few tokens), as many as keep the
    copied keys/values under `COPY_TOKENS` prompt tokens."""
    per_pass = max(1, COPY_TOKENS // max(prompt_len, 1))
    out: list[float] = []
    for start in range(0, len(rows), per_pass):
        out += _one_pass(model, layers, prompt_len, rows[start : start + per_pass], continues)
    return out


def _one_pass(
    model: Any, layers: list[tuple[Any, Any]], prompt_len: int, rows: list[list[int]], continues: Any
) -> list[float]:
    import torch
    from transformers import DynamicCache

    device, width = continues.device, max(len(row) for row in rows)
    # Right padding: a row's own tokens come first and never attend to the pad after them.
    ids = torch.tensor([row + [row[-1]] * (width - len(row)) for row in rows], device=device)
    cache = DynamicCache([(k.expand(len(rows), -1, -1, -1), v.expand(len(rows), -1, -1, -1)) for k, v in layers])
    positions = torch.arange(prompt_len, prompt_len + width, device=device).unsqueeze(0).expand(len(rows), -1)
    with torch.inference_mode():
        logits = model(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True).logits
        probs = torch.softmax(logits.float(), dim=-1)
    vocab = min(probs.shape[-1], continues.shape[0])  # an lm_head may be wider than the vocabulary
    out: list[float] = []
    for r, row in enumerate(rows):
        chance = 1.0
        for step in range(1, len(row)):
            chance *= float(probs[r, step - 1, row[step]])
        chance *= 1.0 - float(probs[r, len(row) - 1, :vocab][continues[:vocab]].sum())
        if not -1e-6 <= chance <= 1.0 + 1e-6:  # NaN included: never a score
            raise GuardError(f"the distribution of category codes is not a probability ({chance!r})")
        out.append(min(max(chance, 0.0), 1.0))
    return out
