"""The cached relative-position bias of Prompt Guard's DeBERTa: the same logits as the stock
transformers model, for one text and for a padded batch of different lengths. The model is a small
random one in Prompt Guard 2's configuration (the tiny fixture's hand-set weights ignore positions)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

from proxy.guards.deberta import cache_relative_positions
from tests.guards.model_fixtures import TinyModels


def _batch(lengths: list[int], vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(len(lengths))
    ids = torch.zeros((len(lengths), max(lengths)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(5, vocab, (n,), generator=generator)
        mask[row, :n] = 1
    return ids, mask


def _random_deberta(**overrides: Any) -> DebertaV2ForSequenceClassification:
    fields: dict[str, Any] = dict(
        vocab_size=1000,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=512,
        relative_attention=True,
        position_buckets=256,
        max_relative_positions=-1,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        pos_att_type=["p2c", "c2p"],
        position_biased_input=False,
        type_vocab_size=0,
        num_labels=2,
        pooler_hidden_size=64,
        initializer_range=0.5,  # large weights, so that a wrong position bias shows in the output
    )
    config = DebertaV2Config(**{**fields, **overrides})
    torch.manual_seed(0)
    return DebertaV2ForSequenceClassification(config).eval()


@pytest.mark.parametrize("overrides", [{}, {"share_att_key": False}, {"pos_att_type": ["c2p"]}])
def test_cached_position_bias_gives_the_stock_logits(overrides: dict[str, Any]) -> None:
    stock = _random_deberta(**overrides)
    fast = _random_deberta(**overrides)
    assert cache_relative_positions(fast) == fast.config.num_hidden_layers
    for lengths in ([7], [30, 3, 120], [512], [512, 40]):
        ids, mask = _batch(lengths, fast.config.vocab_size)
        with torch.inference_mode():
            want = stock.deberta(input_ids=ids, attention_mask=mask).last_hidden_state
            got = fast.deberta(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_other_architectures_are_left_alone(tiny: TinyModels) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny.lg3).eval()
    assert cache_relative_positions(model) == 0
