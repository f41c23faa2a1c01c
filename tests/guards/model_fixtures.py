"""The tiny deterministic guard models of the test session, built once into a session directory.

Trigger words (see proxy/demo/corpus.py): Llama Guard flags bomb, bombs, weapon, poison, explosive,
heist anywhere in the conversation (categories: always S1); Prompt Guard flags the whole pieces
ignore, override, jailbreak, disregard, bypass. Graded variants return chosen probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from proxy.demo.models import build_llama_guard, build_prompt_guard

GRADED_ON, GRADED_OFF = 0.7, 0.2


@dataclass(frozen=True)
class TinyModels:
    lg3: Path  # saturated: ~0.999 with a trigger, ~0.001 without
    lg3_graded: Path  # exactly GRADED_ON / GRADED_OFF (safe/unsafe-renormalised)
    lg3_wrong_format: Path
    lg4: Path  # Llama 4 special tokens
    pg2: Path
    pg2_graded: Path
    pg1: Path  # three labels; a trigger raises JAILBREAK


def build_all(root: Path) -> TinyModels:
    return TinyModels(
        lg3=build_llama_guard(root / "lg3"),
        lg3_graded=build_llama_guard(root / "lg3-graded", p_on=GRADED_ON, p_off=GRADED_OFF),
        lg3_wrong_format=build_llama_guard(root / "lg3-wrong", wrong_format=True),
        lg4=build_llama_guard(root / "lg4", llama4=True),
        pg2=build_prompt_guard(root / "pg2"),
        pg2_graded=build_prompt_guard(root / "pg2-graded", p_on=GRADED_ON, p_off=GRADED_OFF),
        pg1=build_prompt_guard(root / "pg1", labels=3),
    )


def build_llama4_vision(out: Path) -> Path:
    """A tiny random Llama4ForConditionalGeneration (336x336 tiles, 144 tokens each) with the Llama 4
    tokenizer: it checks the image path end to end (tiles, tokens, pixels into the vision tower).
    Its weights are random, so its verdicts on images mean nothing."""
    import torch
    from transformers import Llama4Config, Llama4ForConditionalGeneration, Llama4TextConfig, Llama4VisionConfig

    from proxy.demo.models import build_llama_tokenizer

    tok = build_llama_tokenizer(out, llama4=True)
    text = Llama4TextConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        intermediate_size_mlp=128,
        moe_layers=[],
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        use_qk_norm=False,
        no_rope_layer_interval=4,
        attention_chunk_size=8192,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
        eos_token_id=[tok.convert_tokens_to_ids("<|eot|>")],
    )
    vision = Llama4VisionConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=128,
        image_size=336,
        patch_size=14,
        pixel_shuffle_ratio=0.5,
        projector_input_dim=64,
        projector_output_dim=64,
        vision_output_dim=64,
        num_channels=3,
    )
    config = Llama4Config(
        text_config=text,
        vision_config=vision,
        image_token_index=tok.convert_tokens_to_ids("<|patch|>"),
        boi_token_index=tok.convert_tokens_to_ids("<|image_start|>"),
        eoi_token_index=tok.convert_tokens_to_ids("<|image_end|>"),
    )
    torch.manual_seed(0)
    Llama4ForConditionalGeneration(config).save_pretrained(out)
    return out
