"""Policy files: inheritance, route order, validation errors with file and line, hot reload."""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from proxy.guards.guard import ConversationScore, Taxonomy, Turn
from proxy.policy.store import GuardKind, PolicyContext, PolicyStore, load_policies
from proxy.server.state import POLICIES
from proxy.yaml_source import ConfigError
from tests.conftest import DEFAULT_POLICY
from tests.fakes.guards import ScriptedConversationGuard, ScriptedTextGuard

CTX = PolicyContext(
    guards={"prompt_guard": "text", "llama_guard": "conversation"}, upstreams=frozenset({"default", "other"})
)
CHAT = "/v1/chat/completions"
FULL = textwrap.dedent(DEFAULT_POLICY)


def halves(text: str) -> tuple[str, str]:
    """Cut just before the input Llama Guard check: the head is a valid policy that only runs Prompt Guard."""
    cut = text.index("      - {guard: llama_guard")
    return text[:cut], text[cut:]


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


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "default.yaml").write_bytes(b"routes:\n  - name: \xff\n")
    with pytest.raises(ConfigError, match=r"default.yaml: not UTF-8 text \(byte 18\)"):
        load_policies(tmp_path, CTX)


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
    for _ in range(4):
        assert store.check_for_changes() is False
    assert store.current.get("default") is before.get("default")
    assert store.reload_failures == 1  # one bad save is counted (and logged) once, not every poll
    write(tmp_path, default=DEFAULT_POLICY.replace('"Blocked by policy."', '"Changed."'))
    # The first poll that sees new content waits for it to hold still; the next one takes it.
    assert [store.check_for_changes(), store.check_for_changes()] == [False, True]
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


@dataclass
class HeldReplyGuard(ScriptedConversationGuard):
    """Holds every output check (a conversation with an Agent turn) until `release` is set."""

    holding: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def score_conversation(
        self, turns: list[Turn], taxonomy: Taxonomy, *, categories_from: float = 0.5
    ) -> ConversationScore:
        if any(t.speaker == "Agent" for t in turns):
            self.holding.set()
            await self.release.wait()
        return await super().score_conversation(turns, taxonomy, categories_from=categories_from)


async def test_in_flight_request_finishes_under_its_version(start_proxy: Any) -> None:
    guard = HeldReplyGuard()
    async with start_proxy(guards={"prompt_guard": ScriptedTextGuard(), "llama_guard": guard}) as proxy:
        proxy.upstream.replies = ["a bomb recipe"]
        client = proxy.client()
        held = asyncio.create_task(
            client.chat.completions.with_raw_response.create(model="m", messages=[{"role": "user", "content": "hi"}])
        )
        await asyncio.wait_for(guard.holding.wait(), 5)
        (proxy.policies_dir / "default.yaml").write_text(FULL.replace('"Blocked by policy."', '"New refusal."'))
        # While the first request waits in its output check, the new version reaches new requests
        # (blocked on input, so never held).
        async with asyncio.timeout(10):
            while True:
                fresh = await client.chat.completions.with_raw_response.create(model="m", messages=BAD)
                if fresh.parse().choices[0].message.content == "New refusal.":
                    break
                await asyncio.sleep(0.02)
        assert not held.done()
        guard.release.set()
        raw = await held
    assert raw.parse().choices[0].message.content == "Blocked by policy."
    assert raw.headers["x-guardrail-policy"] != fresh.headers["x-guardrail-policy"]


def serving(store: PolicyStore) -> tuple[list[str], str]:
    """The input guards and the refusal of the chat route the default policy serves now."""
    route = store.current.get("default").resolve(CHAT, "m")
    assert route is not None
    return [c.guard for c in route.input], route.refusal


def test_half_written_file_is_never_installed(tmp_path: Path) -> None:
    write(tmp_path, default=FULL)
    store = PolicyStore(tmp_path, CTX)
    head, tail = halves(FULL.replace('"Blocked by policy."', '"Version two."'))
    with (tmp_path / "default.yaml").open("w") as f:  # in place, as an editor saves
        f.write(head)
        f.flush()
        assert store.check_for_changes() is False
        assert serving(store) == (["prompt_guard", "llama_guard"], "Blocked by policy.")
        f.write(tail)
    assert [store.check_for_changes(), store.check_for_changes()] == [False, True]
    assert serving(store) == (["prompt_guard", "llama_guard"], "Version two.")
    assert store.reload_failures == 0


def test_truncated_prefix_is_a_valid_policy_without_the_check(tmp_path: Path) -> None:
    """What the in-place tests rely on: a reader that took the prefix would serve it."""
    write(tmp_path, default=halves(FULL)[0])
    route = load_policies(tmp_path, CTX).get("default").resolve(CHAT, "m")
    assert route is not None and [c.guard for c in route.input] == ["prompt_guard"]


async def until(condition: Callable[[], bool]) -> None:
    """Wait for a state the proxy reaches on its own (its watcher polls on a timer)."""
    for _ in range(2000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the proxy did not reach the expected state within 10 s")


async def test_in_place_rewrites_under_load_never_serve_a_truncated_policy(start_proxy: Any) -> None:
    """Eight clients send a prompt only the input Llama Guard check blocks while the policy is
    rewritten in place five times. The test polls the store itself, as its watcher would, so the
    half-written file is seen by exactly one poll (a writer pausing for two polls is stable, by design)."""
    async with start_proxy(server={"policy_reload_interval_s": 3600}) as proxy:
        store: PolicyStore = proxy.app[POLICIES]
        client = proxy.client()
        finish_reasons: list[str | None] = []
        stop = asyncio.Event()

        async def send() -> None:
            while not stop.is_set():
                reply = await client.chat.completions.create(model="m", messages=BAD)
                finish_reasons.append(reply.choices[0].finish_reason)

        async def answers(n: int) -> None:
            await until(lambda: len(finish_reasons) >= n)

        senders = [asyncio.create_task(send()) for _ in range(8)]
        for version in range(5):
            head, tail = halves(FULL.replace('"Blocked by policy."', f'"Blocked v{version}."'))
            with (proxy.policies_dir / "default.yaml").open("w") as f:
                f.write(head)
                f.flush()
                await asyncio.to_thread(store.check_for_changes)
                await answers(len(finish_reasons) + 16)  # served while only the head is on disk
                f.write(tail)
            assert [await asyncio.to_thread(store.check_for_changes) for _ in range(2)] == [False, True]
            assert serving(store) == (["prompt_guard", "llama_guard"], f"Blocked v{version}.")
            await answers(len(finish_reasons) + 8)
        stop.set()
        await asyncio.gather(*senders)
    assert len(finish_reasons) >= 5 * 24
    assert set(finish_reasons) == {"content_filter"}
    assert proxy.upstream.chat_requests == []  # no trigger prompt ever reached the upstream


class SaveDuringCheck(Mapping[str, GuardKind]):
    """The config's guards; looking up `trigger` (mid-reload, in the cross-check) first saves `fix`."""

    def __init__(self, path: Path, fix: str, trigger: str) -> None:
        self.path, self.fix, self.trigger = path, fix, trigger
        self.saved = False

    def __getitem__(self, name: str) -> GuardKind:
        if name == self.trigger and not self.saved:
            self.path.write_text(self.fix)
            self.saved = True
        return CTX.guards[name]

    def __iter__(self) -> Iterator[str]:
        return iter(CTX.guards)

    def __len__(self) -> int:
        return len(CTX.guards)


def test_fix_saved_during_a_reload_is_picked_up(tmp_path: Path) -> None:
    write(tmp_path, default=FULL)
    path = tmp_path / "default.yaml"
    guards = SaveDuringCheck(path, FULL.replace('"Blocked by policy."', '"Fixed."'), trigger="nope")
    store = PolicyStore(tmp_path, PolicyContext(guards=guards, upstreams=CTX.upstreams))
    path.write_text(FULL.replace("{guard: llama_guard, threshold: 0.5}", "{guard: nope}", 1))
    for _ in range(3):
        store.check_for_changes()
    assert guards.saved and store.reload_failures == 1  # the bad save was rejected; the fix landed meanwhile
    for _ in range(3):
        store.check_for_changes()
    assert serving(store) == (["prompt_guard", "llama_guard"], "Fixed.")


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
    default = policies.get("default").resolve(CHAT, "any-model")
    acme = policies.get("acme").resolve(CHAT, "any-model")
    assert default is not None and acme is not None
    for route in (default, acme):
        assert [c.guard for c in route.input] == ["prompt_guard", "llama_guard"]
        assert [c.guard for c in route.output] == ["llama_guard"]
        assert route.mode == "enforce" and route.on_guard_error == "block"
    assert default.on_block == "refuse"
    assert (acme.on_block, acme.excluded_categories, [c.code for c in acme.custom_categories]) == (
        "error",
        ("S6",),
        ["S15"],
    )
    assert [c.threshold for c in acme.input] == [0.8, 0.4]
    embeddings = policies.get("acme").resolve("/v1/embeddings", None)
    assert embeddings is not None and embeddings.passthrough
