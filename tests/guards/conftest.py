"""Model-test fixtures: the tiny models (built once per session) and loaded guards on one runner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.guards.llama_guard import LlamaGuard
from proxy.guards.prompt_guard import PromptGuard
from proxy.guards.runner import GuardRunner
from proxy.settings import GuardSettings
from tests.guards.model_fixtures import TinyModels, build_llama4_vision


async def load_llama_guard(path: Path, runner: GuardRunner, family: str = "llama-guard-3-1b", **kw: Any) -> LlamaGuard:
    guard = LlamaGuard("llama_guard", GuardSettings(family=family, model=str(path), **kw), runner)
    await guard.load()
    return guard


async def load_prompt_guard(path: Path, runner: GuardRunner, family: str = "prompt-guard-2", **kw: Any) -> PromptGuard:
    guard = PromptGuard("prompt_guard", GuardSettings(family=family, model=str(path), **kw), runner)
    await guard.load()
    return guard


@pytest.fixture(scope="session")
async def lg3(tiny: TinyModels, runner: GuardRunner) -> LlamaGuard:
    return await load_llama_guard(tiny.lg3, runner)


@pytest.fixture(scope="session")
async def pg2(tiny: TinyModels, runner: GuardRunner) -> PromptGuard:
    return await load_prompt_guard(tiny.pg2, runner)


def build_random(tokenizer_dir: Path, out: Path, llama2_tokens: bool = False) -> Path:
    """A seeded random-weight 2-layer Llama with the fixture's tokenizer: position-sensitive scores.
    `llama2_tokens` adds Llama 2's <s> and </s> (Llama Guard 1's BOS and stop token)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if llama2_tokens:
        tok.add_special_tokens({"additional_special_tokens": ["<s>", "</s>"]})
    tok.save_pretrained(out)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope_theta=10000.0,
        initializer_range=0.2,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(1)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def models(tiny: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("random-lg")
    return {
        "lg3": tiny.lg3,
        "lg3_graded": tiny.lg3_graded,
        "lg4": tiny.lg4,
        "random2": build_random(tiny.lg3, root / "random2", llama2_tokens=True),
        "random3": build_random(tiny.lg3, root / "random3"),
        "random4": build_random(tiny.lg4, root / "random4"),
        "random4_vision": build_llama4_vision(root / "random4-vision"),
    }
