"""The command line: check, classify, demo, and the open-mode refusal of check and serve."""

from __future__ import annotations

import io
import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from proxy.app import check_open_mode
from proxy.classify import classify
from proxy.cli import main
from proxy.demo.run import demo
from proxy.settings import Settings
from proxy.yaml_source import ConfigError
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
    assert (
        "route chat: /v1/chat/completions,/v1/responses,/v1/completions,/v1/moderations model * -> default, enforce, "
        "on_block=error" in out
    )
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


@pytest.mark.parametrize(
    ("host", "extra", "allowed"),
    [
        ("127.0.0.1", {}, True),
        ("127.3.4.5", {}, True),
        ("::1", {}, True),
        ("[::1]", {}, True),
        ("localhost", {}, True),
        ("0.0.0.0", {}, False),
        ("::", {}, False),
        ("", {}, False),
        ("10.1.2.3", {}, False),
        ("proxy.internal", {}, False),
        ("0.0.0.0", {"server": {"allow_open_mode": True}}, True),
        ("0.0.0.0", {"tenants": {"acme": {"keys": ["sk-1"], "policy": "default"}}}, True),
    ],
)
def test_open_mode_only_on_loopback(host: str, extra: dict[str, Any], allowed: bool) -> None:
    settings = Settings.model_validate({"upstreams": {"default": {"base_url": "http://127.0.0.1:9/v1"}}, **extra})
    if allowed:
        check_open_mode(settings, host)
    else:
        with pytest.raises(ConfigError, match="refusing open mode"):
            check_open_mode(settings, host)


def test_check_and_serve_refuse_open_mode_on_a_public_bind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    public = write_config(tmp_path, extra="server:\n  host: 0.0.0.0\n").read_text()
    config = tmp_path / "public.yaml"
    config.write_text(public)
    assert main(["check", "--config", str(config)]) == 1
    assert main(["serve", "--config", str(write_config(tmp_path)), "--host", "0.0.0.0", "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert err.count("error: refusing open mode on '0.0.0.0'") == 2
    assert "Traceback" not in err
    config.write_text(public + "  allow_open_mode: true\n")
    assert main(["check", "--config", str(config)]) == 0


def test_docker_config_needs_a_tenant_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image's default config serves 0.0.0.0 with one tenant whose key comes from the environment."""
    (tmp_path / "config.yaml").write_text((ROOT / "docker" / "config.yaml").read_text())
    (tmp_path / "policies").symlink_to(ROOT / "policies")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-upstream")
    monkeypatch.delenv("GUARDRAIL_API_KEY", raising=False)
    assert main(["check", "--config", str(tmp_path / "config.yaml")]) == 1
    assert "environment variable GUARDRAIL_API_KEY is not set" in capsys.readouterr().err
    monkeypatch.setenv("GUARDRAIL_API_KEY", "sk-proxy")
    assert main(["check", "--config", str(tmp_path / "config.yaml")]) == 0
    assert "tenant default: policy default@" in capsys.readouterr().out


def test_check_names_a_routes_stream_mode() -> None:
    from proxy.cli import describe_route
    from proxy.policy.models import RouteSettings

    incremental = RouteSettings.model_validate({"name": "chat", "stream": "incremental", "release_tokens": 32})
    assert "stream=incremental(release_tokens=32)" in describe_route(incremental)
    assert "stream=" not in describe_route(RouteSettings.model_validate({"name": "chat"}))
