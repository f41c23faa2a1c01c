"""Model-test fixtures: the tiny models (built once per session) and loaded guards on one runner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.guards.llama_guard import LlamaGuard
from proxy.guards.prompt_guard import PromptGuard
from proxy.guards.runner import GuardRunner
from proxy.settings import GuardSettings
from tests.guards.model_fixtures import TinyModels


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
