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
