"""Convert a tiny Llama Guard-style transformers model (proxy/demo/models.py) to a GGUF file, so the
llama-cpp backends run the same deterministic guard as the transformers path.

Layout facts followed (GGUF `llama` architecture): q/k projection rows are permuted from HF's
rotate-half order to llama.cpp's interleaved pairs; the byte-level BPE vocabulary, merges and the
Llama 3 pre-tokenizer (`llama-bpe`) go into the tokenizer metadata; special tokens are `control` type.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

CONTROL, NORMAL = 3, 1


def _permute(w: torch.Tensor, heads: int) -> np.ndarray[Any, Any]:
    rows = w.shape[0]
    permuted: np.ndarray[Any, Any] = (
        w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape).numpy()
    )
    return permuted


def convert(model_dir: Path, out: Path) -> Path:
    import gguf

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = model.config
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name("tiny-llama-guard")
    writer.add_context_length(8192)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = tok.get_vocab()
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    special = set(tok.all_special_tokens) | {t for t in vocab if t.startswith("<|") and t.endswith("|>")}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list([t for t, _ in by_id])
    writer.add_token_types([CONTROL if t in special else NORMAL for t, _ in by_id])
    merges = json.loads((model_dir / "tokenizer.json").read_text())["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tok.bos_token_id)
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_pad_token_id(tok.pad_token_id)
    writer.add_add_bos_token(True)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"].numpy())
    writer.add_tensor("output_norm.weight", state["model.norm.weight"].numpy())
    writer.add_tensor("output.weight", state["lm_head.weight"].numpy())
    names = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{i}."
        writer.add_tensor(
            f"blk.{i}.attn_q.weight", _permute(state[prefix + "self_attn.q_proj.weight"], cfg.num_attention_heads)
        )
        writer.add_tensor(
            f"blk.{i}.attn_k.weight", _permute(state[prefix + "self_attn.k_proj.weight"], cfg.num_key_value_heads)
        )
        for hf, gg in names.items():
            writer.add_tensor(f"blk.{i}.{gg}.weight", state[prefix + hf + ".weight"].numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
