"""Tiny deterministic guard models, built offline in about a second, loaded by the real
transformers path like any hub model.

`build_llama_guard` writes a byte-level BPE tokenizer with Llama 3 (or Llama 4) special tokens and
a 2-layer LlamaForCausalLM whose weights are set by hand: P(first token = "unsafe") is exactly
`p_on` when a trigger word is anywhere in the prompt and `p_off` otherwise, at any length; greedy
decoding then writes `unsafe\\nS1<eot>` or `safe<eot>`. One attention head attends only to trigger
tokens (on the lowest-frequency rotary pair, so position does not matter) and copies a flag that
the output layer reads. Limitation: a trigger in any turn counts, even in a refusal quoting it.

`build_prompt_guard` writes a sentencepiece unigram tokenizer and a DebertaV2ForSequenceClassification
whose P(class 1) is exactly `p_on` when a trigger piece is inside the 512-token window.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from proxy.demo.corpus import LG_TRIGGERS, PG_TRIGGERS, injection_sentences, sentences, stdlib_lines

LLAMA3_SPECIAL = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|finetune_right_pad_id|>",
    "<|python_tag|>",
    "<|eom_id|>",
    "<|image|>",
]
LLAMA4_SPECIAL = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|header_start|>",
    "<|header_end|>",
    "<|eot|>",
    "<|eom|>",
    "<|finetune_right_pad|>",
    "<|image|>",
    "<|image_start|>",
    "<|image_end|>",
    "<|patch|>",
    "<|tile_x_separator|>",
    "<|tile_y_separator|>",
]
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def build_llama_tokenizer(out: Path, *, llama4: bool = False) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = LLAMA4_SPECIAL if llama4 else LLAMA3_SPECIAL
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=special,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(sentences(), trainer=trainer)
    eot = "<|eot|>" if llama4 else "<|eot_id|>"
    pad = "<|finetune_right_pad|>" if llama4 else "<|finetune_right_pad_id|>"
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token=eot,
        pad_token=pad,
        padding_side="left",
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(out)
    return fast


def _trigger_ids(tok: Any, words: tuple[str, ...], marker: str) -> list[int]:
    return sorted(i for t, i in tok.get_vocab().items() if t.lstrip(marker).lower() in words)


def build_llama_guard(
    out: Path,
    *,
    llama4: bool = False,
    p_on: float = 0.999,
    p_off: float = 0.001,
    words: tuple[str, ...] = LG_TRIGGERS,
    seed: int = 0,
    wrong_format: bool = False,
) -> Path:
    """Write a tiny Llama Guard-style model (tokenizer + weights) to `out`. `wrong_format` makes a
    model that expects another prompt ending: after the blank line it predicts a newline, not a
    verdict (what a real model does when fed a prompt in the wrong format)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tok = build_llama_tokenizer(out, llama4=llama4)
    eot = "<|eot|>" if llama4 else "<|eot_id|>"
    eos = [tok.convert_tokens_to_ids("<|end_of_text|>"), tok.convert_tokens_to_ids(eot)]
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=eos,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        _set_llama_weights(model, tok, cfg, words, p_on, p_off, eot, wrong_format)
    model.generation_config = GenerationConfig(
        bos_token_id=cfg.bos_token_id, eos_token_id=eos, pad_token_id=cfg.pad_token_id, do_sample=False
    )
    model.save_pretrained(out)
    (out / "guardrail_demo.json").write_text(json.dumps({"triggers": list(words), "p_on": p_on, "p_off": p_off}))
    return out


def _set_llama_weights(
    model: Any,
    tok: Any,
    cfg: Any,
    words: tuple[str, ...],
    p_on: float,
    p_off: float,
    eot: str,
    wrong_format: bool = False,
) -> None:
    import torch

    hidden, head_dim, vocab = cfg.hidden_size, cfg.head_dim, cfg.vocab_size
    flag, acc, const = 0, 1, 2
    chain = ["safe", "unsafe", "Ċ", "S", "1", *(["ĊĊ"] if wrong_format else [])]
    ident = {t: 3 + k for k, t in enumerate(chain)}
    noise0 = 3 + len(chain)
    noise = torch.randn(vocab, hidden - noise0)
    emb = torch.zeros(vocab, hidden)
    emb[:, noise0:] = 0.1 * noise / noise.norm(dim=-1, keepdim=True)
    emb[:, const] = 1.0
    triggers = _trigger_ids(tok, words, "Ġ")
    emb[triggers, flag] = 1.0
    for t, d in ident.items():
        emb[tok.convert_tokens_to_ids(t), d] = 1.0
    model.model.embed_tokens.weight.copy_(emb)
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, layer.mlp.down_proj):
            proj.weight.zero_()
        if i == 0:
            r = head_dim // 2 - 1  # the lowest-frequency rotary pair: position-blind
            attn.q_proj.weight[r, const] = 1.5
            attn.k_proj.weight[r, flag] = 1.5
            attn.v_proj.weight[0, flag] = 1.0
            attn.o_proj.weight[acc, 0] = 1.0
    # Solve the 2x2 system so P(unsafe | safe, unsafe) is exactly p_on / p_off after "\n\n".
    eps = cfg.rms_norm_eps

    def rms(x: torch.Tensor) -> torch.Tensor:
        return (x.pow(2).mean() + eps).sqrt()

    trig = emb[triggers[0]]
    carried = trig[flag] / rms(trig)
    x_off = emb[tok.convert_tokens_to_ids("ĊĊ")].clone()
    x_on = x_off.clone()
    x_on[acc] += carried
    c0 = x_off[const] / rms(x_off)
    a1, c1 = x_on[acc] / rms(x_on), x_on[const] / rms(x_on)
    beta = float(-_logit(p_off) / c0)
    alpha = float((_logit(p_on) + beta * c1) / a1)
    head = torch.zeros(vocab, hidden)
    head[:, const] = -20.0  # every other token stays out of the race
    unsafe, safe = tok.convert_tokens_to_ids("unsafe"), tok.convert_tokens_to_ids("safe")
    head[unsafe] = 0.0
    head[unsafe, acc] = alpha
    head[safe] = 0.0
    head[safe, const] = beta
    follow = {"safe": eot, "unsafe": "Ċ", "Ċ": "S", "S": "1", "1": eot}
    if wrong_format:
        follow["ĊĊ"] = "Ċ"
    for current, nxt in follow.items():
        head[tok.convert_tokens_to_ids(nxt), ident[current]] = 50.0
    model.lm_head.weight.copy_(head)


def build_prompt_guard_tokenizer(out: Path, vocab_size: int = 2000) -> Any:
    import sentencepiece as spm
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    text = stdlib_lines() + sentences() + injection_sentences() * 5
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        pad_piece="[PAD]",
        bos_piece="[CLS]",
        eos_piece="[SEP]",
        unk_piece="[UNK]",
        user_defined_symbols=["[MASK]"],
        minloglevel=2,
    )
    (out / "spm.model").write_bytes(buf.getvalue())
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "DebertaV2Tokenizer",
                "do_lower_case": False,
                "model_max_length": 512,
                "bos_token": "[CLS]",
                "eos_token": "[SEP]",
                "unk_token": "[UNK]",
                "sep_token": "[SEP]",
                "pad_token": "[PAD]",
                "cls_token": "[CLS]",
                "mask_token": "[MASK]",
            }
        )
    )
    return AutoTokenizer.from_pretrained(out, local_files_only=True)


def build_prompt_guard(
    out: Path,
    *,
    p_on: float = 0.999,
    p_off: float = 0.001,
    words: tuple[str, ...] = PG_TRIGGERS,
    seed: int = 0,
    labels: int = 2,
) -> Path:
    """Write a tiny Prompt Guard-style classifier; with `labels=3`, a Prompt Guard 1-style one whose
    trigger raises JAILBREAK (class 2)."""
    import torch
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    tok = build_prompt_guard_tokenizer(out)
    names = ["BENIGN", "MALICIOUS"] if labels == 2 else ["BENIGN", "INJECTION", "JAILBREAK"]
    cfg = DebertaV2Config(
        vocab_size=len(tok),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        hidden_act="gelu",
        max_position_embeddings=512,
        type_vocab_size=0,
        layer_norm_eps=1e-7,
        relative_attention=True,
        max_relative_positions=-1,
        position_buckets=256,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        pos_att_type=["p2c", "c2p"],
        position_biased_input=False,
        pad_token_id=tok.pad_token_id,
        num_labels=labels,
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
        architectures=["DebertaV2ForSequenceClassification"],
    )
    torch.manual_seed(seed)
    model = DebertaV2ForSequenceClassification(cfg).eval()
    with torch.no_grad():
        _set_deberta_weights(model, tok, cfg, words, p_on, p_off)
    model.save_pretrained(out)
    (out / "guardrail_demo.json").write_text(json.dumps({"triggers": list(words), "p_on": p_on, "p_off": p_off}))
    return out


def _set_deberta_weights(model: Any, tok: Any, cfg: Any, words: tuple[str, ...], p_on: float, p_off: float) -> None:
    import torch

    hidden = cfg.hidden_size
    flag, nflag, const, nconst, acc, nacc, n0 = 0, 1, 2, 3, 4, 5, 6  # +/- pairs keep rows zero-mean
    noise = torch.randn(cfg.vocab_size, hidden - n0)
    noise = noise - noise.mean(-1, keepdim=True)
    emb = torch.zeros(cfg.vocab_size, hidden)
    emb[:, n0:] = 0.1 * noise / noise.norm(dim=-1, keepdim=True)
    emb[:, const], emb[:, nconst] = 1.0, -1.0
    triggers = _trigger_ids(tok, words, "▁")
    emb[triggers, flag], emb[triggers, nflag] = 1.0, -1.0
    deberta = model.deberta
    deberta.embeddings.word_embeddings.weight.copy_(emb)
    deberta.encoder.rel_embeddings.weight.zero_()
    for i, layer in enumerate(deberta.encoder.layer):
        sa = layer.attention.self
        for lin in (sa.query_proj, sa.key_proj, sa.value_proj, layer.attention.output.dense, layer.output.dense):
            lin.weight.zero_()
            lin.bias.zero_()
        if i == 0:
            sa.query_proj.weight[0, const] = 3.0
            sa.key_proj.weight[0, flag] = 3.0
            sa.value_proj.weight[0, flag] = 1.0
            layer.attention.output.dense.weight[acc, 0] = 1.0
            layer.attention.output.dense.weight[nacc, 0] = -1.0
    model.pooler.dense.weight.zero_()
    model.pooler.dense.bias.zero_()
    model.pooler.dense.weight[0, acc] = 1.0
    model.classifier.weight.zero_()
    model.classifier.bias.zero_()
    target = cfg.num_labels - 1  # MALICIOUS (PG2) or JAILBREAK (PG1)
    model.classifier.weight[target, 0] = 1.0
    ids = torch.tensor([[tok.cls_token_id, triggers[0], tok.sep_token_id]])
    pooled = model.pooler(deberta(ids).last_hidden_state)[0, 0].item()
    # Logits: target class 0 or bias, others 0; with k classes P(target) = e^b / (e^b + k - 1).
    others = cfg.num_labels - 1
    b_off = _logit(p_off) + math.log(others)
    b_on = _logit(p_on) + math.log(others)
    model.classifier.bias[target] = b_off
    model.classifier.weight[target, 0] = (b_on - b_off) / pooled
