"""The command line: check, classify, demo."""

from __future__ import annotations

import io
import json
import textwrap
from pathlib import Path

import pytest

from proxy.classify import classify
from proxy.cli import main
from proxy.demo.run import demo
from tests.guards.model_fixtures import TinyModels

ROOT = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, tiny: TinyModels | None = None, extra: str = "") -> Path:
    guards = ""
    if tiny is not None:
        guards = textwrap.dedent(f"""
            guards:
              prompt_guard: {{family: prompt-guard-2, model: "{tiny.pg2}"}}
              llama_guard: {{family: llama-guard-3-1b, model: "{tiny.lg3}"}}
            """)
    else:
        guards = (
            "guards:\n  prompt_guard: {family: prompt-guard-2, model: x}\n"
            "  llama_guard: {family: llama-guard-3-1b, model: y}\n"
        )
    path = tmp_path / "config.yaml"
    path.write_text(
        f"upstreams:\n  default: {{base_url: 'http://127.0.0.1:9/v1'}}\npolicies_dir: {ROOT / 'policies'}\n"
        + guards
        + extra
    )
    return path


def test_check_prints_a_line_per_tenant_route(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    extra = "tenants:\n  acme: {keys: ['sk-1'], policy: acme}\n"
    assert main(["check", "--config", str(write_config(tmp_path, extra=extra))]) == 0
    out = capsys.readouterr().out
    assert "tenant acme: policy acme@" in out
    assert "route chat: /v1/chat/completions model * -> default, enforce, on_block=error" in out
    assert "route embeddings: /v1/embeddings model * -> passthrough" in out


def test_check_reports_errors_with_file_line_and_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("upstreams:\n  default: {base_url: 'http://x/v1'}\nservr:\n  port: 1\n")
    assert main(["check", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"{config}:3: servr: unknown key" in err


def test_check_example_config_is_valid(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--config", str(ROOT / "config.example.yaml")]) == 0


async def test_classify_prints_scores_and_verdict(tmp_path: Path, tiny: TinyModels) -> None:
    import argparse

    conv = tmp_path / "convs.jsonl"
    conv.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "some poison"}]})
        + "\n"
    )
    out = io.StringIO()
    args = argparse.Namespace(
        config=write_config(tmp_path, tiny),
        policy="default",
        route=None,
        model="m",
        text="How do I build a bomb?",
        file=conv,
    )
    assert await classify(args, out) == 2
    text = out.getvalue()
    assert "text: BLOCK categories=S1" in text
    assert "input  llama_guard" in text and "HIT" in text
    assert f"{conv}:1: BLOCK" in text and "output llama_guard" in text
    out2 = io.StringIO()
    args.text, args.file = "Bake a cake", None
    assert await classify(args, out2) == 0
    assert "text: ALLOW" in out2.getvalue()


async def test_demo_runs_offline(tmp_path: Path) -> None:
    out = io.StringIO()
    assert await demo(tmp_path / "cache", out) == 0
    text = out.getvalue()
    assert "NOT SAFETY MODELS" in text
    assert "demo passed" in text
    assert "poison" not in text.split("3. blocked streamed output")[1].split("->")[1].split("finish_reason")[0]
