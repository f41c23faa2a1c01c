"""The prefix KV cache of a Llama Guard model: key/value tensors of prompt prefixes already computed,
so a check pays only for its new tokens. Used only in the guard runner's thread (llama_guard_prefill.py).

A radix tree of fixed blocks of `BLOCK_TOKENS` token ids, as vLLM's automatic prefix caching: each
node holds every layer's keys and values for its block, its parent the block before. A prompt's
longest cached block-aligned prefix is found by walking the tree; the rest is computed at positions
that continue from the cached length, and its full blocks are added. The policy header is thus
computed once per (tenant, taxonomy), the output check reuses the input check's header and
conversation, and a new turn reuses the turns before it.

Bounded by bytes: past `max_bytes` the least recently used blocks go first. A path is marked used
from its deepest block up to the root, so a block is never older than its children: the least
recently used block is always a leaf and eviction never strands a subtree. Blocks are
private copies: a forward pass only ever reads them through a fresh concatenation.
Trees are per namespace (the tenant), so one tenant cannot time another's cached conversations.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable, Sequence
from typing import Any

BLOCK_TOKENS = 16

KV = list[tuple[Any, Any]]
"""Per layer: (keys, values), each [kv_heads, tokens, head_dim] (one sequence, no batch axis)."""


class Block:
    __slots__ = ("children", "ids", "kv", "nbytes", "parent")

    def __init__(self, ids: tuple[int, ...], parent: Block | None, kv: KV) -> None:
        self.ids = ids
        self.parent = parent
        self.kv = kv
        self.children: dict[tuple[int, ...], Block] = {}
        self.nbytes = sum(k.nbytes + v.nbytes for k, v in kv)


class PrefixCache:
    def __init__(self, max_bytes: int, block_tokens: int = BLOCK_TOKENS) -> None:
        self.max_bytes = max_bytes
        self.block_tokens = block_tokens
        self.bytes_held = 0
        self.hit_tokens = 0
        self.computed_tokens = 0
        self.prefetched_tokens = 0
        self.evictions = 0
        self.observe: Callable[[str, int], None] | None = None
        """Called in the runner's thread with ("hit" | "computed" | "prefetched" | "evicted", count)."""
        self._roots: dict[Hashable, Block] = {}
        self._lru: collections.OrderedDict[Block, None] = collections.OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    @property
    def blocks(self) -> int:
        return len(self._lru)

    def _walk(self, namespace: Hashable, ids: Sequence[int], scored: bool = True) -> list[Block]:
        # A check's last token is always computed: its logits are the verdict.
        usable = (len(ids) - scored) // self.block_tokens * self.block_tokens
        node = self._roots.get(namespace)
        path: list[Block] = []
        for start in range(0, usable, self.block_tokens):
            child = node.children.get(tuple(ids[start : start + self.block_tokens])) if node else None
            if child is None:
                break
            path.append(child)
            node = child
        return path

    def peek(self, namespace: Hashable, ids: Sequence[int], *, scored: bool = True) -> int:
        """Tokens of `ids` a lookup would find now (no effect on recency or counters). `scored`:
        `ids` is a prompt to score, whose last token a lookup never serves (a prefetch is not)."""
        return len(self._walk(namespace, ids, scored)) * self.block_tokens

    def lookup(self, namespace: Hashable, ids: Sequence[int]) -> list[Block]:
        """The blocks of the longest cached prefix (at most len(ids) - 1 tokens), marked used."""
        path = self._walk(namespace, ids)
        self._touch(path)
        return path

    def _touch(self, path: list[Block]) -> None:
        for block in reversed(path):
            self._lru[block] = None
            self._lru.move_to_end(block)

    def count(self, hit: int, computed: int) -> None:
        self.hit_tokens += hit
        self.computed_tokens += computed
        if self.observe is not None:
            self.observe("hit", hit)
            self.observe("computed", computed)

    def count_prefetched(self, computed: int) -> None:
        """Tokens computed ahead of a check (screening/prefetch.py); the check counts them as hits."""
        self.prefetched_tokens += computed
        if self.observe is not None:
            self.observe("prefetched", computed)

    def insert(self, namespace: Hashable, ids: Sequence[int], start: int, kv: KV) -> None:
        """Add the full blocks of `ids` that `kv` covers: positions start .. start + its length.
        Blocks already there are kept (and touched); nothing is evicted here (see `trim`)."""
        if not self.enabled:
            return
        size = self.block_tokens
        end = start + (kv[0][0].shape[-2] if kv else 0)
        node = self._roots.get(namespace)
        if node is None:
            node = self._roots[namespace] = Block((), None, [])
        path: list[Block] = []
        for first in range(0, min(end, len(ids)) // size * size, size):
            key = tuple(ids[first : first + size])
            child = node.children.get(key)
            if child is None:
                if first < start:
                    break  # a block before the computed part is gone: nothing to hang new ones on
                lo = first - start
                # clone: a block is its own storage, never a view into a batch's tensors
                part = [(k[:, lo : lo + size].clone(), v[:, lo : lo + size].clone()) for k, v in kv]
                child = node.children[key] = Block(key, node, part)
                self.bytes_held += child.nbytes
            path.append(child)
            node = child
        self._touch(path)

    def trim(self) -> None:
        """Evict least recently used blocks (always leaves) until the cache is within its bound."""
        evicted = 0
        while self.bytes_held > self.max_bytes and self._lru:
            block, _ = self._lru.popitem(last=False)
            parent = block.parent
            assert parent is not None and not block.children
            del parent.children[block.ids]
            self.bytes_held -= block.nbytes
            evicted += 1
            if parent.parent is None and not parent.children:
                self._roots = {ns: root for ns, root in self._roots.items() if root is not parent}
        self.evictions += evicted
        if evicted and self.observe is not None:
            self.observe("evicted", evicted)


def gather(path: list[Block]) -> KV:
    """The cached prefix as one (keys, values) pair per layer, [kv_heads, tokens, head_dim]."""
    import torch

    return [
        (torch.cat([b.kv[i][0] for b in path], dim=1), torch.cat([b.kv[i][1] for b in path], dim=1))
        for i in range(len(path[0].kv))
    ]


def batch_past(paths: list[list[Block]], width: int) -> Any:
    """A DynamicCache of a batch's cached prefixes, each right-aligned in `width` slots after zeros
    (the attention mask hides the zeros)."""
    import torch
    from transformers import DynamicCache

    if width == 0:
        return DynamicCache()
    rows = [gather(path) if path else None for path in paths]
    sample = next(kv for kv in rows if kv is not None)
    layers = []
    for layer, (k0, _) in enumerate(sample):
        keys = torch.zeros((len(paths), k0.shape[0], width, k0.shape[2]), dtype=k0.dtype, device=k0.device)
        values = torch.zeros_like(keys)
        for row, kv in enumerate(rows):
            if kv is not None:
                keys[row, :, width - kv[layer][0].shape[1] :] = kv[layer][0]
                values[row, :, width - kv[layer][1].shape[1] :] = kv[layer][1]
        layers.append((keys, values))
    return DynamicCache(layers)


def one_sequence(kv: KV) -> Any:
    """A one-sequence DynamicCache holding copies of `kv` (a forward pass then extends the copies)."""
    from transformers import DynamicCache

    return DynamicCache([(k.unsqueeze(0), v.unsqueeze(0)) for k, v in kv])
