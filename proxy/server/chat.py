"""POST /v1/chat/completions: parse, authenticate, resolve the route, screen the input, relay,
screen the output, answer. The request's whole path reads top to bottom in `chat_completions`."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from proxy.errors import (
    BadRequest,
    GuardUnavailable,
    ModelNotFound,
    NotReady,
    PayloadTooLarge,
    PolicyViolation,
    ProxyError,
    ReplyTooLongToScreen,
    TooLargeToScreen,
    UnsupportedMediaType,
    UpstreamError,
)
from proxy.policy.models import RouteSettings
from proxy.protocol import ChatCompletion, ChatRequest
from proxy.screening.collect import Reply, choice_text, count_limits, unscreened_parts
from proxy.screening.pipeline import Verdict, combine, screen, screen_replies
from proxy.screening.refusal import refusal_completion, replace_choices
from proxy.server.connections import read_body
from proxy.server.json_body import parse_json_object
from proxy.server.state import (
    GUARDS,
    METRICS,
    POLICIES,
    READINESS,
    SETTINGS,
    TENANTS,
    UPSTREAMS,
    Record,
    bind_tenant,
    record_of,
)
from proxy.streaming.buffered import HeldStream, ReplyTooLarge, hold, hold_body, refusal_stream, replay
from proxy.streaming.held_response import SSE_HEADERS, HeldResponse
from proxy.streaming.incremental import IncrementalRelay, Release
from proxy.streaming.reply import StreamedReply
from proxy.streaming.shape import MalformedReply, parse_completion, unrelayable_status
from proxy.upstream.relay import Outgoing, Upstream, rewrite_body
from proxy.upstream.relay import Reply as UpstreamReply

CHAT_PATH = "/v1/chat/completions"


async def chat_completions(request: web.Request) -> web.StreamResponse:
    record = record_of(request)
    tenant = request.app[TENANTS].identify(request)
    bind_tenant(request, tenant.name)
    raw, payload, chat = await read_chat_request(request)
    policy = request.app[POLICIES].current.get(tenant.policy)
    record.policy, record.model, record.stream = policy.tag, chat.model, bool(chat.stream)
    route = policy.resolve(CHAT_PATH, chat.model)
    if route is None or route.passthrough:
        raise ModelNotFound(f"The model `{chat.model}` does not exist or you do not have access to it.", param="model")
    record.route = route.name
    record.unscreened = check_limits(route, chat) or None
    for part_type in record.unscreened or ():
        request.app[METRICS].unscreened_parts.labels(tenant.name, route.name, part_type).inc()
    if request.app[SETTINGS].server.log_content:
        record.prompt = payload.get("messages")
    headers = {"x-request-id": record.request_id, "x-guardrail-policy": policy.tag}

    verdict = await screen_input(request, route, chat)
    if verdict.decision == "block":
        return await answer_input_block(request, route, chat, verdict, headers)

    upstream = request.app[UPSTREAMS][route.upstream]
    changes = {"model": route.rename_model} if route.rename_model else {}
    out = Outgoing(
        path="/chat/completions",
        body=rewrite_body(raw, payload, changes),
        payload=payload,
        stream=bool(chat.stream),
        client_headers=request.headers,
        client_key=tenant.key,
        request_id=record.request_id,
        forward_headers=route.forward_headers,
    )
    record.upstream = upstream.name
    if chat.stream:
        return await relay_stream(request, route, chat, upstream, out, verdict, headers)
    return await relay_json(request, route, chat, upstream, out, verdict, headers)


async def read_chat_request(request: web.Request) -> tuple[bytes, dict[str, Any], ChatRequest]:
    settings = request.app[SETTINGS]
    if request.content_type != "application/json":
        raise UnsupportedMediaType(f"Expected Content-Type application/json, got {request.content_type or 'none'}.")
    if request.content_length is not None and request.content_length > settings.server.max_body_bytes:
        raise PayloadTooLarge(f"Request body is larger than {settings.server.max_body_bytes} bytes.")
    try:
        raw = await read_body(request)
    except web.HTTPRequestEntityTooLarge as exc:
        raise PayloadTooLarge(f"Request body is larger than {settings.server.max_body_bytes} bytes.") from exc
    payload = parse_json_object(raw, max_depth=settings.server.max_json_depth)
    try:
        chat = ChatRequest.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = error_param(first["loc"])
        raise BadRequest(f"Invalid value for '{param}': {first['msg']}", param=param or None) from exc
    return raw, payload, chat


_UNION_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "TextPart", "ImagePart", "OtherPart"})


def error_param(loc: tuple[int | str, ...]) -> str:
    """`messages.0.content` from a pydantic location, without union member tags."""
    parts = []
    for part in loc:
        if isinstance(part, str) and (part in _UNION_TAGS or "[" in part or part.startswith("function-")):
            break
        parts.append(str(part))
    return ".".join(parts)


def check_limits(route: RouteSettings, chat: ChatRequest) -> list[str]:
    """Raise a 400 past a limit or for a part the route cannot screen; return the part types that
    go upstream unscreened because the route allows them."""
    limits = route.limits
    if len(chat.messages) > limits.max_messages:
        raise BadRequest(f"Too many messages: {len(chat.messages)} > {limits.max_messages}.", param="messages")
    chars, images = count_limits(chat)
    if chars > limits.max_characters:
        raise BadRequest(f"Too much text: {chars} characters > {limits.max_characters}.", param="messages")
    if images > limits.max_images:
        raise BadRequest(f"Too many images: {images} > {limits.max_images}.", param="messages")
    return unscreened_parts(chat, route.unscreened_parts)


async def screen_input(request: web.Request, route: RouteSettings, chat: ChatRequest) -> Verdict:
    if route.input and not request.app[READINESS].ready:
        raise NotReady("Guards are still loading; retry shortly.", retry_after_s=5)
    guards = request.app[GUARDS]
    verdict = await screen(route, guards, chat)
    note(request, route, verdict)
    return verdict


async def screen_output(
    request: web.Request, route: RouteSettings, chat: ChatRequest, replies: list[Reply]
) -> dict[int, Verdict]:
    if not route.output:
        return {}
    if not request.app[READINESS].ready:
        raise NotReady("Guards are still loading; retry shortly.", retry_after_s=5)
    guards = request.app[GUARDS]
    verdicts = await screen_replies(route, guards, chat, replies)
    note(request, route, *verdicts.values())
    return verdicts


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
        rank = {"allow": 0, "flag": 1, "block": 2}
        if rank[decision] > rank[record.decision]:
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


async def answer_input_block(
    request: web.Request, route: RouteSettings, chat: ChatRequest, verdict: Verdict, headers: dict[str, str]
) -> web.StreamResponse:
    if verdict.guard_failed and not verdict.blocked:
        raise guard_failure(verdict)
    if route.on_block == "error":
        err = violation(verdict)
        return web.json_response(err.body(), status=err.status, headers={**headers, "x-guardrail-decision": "block"})
    n, created, id_ = chat.n or 1, int(time.time()), "chatcmpl-" + record_of(request).request_id.removeprefix("req_")
    headers = {**headers, "x-guardrail-decision": "block"}
    if chat.stream:
        response = web.StreamResponse(status=200, headers={**SSE_HEADERS, **headers})
        await response.prepare(request)
        for chunk in refusal_stream(chat.model, route.refusal, n, id_=id_, created=created):
            await response.write(chunk)
        await response.write_eof()
        return response
    return web.json_response(
        refusal_completion(chat.model, route.refusal, n, id_=id_, created=created), headers=headers
    )


# The decision header of an upstream 4xx/5xx relayed as is: the input passed, no reply was screened.
RELAYED_ERROR = "upstream_error"


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


async def relay_json(
    request: web.Request,
    route: RouteSettings,
    chat: ChatRequest,
    upstream: Upstream,
    out: Outgoing,
    verdict_in: Verdict,
    headers: dict[str, str],
) -> web.StreamResponse:
    record, started = record_of(request), time.perf_counter()
    try:
        async with upstream.open(out) as reply:
            status, upstream_headers = reply.status, dict(reply.headers)
            body = await read_reply(request, record, reply)
    except UpstreamError as exc:
        upstream_failed(request, record, exc.code or "error")
        raise
    record.upstream_ms = round((time.perf_counter() - started) * 1000, 2)
    request.app[METRICS].upstream_latency.labels(upstream.name).observe(record.upstream_ms / 1000)
    if status != 200:
        return relay_unchanged(status, body, upstream_headers, headers, RELAYED_ERROR)
    try:
        completion_json = parse_completion(body)
        completion = ChatCompletion.model_validate(completion_json)
    except (MalformedReply, ValidationError) as exc:
        upstream_failed(request, record, "malformed")
        # Our own words only: a validation error would quote the upstream's unscreened text.
        detail = f": {exc}" if isinstance(exc, MalformedReply) else ""
        raise UpstreamError(f"The upstream returned a malformed chat completion{detail}.") from exc
    replies = [Reply(c.index, choice_text(c)) for c in completion.choices]
    blocked, failure = await decide_output(request, route, chat, replies, verdict_in)
    if failure is not None:
        raise failure
    if not blocked:
        return relay_unchanged(200, body, upstream_headers, headers, record.decision)
    replaced = replace_choices(completion_json, blocked, route.refusal)
    return web.json_response(replaced, headers={**headers, "x-guardrail-decision": "block"})


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


async def relay_stream(
    request: web.Request,
    route: RouteSettings,
    chat: ChatRequest,
    upstream: Upstream,
    out: Outgoing,
    verdict_in: Verdict,
    headers: dict[str, str],
) -> web.StreamResponse:
    record, started = record_of(request), time.perf_counter()
    interval = request.app[SETTINGS].server.keepalive_interval_s
    try:
        async with upstream.open(out) as reply:
            if reply.status != 200:
                body = await read_reply(request, record, reply)
                return relay_unchanged(reply.status, body, dict(reply.headers), headers, RELAYED_ERROR)
            if route.stream == "incremental":
                headers = {**headers, "x-guardrail-stream": stream_header(route)}
            async with HeldResponse(request, headers, interval) as held_response:
                if route.stream == "incremental":
                    return await relay_incremental(request, route, chat, held_response, reply, verdict_in, started)
                held = await hold_stream(request, record, reply)
                record.upstream_ms = round((time.perf_counter() - started) * 1000, 2)
                return await finish_stream(request, route, chat, held_response, held, verdict_in)
            # Only after the headers went out: the held response ended the stream with an error event.
            record.error = record.error or held_response.failure
            return held_response.result()
    except UpstreamError as exc:
        upstream_failed(request, record, exc.code or "error")
        raise


async def hold_stream(request: web.Request, record: Record, reply: UpstreamReply) -> HeldStream:
    """The whole upstream stream, held."""
    server = request.app[SETTINGS].server
    with reading_upstream(request, record):
        held = await hold(reply.chunks(), max_bytes=server.max_held_bytes, max_events=server.max_stream_events)
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


def stream_header(route: RouteSettings) -> str:
    """`x-guardrail-stream` of an incremental stream: the mode and its hold-back bound."""
    sentence = "; release_on=sentence" if route.release_on == "sentence" else ""
    return f"incremental; release_tokens={route.release_tokens}{sentence}"


async def relay_incremental(
    request: web.Request,
    route: RouteSettings,
    chat: ChatRequest,
    held_response: HeldResponse,
    reply: UpstreamReply,
    verdict_in: Verdict,
    started: float,
) -> web.StreamResponse:
    """`stream: incremental`: upstream events go out as the windows of text they carry pass their
    checks; each window's scores are recorded with its number."""
    record, server, metrics = record_of(request), request.app[SETTINGS].server, request.app[METRICS]

    async def check(window: int, replies: list[Reply]) -> tuple[set[int], ProxyError | None]:
        first = len(record.checks)
        outcome = await decide_output(request, route, chat, replies, verdict_in)
        for entry in record.checks[first:]:
            entry["window"] = window
        return outcome

    def observe(tokens: int, seconds: float) -> None:
        metrics.holdback_tokens.labels(route.name).observe(tokens)
        metrics.holdback_seconds.labels(route.name).observe(seconds)

    streamed = StreamedReply(max_bytes=server.max_held_bytes, max_events=server.max_stream_events)
    release = Release(route.release_tokens, route.release_on == "sentence", route.refusal, chat.n or 1)
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


async def finish_stream(
    request: web.Request,
    route: RouteSettings,
    chat: ChatRequest,
    held_response: HeldResponse,
    held: HeldStream,
    verdict_in: Verdict,
) -> web.StreamResponse:
    blocked, failure = await decide_output(request, route, chat, held.replies(), verdict_in)
    if failure is not None:
        return await held_response.send_error(failure)
    return await held_response.send(replay(held, blocked, route.refusal), record_of(request).decision)


async def decide_output(
    request: web.Request, route: RouteSettings, chat: ChatRequest, replies: list[Reply], verdict_in: Verdict
) -> tuple[set[int], ProxyError | None]:
    """Screen every reply choice: (indexes of blocked choices, or the error the client must get:
    503 when a guard failed and the policy blocks on that, 400 when blocked with on_block: error)."""
    verdicts = await screen_output(request, route, chat, replies)
    if request.app[SETTINGS].server.log_content:
        record_of(request).completion = [r.text for r in replies]
    overall = combine(verdict_in, *verdicts.values())
    if any(v.guard_failed for v in verdicts.values()):
        return set(), guard_failure(overall)
    blocked = {i for i, v in verdicts.items() if v.blocked}
    if blocked and route.on_block == "error":
        return blocked, violation(overall)
    return blocked, None
