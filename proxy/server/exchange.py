"""The request path every screened endpoint shares: parse, authenticate, resolve the route, screen the
input, relay, screen the output, answer. It reads top to bottom in `handle`; what differs between
chat completions, legacy completions and the Responses API is a `WireFormat` (proxy/server/wire.py)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from proxy.errors import ModelNotFound, UpstreamError
from proxy.policy.models import RouteSettings
from proxy.protocol import ChatRequest
from proxy.screening.pipeline import Verdict
from proxy.screening.prefetch import Prefetch
from proxy.server.decisions import decide_output, guard_failure, screen_input, start_prefetch, violation
from proxy.server.json_body import read_request
from proxy.server.limits import check_count, check_limits
from proxy.server.state import (
    METRICS,
    POLICIES,
    SETTINGS,
    TENANTS,
    UPSTREAMS,
    Record,
    bind_tenant,
    record_of,
)
from proxy.server.wire import WireFormat
from proxy.streaming.buffered import HeldStream, ReplyTooLarge, hold_body
from proxy.streaming.held_response import CLIENT_GONE, SSE_HEADERS, HeldResponse
from proxy.streaming.reply import Added, read_stream
from proxy.streaming.shape import MalformedReply, unrelayable_status
from proxy.streaming.sse import Event
from proxy.upstream.relay import Outgoing, Upstream, rewrite_body
from proxy.upstream.relay import Reply as UpstreamReply

# The decision header of an upstream 4xx/5xx relayed as is: the input passed, no reply was screened.
RELAYED_ERROR = "upstream_error"


async def handle(request: web.Request, wire: WireFormat) -> web.StreamResponse:
    record = record_of(request)
    tenant = request.app[TENANTS].identify(request)
    bind_tenant(request, tenant.name)
    raw, payload = await read_request(request)
    policy = request.app[POLICIES].current.get(tenant.policy)
    model = payload.get("model")
    check_count(policy.resolve(wire.path, model) if isinstance(model, str) else None, payload, wire)
    chat = await wire.read(request, payload)
    record.policy, record.model, record.stream = policy.tag, chat.model, bool(chat.stream)
    route = policy.resolve(wire.path, chat.model)
    if route is None or route.passthrough:
        raise ModelNotFound(f"The model `{chat.model}` does not exist or you do not have access to it.", param="model")
    record.route = route.name
    record.unscreened = check_limits(route, chat, wire.prompt_field) or None
    for part_type in record.unscreened or ():
        request.app[METRICS].unscreened_parts.labels(tenant.name, route.name, part_type).inc()
    if request.app[SETTINGS].server.log_content:
        record.prompt = payload.get(wire.prompt_field)
    headers = {"x-request-id": record.request_id, "x-guardrail-policy": policy.tag}

    verdict = await screen_input(request, route, chat)
    if verdict.decision == "block":
        return await answer_input_block(request, wire, route, chat, verdict, headers)

    upstream = request.app[UPSTREAMS][route.upstream]
    changes = {"model": route.rename_model} if route.rename_model else {}
    body = rewrite_body(raw, payload, changes)
    out = outgoing(request, route, tenant.key, wire.upstream_path, body, payload=payload, stream=bool(chat.stream))
    record.upstream = upstream.name
    call = Call(request, wire, route, chat, upstream, out, verdict, headers, start_prefetch(request, route, chat))
    try:
        if chat.stream:
            return await relay_stream(call)
        return await relay_json(call)
    finally:
        call.prefetch.stop()


def outgoing(
    request: web.Request,
    route: RouteSettings,
    client_key: str | None,
    path: str,
    body: bytes,
    *,
    payload: dict[str, Any] | None = None,
    stream: bool = False,
) -> Outgoing:
    """The upstream request for this client request on `route` (its method, headers and request id)."""
    return Outgoing(
        path=path,
        body=body,
        payload=payload,
        stream=stream,
        client_headers=request.headers,
        client_key=client_key,
        request_id=record_of(request).request_id,
        method=request.method,
        forward_headers=route.forward_headers,
    )


async def answer_input_block(
    request: web.Request,
    wire: WireFormat,
    route: RouteSettings,
    chat: ChatRequest,
    verdict: Verdict,
    headers: dict[str, str],
) -> web.StreamResponse:
    if verdict.guard_failed and not verdict.blocked:
        raise guard_failure(verdict)
    headers = {**headers, "x-guardrail-decision": "block"}
    if route.on_block == "error":
        err = violation(verdict)
        return web.json_response(err.body(), status=err.status, headers=headers)
    created, id_ = int(time.time()), wire.id_prefix + record_of(request).request_id.removeprefix("req_")
    if chat.stream:
        response = web.StreamResponse(status=200, headers={**SSE_HEADERS, **headers})
        await response.prepare(request)
        try:
            await response.write(b"".join(wire.refusal_stream(chat, route.refusal, id_=id_, created=created)))
            await response.write_eof()
        except ConnectionError:
            record_of(request).error = CLIENT_GONE
        return response
    return web.json_response(wire.refusal(chat, route.refusal, id_=id_, created=created), headers=headers)


class Call:
    """One relayed request: what the later steps need, in one place."""

    __slots__ = ("chat", "headers", "out", "prefetch", "request", "route", "upstream", "verdict_in", "wire")

    def __init__(
        self,
        request: web.Request,
        wire: WireFormat,
        route: RouteSettings,
        chat: ChatRequest,
        upstream: Upstream,
        out: Outgoing,
        verdict_in: Verdict,
        headers: dict[str, str],
        prefetch: Prefetch,
    ) -> None:
        self.request, self.wire, self.route, self.chat = request, wire, route, chat
        self.upstream, self.out, self.verdict_in, self.headers = upstream, out, verdict_in, headers
        self.prefetch = prefetch


def relay_unchanged(
    status: int, body: bytes, upstream_headers: dict[str, str], headers: dict[str, str], decision: str
) -> web.Response:
    resp = web.Response(status=status, body=body, headers={**headers, "x-guardrail-decision": decision})
    # A screened reply goes out as UTF-8 JSON, as it was read: an upstream's charset (utf-7 ...) would
    # make a client decode other text than the guard saw.
    resp.headers["Content-Type"] = (
        "application/json" if status == 200 else upstream_headers.get("content-type", "application/json")
    )
    for key in ("retry-after", "openai-processing-ms", "openai-version"):
        if key in upstream_headers:
            resp.headers[key] = upstream_headers[key]
    return resp


def upstream_failed(request: web.Request, record: Record, kind: str) -> None:
    """Count an upstream failure once per request, however many layers see it."""
    kind = kind.removeprefix("upstream_")  # error codes already say upstream_...
    if record.error is None:
        record.error = f"upstream_{kind}"
        request.app[METRICS].upstream_errors.labels(record.upstream or "-", kind).inc()


async def relay_json(call: Call) -> web.StreamResponse:
    request, route = call.request, call.route
    record, started = record_of(request), time.perf_counter()
    try:
        async with call.upstream.open(call.out) as reply:
            status, upstream_headers = reply.status, dict(reply.headers)
            body = await read_reply(request, record, reply)
    except UpstreamError as exc:
        upstream_failed(request, record, exc.code or "error")
        raise
    record.upstream_ms = round((time.perf_counter() - started) * 1000, 2)
    request.app[METRICS].upstream_latency.labels(call.upstream.name).observe(record.upstream_ms / 1000)
    if status != 200:
        return relay_unchanged(status, body, upstream_headers, call.headers, RELAYED_ERROR)
    try:
        reply_json, replies = call.wire.reply(body)
    except (MalformedReply, ValidationError) as exc:
        upstream_failed(request, record, "malformed")
        # Our own words only: a validation error would quote the upstream's unscreened text.
        detail = f": {exc}" if isinstance(exc, MalformedReply) else ""
        raise UpstreamError(f"The upstream returned a malformed reply{detail}.") from exc
    blocked, failure = await decide_output(request, route, call.chat, replies, call.verdict_in, call.prefetch)
    reply_id = reply_json.get("id") if isinstance(reply_json.get("id"), str) else None
    if failure is not None or blocked:
        await call.wire.withheld(request, call.chat, reply_id)
    if failure is not None:
        raise failure
    if not blocked:
        await call.wire.answered(request, call.chat, reply_id, replies)
        return relay_unchanged(200, body, upstream_headers, call.headers, record.decision)
    replaced = call.wire.replace(call.chat, reply_json, blocked, route.refusal)
    return web.json_response(replaced, headers={**call.headers, "x-guardrail-decision": "block"})


async def read_reply(request: web.Request, record: Record, reply: UpstreamReply) -> bytes:
    """A non-streamed reply's body (or an error status's), up to `max_held_bytes`. Only 200 is
    screened and only 4xx/5xx are relayed unchanged: any other status is a 502."""
    metrics = request.app[METRICS]
    if reply.status != 200:
        upstream_failed(request, record, f"http_{reply.status}")
        if (error := unrelayable_status(reply.status)) is not None:
            raise error
    try:
        body = await hold_body(reply.chunks(), request.app[SETTINGS].server.max_held_bytes)
    except ReplyTooLarge as exc:
        metrics.held_over_cap.labels("json", exc.cap).inc()
        raise
    metrics.held_bytes.labels("json").observe(len(body))
    return body


async def relay_stream(call: Call) -> web.StreamResponse:
    from proxy.server.incremental import relay_incremental, stream_header  # chat streams only

    request, route = call.request, call.route
    record, started = record_of(request), time.perf_counter()
    interval = request.app[SETTINGS].server.keepalive_interval_s
    incremental = route.stream == "incremental" and call.wire.incremental
    headers = call.headers
    try:
        async with call.upstream.open(call.out) as reply:
            if reply.status != 200:
                body = await read_reply(request, record, reply)
                return relay_unchanged(reply.status, body, dict(reply.headers), headers, RELAYED_ERROR)
            if incremental:
                headers = {**headers, "x-guardrail-stream": stream_header(route)}
            async with HeldResponse(request, headers, interval, route.hold_headers_s) as held_response:
                if incremental:
                    return await relay_incremental(call, held_response, reply, started)
                held = await hold_stream(call, reply)
                record.upstream_ms = round((time.perf_counter() - started) * 1000, 2)
                return await finish_stream(call, held_response, held)
            # Only after the headers went out: the held response ended the stream with an error event.
            record.error = record.error or held_response.failure
            return held_response.result()
    except UpstreamError as exc:
        upstream_failed(request, record, exc.code or "error")
        raise


async def hold_stream(call: Call, reply: UpstreamReply) -> HeldStream:
    """The whole upstream stream, held."""
    request = call.request
    server = request.app[SETTINGS].server
    held = call.wire.held(max_bytes=server.max_held_bytes, max_events=server.max_stream_events)

    def keep(event: Event, added: list[Added]) -> None:
        held.keep(event, added)
        call.prefetch.grew(held)  # the output check's prompt so far, now and then

    with reading_upstream(request, record_of(request)):
        await read_stream(held, reply.chunks(), keep)
    request.app[METRICS].held_bytes.labels("stream").observe(held.received)
    return held


@contextlib.contextmanager
def reading_upstream(request: web.Request, record: Record) -> Iterator[None]:
    """Every failure of reading an upstream stream is an UpstreamError, counted once."""
    try:
        yield
    except MalformedReply as exc:
        upstream_failed(request, record, "malformed_stream")
        raise UpstreamError(f"The upstream stream broke: {exc}.") from exc
    except UpstreamError as exc:
        if isinstance(exc, ReplyTooLarge):
            request.app[METRICS].held_over_cap.labels("stream", exc.cap).inc()
        upstream_failed(request, record, exc.code or "error")
        raise


async def finish_stream(call: Call, held_response: HeldResponse, held: HeldStream) -> web.StreamResponse:
    request, route = call.request, call.route
    replies = held.replies()
    blocked, failure = await decide_output(request, route, call.chat, replies, call.verdict_in, call.prefetch)
    if failure is not None or blocked:
        await call.wire.withheld(request, call.chat, held.id)
    if failure is not None:
        return await held_response.send_error(failure)
    if not blocked:
        await call.wire.answered(request, call.chat, held.id, replies)
    events = call.wire.replay(call.chat, held, blocked, route.refusal)
    return await held_response.send(events, record_of(request).decision)
