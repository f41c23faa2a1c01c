"""From checks to an answer, for every wire format: run a side's checks, record them (log line and
metrics), and turn a verdict into what the client must get (a block, a 400 or a 503)."""

from __future__ import annotations

from aiohttp import web

from proxy.errors import GuardUnavailable, NotReady, PolicyViolation, ProxyError, ReplyTooLongToScreen, TooLargeToScreen
from proxy.guards.guard import PrefetchOutcome
from proxy.policy.models import RouteSettings
from proxy.protocol import ChatRequest
from proxy.screening.collect import Reply
from proxy.screening.pipeline import Verdict, combine, screen, screen_replies
from proxy.screening.prefetch import Prefetch, prefetch_output
from proxy.server.state import GUARDS, METRICS, READINESS, SETTINGS, record_of

_RANK = {"allow": 0, "flag": 1, "block": 2}


async def screen_input(request: web.Request, route: RouteSettings, chat: ChatRequest) -> Verdict:
    if route.input and not request.app[READINESS].ready:
        raise NotReady("Guards are still loading; retry shortly.", retry_after_s=5)
    guards = request.app[GUARDS]
    verdict = await screen(route, guards, chat)
    note(request, route, verdict)
    return verdict


def start_prefetch(request: web.Request, route: RouteSettings, chat: ChatRequest) -> Prefetch:
    """While the upstream answers, the output guards compute what their checks will start with."""
    if not route.output or not request.app[READINESS].ready:
        return Prefetch()
    counter = request.app[METRICS].prefetches

    def observe(guard: str, outcome: PrefetchOutcome) -> None:
        counter.labels(guard, outcome).inc()

    guards = request.app[GUARDS]
    return prefetch_output(route, guards, chat, observe)


async def screen_output(
    request: web.Request,
    route: RouteSettings,
    chat: ChatRequest,
    replies: list[Reply],
    prefetch: Prefetch | None = None,
) -> dict[int, Verdict]:
    if prefetch is not None:
        prefetch.stop()  # a step already running finishes; the checks start from what it computed
    if not route.output:
        return {}
    if not request.app[READINESS].ready:
        raise NotReady("Guards are still loading; retry shortly.", retry_after_s=5)
    guards = request.app[GUARDS]
    verdicts = await screen_replies(route, guards, chat, replies)
    note(request, route, *verdicts.values())
    return verdicts


async def decide_output(
    request: web.Request,
    route: RouteSettings,
    chat: ChatRequest,
    replies: list[Reply],
    verdict_in: Verdict,
    prefetch: Prefetch | None = None,
) -> tuple[set[int], ProxyError | None]:
    """Screen every reply choice: (indexes of blocked choices, or the error the client must get:
    503 when a guard failed and the policy blocks on that, 400 when blocked with on_block: error)."""
    verdicts = await screen_output(request, route, chat, replies, prefetch)
    if request.app[SETTINGS].server.log_content:
        record_of(request).completion = [r.text for r in replies]
    overall = combine(verdict_in, *verdicts.values())
    if any(v.guard_failed for v in verdicts.values()):
        return set(), guard_failure(overall)
    blocked = {i for i, v in verdicts.items() if v.blocked}
    if blocked and route.on_block == "error":
        return blocked, violation(overall)
    return blocked, None


def note(request: web.Request, route: RouteSettings, *verdicts: Verdict) -> None:
    """Add checks to the record and metrics; the request decision only ever escalates."""
    record, metrics = record_of(request), request.app[METRICS]
    for verdict in verdicts:
        for result in verdict.results:
            record.checks.append(result.record())
            if not (result.skipped or result.dropped):
                metrics.guard_latency.labels(result.guard, result.side).observe(result.latency_ms / 1000)
            if result.error:
                metrics.guard_errors.labels(result.guard).inc()
        for result in verdict.failed_open:
            metrics.fail_open.labels(record.tenant or "-", route.name, result.guard).inc()
        decision = verdict.decision
        if decision != "allow":
            for result in verdict.results:
                if result.hit:
                    for category in result.categories or ("none",):
                        metrics.blocks.labels(
                            record.tenant or "-",
                            route.name,
                            result.side,
                            category,
                            "block" if result.enforced else "flag",
                        ).inc()
        record.categories = list(dict.fromkeys([*record.categories, *verdict.categories]))
        if _RANK[decision] > _RANK[record.decision]:
            record.decision = decision


def guard_failure(verdict: Verdict) -> ProxyError:
    """503 for a guard that failed; when every failure is a text over a guard's `max_tokens`,
    retrying cannot help: a 400 for the request, a 502 for the upstream's reply."""
    failed = [r for r in verdict.results if r.error and r.enforced]
    if failed and all(r.over_limit for r in failed):
        detail = "; ".join(sorted({r.error or "" for r in failed}))
        if any(r.side == "output" for r in failed):
            return ReplyTooLongToScreen(f"The upstream's reply is too long to screen: {detail}.")
        return TooLargeToScreen(f"The request is too long to screen: {detail}.", param="messages")
    names = ", ".join(dict.fromkeys(r.guard for r in failed))
    return GuardUnavailable(f"Content screening is unavailable ({names}); retry later.", retry_after_s=2)


def violation(verdict: Verdict) -> PolicyViolation:
    cats = verdict.categories
    detail = f" (categories: {', '.join(cats)})" if cats else ""
    return PolicyViolation(f"The request was blocked by the content policy{detail}.", cats)
