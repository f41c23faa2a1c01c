"""Policy files: inheritance, route order, validation errors with file and line, hot reload."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path
from typing import Any

import openai
import pytest

from proxy.policy.store import PolicyContext, PolicyStore, load_policies
from proxy.yaml_source import ConfigError
from tests.conftest import DEFAULT_POLICY

CTX = PolicyContext(
    guards={"prompt_guard": "text", "llama_guard": "conversation"}, upstreams=frozenset({"default", "other"})
)


def write(directory: Path, **files: str) -> None:
    for name, text in files.items():
        (directory / f"{name}.yaml").write_text(textwrap.dedent(text))


def test_extends_overrides_only_what_it_names(tmp_path: Path) -> None:
    write(
        tmp_path,
        default=DEFAULT_POLICY,
        child="""
        extends: default
        route_defaults: {on_block: error}
        routes:
          - name: chat
            excluded_categories: [S6]
          - name: special
            match: {model: "special-*"}
            upstream: other
        """,
    )
    child = load_policies(tmp_path, CTX).get("child")
    chat = child.resolve("/v1/chat/completions", "gpt-4o")
    assert chat is not None and chat.name == "chat"
    assert chat.excluded_categories == ("S6",)
    assert chat.on_block == "error"
    assert chat.refusal == "Blocked by policy."  # inherited from the parent's route_defaults
    assert [c.guard for c in chat.input] == ["prompt_guard", "llama_guard"]  # inherited
    special = child.resolve("/v1/chat/completions", "special-1")
    assert special is not None and special.name == "special" and special.upstream == "other"
    parent_chat = load_policies(tmp_path, CTX).get("default").resolve("/v1/chat/completions", "x")
    assert parent_chat is not None and parent_chat.on_block == "refuse"


def test_routes_match_in_order(tmp_path: Path) -> None:
    write(
        tmp_path,
        default="""
        routes:
          - {name: a, match: {model: "gpt-4*"}, mode: monitor}
          - {name: b, match: {model: "gpt-*"}}
          - {name: c, match: {path: "/v1/embeddings"}, passthrough: true}
        """,
    )
    policy = load_policies(tmp_path, CTX).get("default")
    assert [policy.resolve("/v1/chat/completions", m).name for m in ("gpt-4o", "gpt-3.5")] == ["a", "b"]  # type: ignore[union-attr]
    assert policy.resolve("/v1/chat/completions", "llama") is None
    assert policy.resolve("/v1/embeddings", None).name == "c"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("routes:\n  - name: chat\n    thresold: 0.5\n", "default.yaml:3: routes[0].thresold: unknown key"),
        (
            "routes:\n  - name: chat\n    input:\n      - guard: llama_guard\n        threshold: 1.5\n",
            "default.yaml:5: routes[0].input[0].threshold: Input should be less than or equal to 1",
        ),
        (
            "routes:\n  - name: chat\n    mode: loud\n",
            "default.yaml:3: routes[0].mode: Input should be 'enforce' or 'monitor'",
        ),
        (
            "routes:\n  - name: chat\n    input:\n      - guard: nope\n",
            "default.yaml:4: routes.chat.input[0].guard: no guard named 'nope'",
        ),
        ("extends: ghost\nroutes: []\n", "default.yaml:1: extends: no policy named 'ghost'"),
        (
            "routes:\n  - name: chat\n    upstream: nowhere\n",
            "default.yaml:3: routes.chat.upstream: no upstream named 'nowhere'",
        ),
        ("routes: [\n", "default.yaml:2: invalid YAML"),
        ("routes:\n  - name: chat\n    excluded_categories: [six]\n", "'six' is not a category code"),
        (
            "route_defaults:\n  colour: red\nroutes:\n  - name: chat\n",
            "default.yaml:2: route_defaults.colour: unknown key",
        ),
        ("routes:\n  - name: c\n    output:\n      - guard: prompt_guard\n", "Prompt Guard screens untrusted input"),
    ],
)
def test_validation_errors_name_file_line_and_key(tmp_path: Path, text: str, expected: str) -> None:
    (tmp_path / "default.yaml").write_text(text)
    with pytest.raises(ConfigError) as info:
        load_policies(tmp_path, CTX)
    assert any(expected in problem for problem in info.value.problems), info.value.problems


def test_cycle_is_reported(tmp_path: Path) -> None:
    write(tmp_path, default=DEFAULT_POLICY, a="extends: b\n", b="extends: a\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_policies(tmp_path, CTX)


def test_version_changes_with_content(tmp_path: Path) -> None:
    write(tmp_path, default=DEFAULT_POLICY)
    first = load_policies(tmp_path, CTX).get("default").version
    write(tmp_path, default=DEFAULT_POLICY.replace("0.9", "0.8"))
    assert load_policies(tmp_path, CTX).get("default").version != first


def test_reload_rejects_bad_file_and_keeps_serving(tmp_path: Path) -> None:
    write(tmp_path, default=DEFAULT_POLICY)
    store = PolicyStore(tmp_path, CTX)
    before = store.current
    (tmp_path / "default.yaml").write_text("routes:\n  - name: chat\n    bogus: 1\n")
    assert store.check_for_changes() is False
    assert store.current.get("default") is before.get("default")
    assert store.reload_failures == 1
    write(tmp_path, default=DEFAULT_POLICY.replace('"Blocked by policy."', '"Changed."'))
    assert store.check_for_changes() is True
    assert store.current.get("default").resolve("/v1/chat/completions", "m").refusal == "Changed."  # type: ignore[union-attr]


BAD = [{"role": "user", "content": "build a bomb"}]


async def test_hot_reload_through_the_proxy(start_proxy: Any) -> None:
    async with start_proxy() as proxy:
        client = proxy.client()
        first = await client.chat.completions.with_raw_response.create(model="m", messages=BAD)
        assert first.parse().choices[0].message.content == "Blocked by policy."
        (proxy.policies_dir / "default.yaml").write_text(
            textwrap.dedent(DEFAULT_POLICY).replace('"Blocked by policy."', '"New refusal."')
        )
        for _ in range(200):
            raw = await client.chat.completions.with_raw_response.create(model="m", messages=BAD)
            if raw.parse().choices[0].message.content == "New refusal.":
                break
            await asyncio.sleep(0.02)
        assert raw.parse().choices[0].message.content == "New refusal."
        assert raw.headers["x-guardrail-policy"] != first.headers["x-guardrail-policy"]
        # A bad save is rejected; the last good version keeps serving.
        (proxy.policies_dir / "default.yaml").write_text("routes: [{name: chat, nonsense: true}]\n")
        await asyncio.sleep(0.3)
        again = await client.chat.completions.with_raw_response.create(model="m", messages=BAD)
        assert again.parse().choices[0].message.content == "New refusal."
        assert again.headers["x-guardrail-policy"] == raw.headers["x-guardrail-policy"]


async def test_in_flight_request_finishes_under_its_version(start_proxy: Any) -> None:
    async with start_proxy(server={"keepalive_interval_s": 5}) as proxy:
        proxy.upstream.mode, proxy.upstream.delay_s = "slow", 0.5
        proxy.upstream.replies = ["a bomb recipe"]
        client = proxy.client()
        task = asyncio.create_task(
            client.chat.completions.with_raw_response.create(model="m", messages=[{"role": "user", "content": "hi"}])
        )
        await asyncio.wait_for(proxy.upstream.got_chat.wait(), 5)
        (proxy.policies_dir / "default.yaml").write_text(
            textwrap.dedent(DEFAULT_POLICY).replace('"Blocked by policy."', '"New refusal."')
        )
        await asyncio.sleep(0.2)
        raw = await task
    assert raw.parse().choices[0].message.content == "Blocked by policy."


async def test_excluded_category_lets_reply_through(start_proxy: Any) -> None:
    policy = DEFAULT_POLICY.replace(
        'refusal: "Blocked by policy."', 'refusal: "Blocked by policy."\n  excluded_categories: [S6]'
    )
    async with start_proxy(policies={"default": policy}) as proxy:
        proxy.upstream.replies = ["buy these stocks now"]
        allowed = await proxy.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert allowed.choices[0].message.content == "buy these stocks now"
        proxy.upstream.replies = ["stocks and a bomb"]
        blocked = await proxy.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert blocked.choices[0].finish_reason == "content_filter"
    taxonomy = proxy.guards["llama_guard"].calls[-1][1]
    assert taxonomy.excluded == frozenset({"S6"})


def test_example_policies_are_valid() -> None:
    root = Path(__file__).resolve().parents[2]
    policies = load_policies(root / "policies", CTX)
    assert {"default", "acme"} <= set(policies.policies)
    assert openai  # the SDK import is the user's; keep the symbol used
