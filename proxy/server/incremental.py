"""`stream: incremental` on the shared request path (chat completions only): upstream events go out
as the windows of text they carry pass their checks; each window's scores are recorded with its number."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from aiohttp import web

from proxy.errors import ProxyError
from proxy.policy.models import RouteSettings
from proxy.screening.collect import Reply
from proxy.screening.refusal import is_structured
from proxy.server.decisions import decide_output
from proxy.server.state import METRICS, SETTINGS, record_of
from proxy.streaming.held_response import HeldResponse
from proxy.streaming.incremental import IncrementalRelay, Release
from proxy.streaming.reply import StreamedReply
from proxy.upstream.relay import Reply as UpstreamReply

if TYPE_CHECKING:
    from proxy.server.exchange import Call


def stream_header(route: RouteSettings) -> str:
    """`x-guardrail-stream` of an incremental stream: the mode and its hold-back bound."""
    sentence = "; release_on=sentence" if route.release_on == "sentence" else ""
    return f"incremental; release_tokens={route.release_tokens}{sentence}"


async def relay_incremental(
    call: Call, held_response: HeldResponse, reply: UpstreamReply, started: float
) -> web.StreamResponse:
    from proxy.server.exchange import reading_upstream

    request, route, chat = call.request, call.route, call.chat
    record, server, metrics = record_of(request), request.app[SETTINGS].server, request.app[METRICS]

    async def check(window: int, replies: list[Reply]) -> tuple[set[int], ProxyError | None]:
        first = len(record.checks)
        outcome = await decide_output(request, route, chat, replies, call.verdict_in, call.prefetch)
        for entry in record.checks[first:]:
            entry["window"] = window
        return outcome

    def observe(tokens: int, seconds: float) -> None:
        metrics.holdback_tokens.labels(route.name).observe(tokens)
        metrics.holdback_seconds.labels(route.name).observe(seconds)

    streamed = StreamedReply(max_bytes=server.max_held_bytes, max_events=server.max_stream_events)
    release = Release(
        route.release_tokens, route.release_on == "sentence", route.refusal, chat.n or 1, is_structured(chat)
    )
    relay = IncrementalRelay(streamed, held_response, check, release, observe)
    with reading_upstream(request, record):
        closing = await relay.run(reply.chunks())
    record.upstream_ms = round((time.perf_counter() - started) * 1000, 2)
    metrics.held_bytes.labels("incremental").observe(relay.peak_held_bytes)
    if server.log_content:
        record.completion = [r.text for r in streamed.replies()]
    if isinstance(closing, ProxyError):
        response = await held_response.send_error(closing)
        record.error = record.error or held_response.failure
        return response
    return await held_response.send(closing, record.decision)
