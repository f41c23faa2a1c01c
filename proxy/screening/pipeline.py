"""Running a route's checks and turning scores into a verdict.

Input checks run concurrently; output checks run per choice, concurrently. A check hits when its
score is at or over its threshold. In `enforce` mode a hit blocks; in `monitor` mode it flags. A
guard error either blocks (503, `on_guard_error: block`) or lets the check pass and is recorded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import structlog

from proxy import telemetry
from proxy.guards.guard import ConversationGuard, Guard, GuardError, GuardLimitExceeded, ScreenText, TextGuard, Turn
from proxy.policy.models import DEFAULT_TEXT_ROLES, CheckSettings, RouteSettings
from proxy.protocol import ChatRequest
from proxy.screening.collect import Reply, count_limits, input_conversations, output_conversation, screen_texts

log = structlog.get_logger("proxy.screening")

Side = Literal["input", "output"]
OFF_LOOP_CHARS = 256 * 1024  # texts larger than this are collected for the guards off the event loop
Decision = Literal["allow", "block", "flag"]


@dataclass
class CheckResult:
    guard: str
    side: Side
    threshold: float
    enforced: bool
    score: float | None = None
    categories: tuple[str, ...] = ()
    latency_ms: float = 0.0
    error: str | None = None
    skipped: bool = False
    choice: int | None = None
    windows: int | None = None
    over_limit: bool = False
    """The error is the guard's `max_tokens`: the text is too long to screen, retrying won't help."""
    dropped: bool = False
    """Cancelled because another check had already decided the request."""

    @property
    def hit(self) -> bool:
        return self.score is not None and self.score >= self.threshold

    def record(self) -> dict[str, object]:
        out: dict[str, object] = {"guard": self.guard, "side": self.side, "latency_ms": round(self.latency_ms, 2)}
        if self.score is not None:
            out["score"] = round(self.score, 6)
        if self.categories:
            out["categories"] = list(self.categories)
        if self.error:
            out["error"] = self.error
        if self.over_limit:
            out["over_limit"] = True
        if self.skipped:
            out["skipped"] = True
        if self.dropped:
            out["dropped"] = True
        if self.choice is not None:
            out["choice"] = self.choice
        if self.windows is not None:
            out["windows"] = self.windows
        return out


@dataclass
class Verdict:
    results: list[CheckResult] = field(default_factory=list)
    fail_closed: bool = True

    @property
    def blocked(self) -> bool:
        return any(r.hit and r.enforced for r in self.results)

    @property
    def flagged(self) -> bool:
        return any(r.hit and not r.enforced for r in self.results)

    @property
    def guard_failed(self) -> bool:
        """A guard error that the policy says must block (never in monitor mode)."""
        return self.fail_closed and any(r.error and r.enforced for r in self.results)

    @property
    def failed_open(self) -> list[CheckResult]:
        return [r for r in self.results if r.error and not (self.fail_closed and r.enforced)]

    @property
    def categories(self) -> list[str]:
        seen: dict[str, None] = {}
        for r in self.results:
            if r.hit:
                seen.update(dict.fromkeys(r.categories))
        return list(seen)

    @property
    def decision(self) -> Decision:
        if self.blocked or self.guard_failed:
            return "block"
        return "flag" if self.flagged else "allow"


def _enforced(route: RouteSettings, check: CheckSettings) -> bool:
    return (check.mode or route.mode) == "enforce"


def _probability(score: float) -> float:
    """A score that is not a probability (NaN from a broken model or server) is a guard error: a NaN
    would compare as under every threshold, and so pass."""
    if not 0.0 <= score <= 1.0:
        raise GuardError(f"the guard returned a score that is not a probability ({score!r})")
    return score


async def _run_text_check(guard: TextGuard, texts: list[ScreenText], result: CheckResult) -> None:
    scores = await guard.score_texts(texts)
    result.score = max(_probability(s.score) for s in scores)
    result.windows = sum(s.windows for s in scores)


async def _run_conversation_check(
    guard: ConversationGuard, turns: list[Turn], route: RouteSettings, check: CheckSettings, result: CheckResult
) -> None:
    scored = await guard.score_conversation(turns, route.taxonomy(), categories_from=check.threshold)
    score = _probability(scored.score if check.score == "full" else scored.score_binary)
    result.categories = scored.categories
    # A verdict whose codes are all excluded counts as safe (Meta's llama-stack rule).
    result.score = 0.0 if scored.all_excluded else score


async def _run_check(
    route: RouteSettings,
    check: CheckSettings,
    guard: Guard,
    result: CheckResult,
    texts: list[ScreenText] | None,
    turns: list[Turn] | None,
) -> None:
    span = telemetry.start_check(result)
    start = time.perf_counter()
    try:
        async with asyncio.timeout(route.guard_timeout_s):
            if isinstance(guard, TextGuard) and texts is not None:
                await _run_text_check(guard, texts, result)
            elif isinstance(guard, ConversationGuard) and turns is not None:
                await _run_conversation_check(guard, turns, route, check, result)
    except TimeoutError:
        result.error = f"timed out after {route.guard_timeout_s:g}s"
    except GuardError as exc:
        result.error = str(exc) or type(exc).__name__
        result.over_limit = isinstance(exc, GuardLimitExceeded)
    except Exception as exc:  # a guard bug must not crash the request; it is a guard error
        log.exception("guard_failed", guard=check.guard)
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        result.latency_ms = (time.perf_counter() - start) * 1000
        if span is not None:
            telemetry.end_check(span, result)


PlannedCheck = tuple[CheckSettings, Guard, CheckResult, list[ScreenText] | None, list[Turn] | None]


def _plan(
    route: RouteSettings,
    checks: Sequence[CheckSettings],
    guards: Mapping[str, Guard],
    side: Side,
    request: ChatRequest,
    reply: Reply | None,
) -> list[PlannedCheck]:
    plan: list[PlannedCheck] = []
    for check in checks:
        guard = guards[check.guard]
        result = CheckResult(
            guard=check.guard,
            side=side,
            threshold=check.threshold,
            enforced=_enforced(route, check),
            choice=reply.index if reply else None,
        )
        if isinstance(guard, TextGuard):
            roles = check.roles or (*DEFAULT_TEXT_ROLES, *(("system",) if route.screen_system else ()))
            texts = screen_texts(request, roles)
            result.skipped = not texts
            plan.append((check, guard, result, texts, None))
            continue
        subjects = (
            [output_conversation(request, reply, include_system=route.screen_system)]
            if reply
            else input_conversations(request, include_system=route.screen_system)
        )
        subjects = [turns for turns in subjects if turns]
        result.skipped = not subjects
        for k, turns in enumerate(subjects or [[]]):
            plan.append((check, guard, result if k == 0 else dataclasses.replace(result), None, turns))
    return plan


async def screen(
    route: RouteSettings, guards: Mapping[str, Guard], request: ChatRequest, reply: Reply | None = None
) -> Verdict:
    """Run the input checks (reply is None) or the output checks for one reply choice."""
    checks = route.output if reply is not None else route.input
    side: Side = "output" if reply else "input"
    size = len(reply.text) if reply else count_limits(request)[0]
    if size > OFF_LOOP_CHARS:
        # Collecting and normalising megabytes takes a while; a thread keeps the loop serving
        # (guard_view works in pieces, so the interpreter's lock changes hands in between).
        plan = await asyncio.to_thread(_plan, route, checks, guards, side, request, reply)
    else:
        plan = _plan(route, checks, guards, side, request, reply)
    verdict = Verdict(results=[p[2] for p in plan], fail_closed=route.on_guard_error == "block")
    running = {
        asyncio.create_task(_run_check(route, check, guard, result, texts, turns)): result
        for check, guard, result, texts, turns in plan
        if not result.skipped
    }
    await _until_decided(running, verdict)
    return verdict


async def _until_decided(running: dict[asyncio.Task[None], CheckResult], verdict: Verdict) -> None:
    """Wait for the checks; once one decides the request on its own (an enforced hit, or an
    enforced guard error that fails closed), the rest are dropped: their guard time is better spent
    on other requests, and no later result could change the answer."""
    pending = set(running)
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # a check that failed outside its own error handling fails the request
            if any(_decisive(running[task], verdict.fail_closed) for task in done):
                break
    finally:
        for task in pending:
            task.cancel()
            running[task].dropped = True
        await asyncio.gather(*pending, return_exceptions=True)


def _decisive(result: CheckResult, fail_closed: bool) -> bool:
    return result.enforced and (result.hit or (fail_closed and result.error is not None))


async def screen_replies(
    route: RouteSettings, guards: Mapping[str, Guard], request: ChatRequest, replies: Sequence[Reply]
) -> dict[int, Verdict]:
    # Each choice is judged with the request it answers (a legacy completion's own prompt).
    verdicts = await asyncio.gather(*(screen(route, guards, request.for_choice(r.index), r) for r in replies))
    return {reply.index: verdict for reply, verdict in zip(replies, verdicts, strict=True)}


def combine(*verdicts: Verdict) -> Verdict:
    out = Verdict(fail_closed=all(v.fail_closed for v in verdicts) if verdicts else True)
    for verdict in verdicts:
        out.results.extend(verdict.results)
    return out


__all__ = ["CheckResult", "Decision", "GuardError", "Verdict", "combine", "screen", "screen_replies"]
