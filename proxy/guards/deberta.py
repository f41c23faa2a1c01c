"""Prompt Guard's DeBERTa-v2 encoder at inference, without recomputing constants: set up once at load
in the guard runner's thread, then used by every forward pass of a Prompt Guard check.

DeBERTa's disentangled attention projects the whole relative-position table (2 x 256 rows for Prompt
Guard) through each layer's query and key projections on every forward pass, repeats the result per
sequence, and multiplies every token with all 512 rows, although the table depends only on the
weights and a text of n tokens reads only 2n - 1 of its rows: for a 30-token text that was about
80% of the arithmetic. `cache_relative_positions` projects the table once per layer and replaces
each layer's position bias with one that multiplies only the rows the batch reads (same formula,
same gathers; scores agree with the stock model to float rounding).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def cache_relative_positions(model: nn.Module) -> int:
    """Set up the cached position bias in every layer of a DebertaV2 model in eval mode; returns
    the number of layers changed (0 for another architecture, which is left as it is)."""
    encoder = getattr(getattr(model, "deberta", None), "encoder", None)
    if encoder is None or not getattr(encoder, "relative_attention", False):
        return 0
    from transformers.models.deberta_v2 import modeling_deberta_v2 as stock

    changed = 0
    with torch.no_grad():
        table = encoder.get_rel_embedding()
        for layer in encoder.layer:
            attention = layer.attention.self
            if not attention.relative_attention:
                continue
            rows = table[0 : attention.pos_ebd_size * 2, :].unsqueeze(0)
            shared = attention.share_att_key
            keys = _project(attention, attention.key_proj if shared else getattr(attention, "pos_key_proj", None), rows)
            queries = _project(
                attention, attention.query_proj if shared else getattr(attention, "pos_query_proj", None), rows
            )
            attention.disentangled_attention_bias = _PositionBias(attention, keys, queries, stock)
            changed += 1
    return changed


def _project(attention: Any, projection: Any, rows: torch.Tensor) -> torch.Tensor | None:
    """The table through one projection, split by head: (heads, rows, head size)."""
    if projection is None:
        return None
    return attention.transpose_for_scores(projection(rows), attention.num_attention_heads)


class _PositionBias:
    """DisentangledSelfAttention.disentangled_attention_bias with the table's projections computed
    once, and each product taken only over the table rows that its gather reads."""

    def __init__(self, attention: Any, keys: torch.Tensor | None, queries: torch.Tensor | None, stock: Any) -> None:
        self.attention = attention
        self.keys = keys
        self.queries = queries
        self.stock = stock

    def __call__(
        self,
        query_layer: torch.Tensor,
        key_layer: torch.Tensor,
        relative_pos: torch.Tensor | None,
        rel_embeddings: torch.Tensor,
        scale_factor: int,
    ) -> Any:
        att, stock = self.attention, self.stock
        if relative_pos is None:
            relative_pos = stock.build_relative_position(
                query_layer, key_layer, bucket_size=att.position_buckets, max_position=att.max_relative_positions
            )
        if relative_pos.dim() == 2:
            relative_pos = relative_pos.unsqueeze(0).unsqueeze(0)
        elif relative_pos.dim() == 3:
            relative_pos = relative_pos.unsqueeze(1)
        elif relative_pos.dim() != 4:
            raise ValueError(f"Relative position ids must be of dim 2 or 3 or 4. {relative_pos.dim()}")
        span = att.pos_ebd_size
        relative_pos = relative_pos.to(device=query_layer.device, dtype=torch.long)
        score: Any = 0
        if "c2p" in att.pos_att_type and self.keys is not None:
            index = torch.clamp(relative_pos + span, 0, span * 2 - 1)
            c2p = self._gathered(query_layer, self.keys, index, query_layer.size(1), relative_pos.size(-1))
            score += c2p / stock.scaled_size_sqrt(self.keys, scale_factor).to(dtype=c2p.dtype)
        if "p2c" in att.pos_att_type and self.queries is not None:
            # The stock call passes these two in this order; kept, so both read the same positions.
            r_pos = stock.build_rpos(
                query_layer, key_layer, relative_pos, att.max_relative_positions, att.position_buckets
            )
            index = torch.clamp(-r_pos + span, 0, span * 2 - 1)
            size = key_layer.size(-2)
            p2c = self._gathered(key_layer, self.queries, index, size, size).transpose(-1, -2)
            score += p2c / stock.scaled_size_sqrt(self.queries, scale_factor).to(dtype=p2c.dtype)
        return score

    def _gathered(self, states: torch.Tensor, table: torch.Tensor, index: torch.Tensor, rows: int, cols: int) -> Any:
        """bmm(states, table^T) gathered at `index`, computed over table rows [min, max] of index."""
        low, high = int(index.min()), int(index.max()) + 1
        heads = table.size(0)
        part = table[:, low:high, :].transpose(-1, -2)
        products = torch.matmul(states.view(-1, heads, states.size(-2), states.size(-1)), part)
        products = products.view(-1, states.size(-2), high - low)
        return torch.gather(products, dim=-1, index=(index - low).squeeze(0).expand([states.size(0), rows, cols]))
