"""`stream: incremental` as a client reads it, byte by byte: an upstream event reaches the client only
after a check passed on reply text that includes it, byte-identical and whole; a block mid-stream ends
the choice with the refusal and `content_filter`; failures are one final error event.

The fake upstream sends each window only after the client has the one before (its gate opens once
per step), so windows fall where a test puts them. `release_tokens: 4` = 16 characters per window;
the scripted Llama Guard blocks "bomb".
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.guards.guard import ConversationScore, Taxonomy, Turn
from proxy.policy.models import RouteSettings
from proxy.server.state import METRICS
from proxy.streaming.incremental import ends_sentence
from tests.conftest import DEFAULT_POLICY
from tests.fakes.guards import FailingGuard, ScriptedConversationGuard, ScriptedTextGuard
from tests.streaming.replies import DONE, GOOD, chunk, delta, sse

REFUSAL = "Blocked by policy."


def policy(**keys: object) -> str:
    lines = "".join(
        f"\n  {key}: {value}" for key, value in {"stream": "incremental", "release_tokens": 4, **keys}.items()
    )
    return DEFAULT_POLICY.replace(f'refusal: "{REFUSAL}"', f'refusal: "{REFUSAL}"{lines}')


class Steps(asyncio.Event):
    """The fake upstream's gate, opened once per `step()`: each None in its raw chunks waits for its own."""

    def __init__(self) -> None:
        super().__init__()
        self._steps: asyncio.Queue[None] = asyncio.Queue()

    async def wait(self) -> Literal[True]:
        await self._steps.get()
        return True

    def step(self) -> None:
        self._steps.put_nowait(None)


def text(content: str, index: int = 0) -> bytes:
    return chunk(delta(index, content=content))


ROLE = chunk(delta(role="assistant", content=""))
STOP = chunk(delta(finish_reason="stop"))
# Five windows of two 8-character events each: a check starts exactly at each window's second event.
WINDOWS = [(text(f"w{k} part "), text(f"w{k} more ")) for k in range(1, 6)]
WINDOWS[2] = (text("w3 part "), text("a bomb. "))


@dataclass
class Reading:
    """A streamed answer, read event by event as it arrives."""

    response: aiohttp.ClientResponse
    body: bytearray = field(default_factory=bytearray)

    async def until(self, event: bytes) -> None:
        while not self.body.endswith(event):
            piece = await self.response.content.readuntil(b"\n\n")
            assert piece, f"the stream ended before {event!r}"
            self.body += piece

    async def next_event(self) -> bytes:
        piece = await self.response.content.readuntil(b"\n\n")
        self.body += piece
        return piece

    async def rest(self) -> bytes:
        self.body += await self.response.content.read()
        return bytes(self.body)


@asynccontextmanager
async def streaming(url: str, **extra: Any) -> AsyncIterator[Reading]:
    body = {"model": "m", "messages": GOOD, "stream": True, **extra}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http,
        http.post(url + "/v1/chat/completions", json=body) as resp,
    ):
        assert resp.status == 200
        yield Reading(resp)


def events(body: bytes) -> list[bytes]:
    """The data events of an SSE body, each with its blank line (comments left out)."""
    return [e + b"\n\n" for e in body.split(b"\n\n") if e.startswith(b"data:")]


def deltas(body: bytes) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = {}
    for event in events(body):
        if event != DONE:
            for c in json.loads(event[6:]).get("choices") or []:
                out.setdefault(c["index"], []).append({**c["delta"], "finish_reason": c.get("finish_reason")})
    return out


def content(body: bytes, index: int = 0) -> str:
    return "".join(d.get("content") or "" for d in deltas(body).get(index, []))


def finishes(body: bytes) -> dict[int, str]:
    return {i: d["finish_reason"] for i, ds in deltas(body).items() for d in ds if d["finish_reason"]}


def sample(proxy: Any, name: str, labels: dict[str, str]) -> float:
    value = proxy.app[METRICS].registry.get_sample_value(name, labels)
    return 0.0 if value is None else float(value)


def request_log(out: str) -> dict[str, Any]:
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return next(line for line in lines if line.get("event") == "request")


async def test_a_trigger_in_window_3_of_5(start_proxy: Any, capsys: pytest.CaptureFixture[str]) -> None:
    async with start_proxy(policies={"default": policy()}) as proxy:
        proxy.upstream.mode, proxy.upstream.gate = "raw", Steps()
        proxy.upstream.raw_chunks = [ROLE]
        for first, second in WINDOWS:
            proxy.upstream.raw_chunks += [first, second, None]
        proxy.upstream.raw_chunks[-1:] = [STOP, DONE]
        async with streaming(proxy.url) as reading:
            headers = reading.response.headers
            for _, second in WINDOWS[:2]:
                await reading.until(second)
                proxy.upstream.gate.step()
            body = await reading.rest()
        await proxy.upstream.disconnected.wait()  # the block ended the upstream's generation
        released = sample(proxy, "guardrail_stream_holdback_tokens_count", {"route": "chat"})
    got = events(body)
    assert got[:5] == [ROLE, *WINDOWS[0], *WINDOWS[1]]  # windows 1 and 2, byte-identical
    assert b"w3 part" not in body and b"bomb" not in body
    assert deltas(body)[0][5:] == [
        {"content": REFUSAL, "finish_reason": None},
        {"finish_reason": "content_filter"},
    ]
    assert got[-1] == DONE and len(got) == 8
    assert headers["x-guardrail-stream"] == "incremental; release_tokens=4"
    assert headers["x-guardrail-decision"] == "deferred"
    assert b": x-guardrail-decision=block\n\n" in body
    assert released == 2
    log = request_log(capsys.readouterr().out)
    windows = [(c["window"], c["score"]) for c in log["checks"] if c["side"] == "output"]
    assert windows == [(1, 0.02), (2, 0.02), (3, 0.97)]
    assert "w1 part" not in json.dumps(log)


async def test_a_trigger_split_across_a_window_boundary(start_proxy: Any) -> None:
    first, straddling, after = text("safe words a"), text("n bo"), text("mb and more text")
    async with start_proxy(policies={"default": policy()}) as proxy:
        proxy.upstream.mode, proxy.upstream.gate = "raw", Steps()
        # The second window's event starts in the same upstream read as the first window's end.
        proxy.upstream.raw_chunks = [ROLE, first, straddling + after[:9], None, after[9:], STOP, DONE]
        async with streaming(proxy.url) as reading:
            await reading.until(straddling)
            proxy.upstream.gate.step()
            body = await reading.rest()
    assert events(body)[:3] == [ROLE, first, straddling]
    assert b"mb and more" not in body
    assert content(body) == "safe words an bo" + REFUSAL
    assert finishes(body) == {0: "content_filter"}
    assert events(body)[-1] == DONE


async def test_a_trigger_in_tool_call_arguments(start_proxy: Any) -> None:
    def call(**function: str) -> bytes:
        return chunk(delta(tool_calls=[{"index": 0, "function": function}]))

    named = chunk(delta(tool_calls=[{"index": 0, "id": "c1", "type": "function", "function": {"name": "run"}}]))
    safe, bad = call(arguments='{"q": "make a '), call(arguments='bomb"}')
    async with start_proxy(policies={"default": policy()}) as proxy:
        proxy.upstream.mode, proxy.upstream.gate = "raw", Steps()
        proxy.upstream.raw_chunks = [ROLE, named, safe, None, bad, chunk(delta(finish_reason="tool_calls")), DONE]
        async with streaming(proxy.url) as reading:
            await reading.until(safe)
            proxy.upstream.gate.step()
            body = await reading.rest()
    assert events(body)[:3] == [ROLE, named, safe]  # "run(" and the safe arguments: one window
    assert b"bomb" not in body
    assert finishes(body) == {0: "content_filter"}
    assert content(body) == REFUSAL


async def test_n2_one_choice_blocked_the_other_completes(start_proxy: Any) -> None:
    one = [text("v1 part ", 1), text("v1 more ", 1), text("v1 last ", 1)]
    raw = [
        chunk(delta(0, role="assistant", content="")),
        chunk(delta(1, role="assistant", content="")),
        text("w0 part "),
        one[0],
        text("w0 more "),
        one[1],
        text("a bomb. "),
        one[2],
        text("w0 tail "),
        chunk(delta(0, finish_reason="stop")),
        chunk(delta(1, finish_reason="stop")),
        DONE,
    ]
    async with start_proxy(policies={"default": policy()}) as proxy:
        proxy.upstream.mode, proxy.upstream.raw_chunks = "raw", raw
        async with streaming(proxy.url, n=2) as reading:
            body = await reading.rest()
    assert b"bomb" not in body and b"w0 tail" not in body
    assert content(body, 1) == "v1 part v1 more v1 last "
    assert all(event in events(body) for event in one)  # the other choice's events, byte-identical
    assert content(body, 0).endswith(REFUSAL)
    assert finishes(body) == {0: "content_filter", 1: "stop"}
    assert events(body)[-1] == DONE


@pytest.mark.parametrize(
    ("death", "code"),
    [
        (b"", "upstream_error"),  # the stream ends without [DONE]
        (sse({"error": {"message": "bomb", "type": "server_error", "code": "overloaded"}}), "overloaded"),
    ],
)
async def test_upstream_dies_mid_window(start_proxy: Any, death: bytes, code: str) -> None:
    async with start_proxy(policies={"default": policy()}) as proxy:
        proxy.upstream.mode, proxy.upstream.gate = "raw", Steps()
        proxy.upstream.raw_chunks = [ROLE, *WINDOWS[0], None, WINDOWS[1][0], death]
        async with streaming(proxy.url) as reading:
            await reading.until(WINDOWS[0][1])
            proxy.upstream.gate.step()
            body = await reading.rest()
    got = events(body)
    assert got[:3] == [ROLE, *WINDOWS[0]]
    assert b"w2 part" not in body and b"bomb" not in body  # nothing unchecked
    assert json.loads(got[3][6:])["error"]["code"] == code
    assert got[4:] == [DONE]


@dataclass
class StallsOn:
    """Passes every check until the reply holds `word`; that check waits until it is cancelled."""

    word: str
    name: str = "llama_guard"
    started: asyncio.Event = field(default_factory=asyncio.Event)
    dropped: asyncio.Event = field(default_factory=asyncio.Event)

    async def score_conversation(
        self, turns: list[Turn], taxonomy: Taxonomy, *, categories_from: float = 0.5
    ) -> ConversationScore:
        if any(t.speaker == "Agent" and self.word in t.text for t in turns):
            self.started.set()
            try:
                await asyncio.Event().wait()
            finally:
                self.dropped.set()
        return ConversationScore(0.02, 0.02, 1.0)


async def test_client_disconnect_cancels_the_upstream_and_the_pending_check(start_proxy: Any) -> None:
    guard = StallsOn("w2")
    guards = {"prompt_guard": ScriptedTextGuard(), "llama_guard": guard}
    # An hour's guard timeout: only the cancellation can end the stalled check.
    async with start_proxy(policies={"default": policy(guard_timeout_s=3600)}, guards=guards) as proxy:
        proxy.upstream.mode, proxy.upstream.gate = "raw", Steps()
        proxy.upstream.raw_chunks = [ROLE, *WINDOWS[0], None, *WINDOWS[1], None, STOP, DONE]
        async with streaming(proxy.url) as reading:
            await reading.until(WINDOWS[0][1])
            proxy.upstream.gate.step()
            await guard.started.wait()
            reading.response.close()
        await guard.dropped.wait()
        await proxy.upstream.disconnected.wait()
    assert b"w2" not in reading.body


async def test_the_sdk_reads_a_passed_and_a_blocked_stream(start_proxy: Any) -> None:
    async with start_proxy(policies={"default": policy()}) as proxy:
        proxy.upstream.replies = ["one two three four five six seven eight nine ten", "a bomb is in this one"]
        raw = await proxy.client().chat.completions.with_raw_response.create(
            model="m", messages=GOOD, stream=True, n=2, stream_options={"include_usage": True}
        )
        stream = raw.parse()
        chunks = [c async for c in stream]
    texts: dict[int, str] = {}
    reasons: dict[int, str | None] = {}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            reasons[choice.index] = choice.finish_reason or reasons.get(choice.index)
    assert texts[0] == "one two three four five six seven eight nine ten "
    assert texts[1].endswith(REFUSAL) and "bomb" not in texts[1]
    assert reasons == {0: "stop", 1: "content_filter"}
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 15
    assert raw.headers["x-guardrail-stream"] == "incremental; release_tokens=4"


async def test_on_block_error_mid_stream_is_a_final_policy_event(start_proxy: Any) -> None:
    async with start_proxy(policies={"default": policy(on_block="error")}) as proxy:
        proxy.upstream.mode, proxy.upstream.gate = "raw", Steps()
        proxy.upstream.raw_chunks = [ROLE, *WINDOWS[0], None, *WINDOWS[2], STOP, DONE]
        async with streaming(proxy.url) as reading:
            await reading.until(WINDOWS[0][1])
            proxy.upstream.gate.step()
            body = await reading.rest()
    got = events(body)
    assert got[:3] == [ROLE, *WINDOWS[0]]
    error = json.loads(got[3][6:])["error"]
    assert (error["code"], error["categories"]) == ("content_policy_violation", ["S9"])
    assert got[4:] == [DONE] and b"bomb" not in body


@pytest.mark.parametrize("on_guard_error", ["block", "allow"])
async def test_guard_error_mid_stream(start_proxy: Any, on_guard_error: str) -> None:
    guards = {"prompt_guard": ScriptedTextGuard(), "llama_guard": FailingGuard()}
    # The input check has no guard that fails: only the output check does.
    routes = policy(on_guard_error=on_guard_error).replace(
        "      - {guard: llama_guard, threshold: 0.5}\n    output", "    output"
    )
    async with start_proxy(policies={"default": routes}, guards=guards) as proxy:
        proxy.upstream.mode, proxy.upstream.gate = "raw", Steps()
        proxy.upstream.raw_chunks = [ROLE, None, *WINDOWS[0], STOP, DONE]
        async with streaming(proxy.url) as reading:
            await reading.until(ROLE)  # the headers are out: a failure now is an event
            proxy.upstream.gate.step()
            body = await reading.rest()
        fail_open = sample(
            proxy, "guardrail_fail_open_total", {"tenant": "default", "route": "chat", "guard": "llama_guard"}
        )
    got = events(body)
    if on_guard_error == "block":
        assert got[0] == ROLE and json.loads(got[1][6:])["error"]["code"] == "guard_unavailable"
        assert got[2:] == [DONE] and b"w1" not in body
    else:
        assert got == [ROLE, *WINDOWS[0], STOP, DONE]
        assert fail_open == 1


async def test_release_on_sentence_checks_at_a_sentence_end(start_proxy: Any) -> None:
    sentence = text("Hi there. ")
    async with start_proxy(policies={"default": policy(release_tokens=1000, release_on="sentence")}) as proxy:
        proxy.upstream.mode, proxy.upstream.gate = "raw", Steps()
        proxy.upstream.raw_chunks = [ROLE, sentence, None, text("More"), STOP, DONE]
        async with streaming(proxy.url) as reading:
            await reading.until(sentence)  # released before the stream ends: a check ran at the "."
            assert reading.response.headers["x-guardrail-stream"] == (
                "incremental; release_tokens=1000; release_on=sentence"
            )
            proxy.upstream.gate.step()
            body = await reading.rest()
    assert events(body) == [ROLE, sentence, text("More"), STOP, DONE]


async def test_caps_apply_to_an_incremental_stream(start_proxy: Any) -> None:
    async with start_proxy(policies={"default": policy()}, server={"max_held_bytes": 4096}) as proxy:
        proxy.upstream.mode, proxy.upstream.gate = "raw", Steps()
        proxy.upstream.raw_chunks = [ROLE, None] + [text("x" * 1000) for _ in range(8)] + [DONE]
        async with streaming(proxy.url) as reading:
            await reading.until(ROLE)
            proxy.upstream.gate.step()
            body = await reading.rest()
    got = events(body)
    assert b"max_held_bytes" in got[-2] and got[-1] == DONE


def test_route_keys() -> None:
    route = RouteSettings(name="r")
    assert (route.stream, route.release_tokens, route.release_on) == ("buffer", 48, None)
    for bad in ({"release_tokens": 0}, {"release_on": "word"}, {"stream": "chunks"}):
        with pytest.raises(ValueError, match=r"release_tokens|release_on|stream"):
            RouteSettings(name="r", **bad)


@pytest.mark.parametrize(
    ("piece", "ends"),
    [("Done.", True), ("done?) ", True), ("3.", True), ("line\n", True), ("word ", False), ("", False)],
)
def test_ends_sentence(piece: str, ends: bool) -> None:
    assert ends_sentence(piece) is ends


# Property: whatever the upstream's byte chunking, window size and trigger, at every moment the client
# holds a prefix of the upstream's events, and every event it holds lies inside a check that passed.


@dataclass
class PassRecorder(ScriptedConversationGuard):
    """The scripted guard, a few loop turns slow, remembering each reply text it passed."""

    passed: list[str] = field(default_factory=list)

    async def score_conversation(
        self, turns: list[Turn], taxonomy: Taxonomy, *, categories_from: float = 0.5
    ) -> ConversationScore:
        for _ in range(3):
            await asyncio.sleep(0)  # a check takes time: a relay that releases early shows it
        score = await super().score_conversation(turns, taxonomy, categories_from=categories_from)
        if turns[-1].speaker == "Agent" and score.score < 0.5:
            self.passed.append(turns[-1].text.strip())
        return score


@st.composite
def replies(draw: st.DrawFn) -> tuple[list[str], bool]:
    pieces = [f"w{k}" + draw(st.sampled_from([" ", ". ", ", "])) for k in range(draw(st.integers(1, 24)))]
    trigger = draw(st.sampled_from(["", "bomb ", "split"]))
    if trigger:
        at = draw(st.integers(0, len(pieces)))
        pieces[at:at] = ["bo", "mb "] if trigger == "split" else [trigger]
    return pieces, bool(trigger)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reply=replies(), tokens=st.integers(1, 6), sentence=st.booleans(), cuts=st.lists(st.integers(0, 4000)))
async def test_no_unchecked_byte_reaches_the_client(
    start_proxy: Any, reply: tuple[list[str], bool], tokens: int, sentence: bool, cuts: list[int]
) -> None:
    pieces, has_trigger = reply
    upstream_events = [ROLE, *(text(p) for p in pieces), STOP, DONE]
    raw = b"".join(upstream_events)
    bounds = sorted({0, len(raw), *(c for c in cuts if c < len(raw))})
    guard = PassRecorder()
    keys: dict[str, object] = {"release_tokens": tokens, **({"release_on": "sentence"} if sentence else {})}
    async with start_proxy(
        policies={"default": policy(**keys)}, guards={"prompt_guard": ScriptedTextGuard(), "llama_guard": guard}
    ) as proxy:
        proxy.upstream.mode = "raw"
        proxy.upstream.raw_chunks = [raw[a:b] for a, b in itertools.pairwise(bounds)]
        async with streaming(proxy.url) as reading:
            shown = ""
            while (event := await reading.next_event()) not in (b"", DONE):
                if event.startswith(b":"):
                    continue
                piece = "".join(c["delta"].get("content") or "" for c in json.loads(event[6:])["choices"])
                shown += piece
                if piece and piece != REFUSAL:
                    # At the moment it arrived, a check that had already passed covered it.
                    assert any(p.startswith(shown.strip()) for p in guard.passed), (shown, guard.passed)
            body = await reading.rest()
    got = events(body)
    assert got[-1] == DONE
    if has_trigger:
        assert "bomb" not in content(body)
        assert got[:-3] == upstream_events[: len(got) - 3]  # a prefix of the upstream's events
        assert finishes(body) == {0: "content_filter"} and content(body).endswith(REFUSAL)
    else:
        assert got == upstream_events  # everything, byte-identical
