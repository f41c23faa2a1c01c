"""OpenTelemetry traces around the request path (the optional `otel` extra): a server span per /v1/
request (from the record middleware), a child span per guard check (screening pipeline) and one per
upstream call (relay), with W3C `traceparent` honoured on the way in and re-generated on the way out.

Off by default. Off, nothing here imports OpenTelemetry and each hook costs one lookup that finds
nothing. Attributes carry names, scores and codes, never text a client or model wrote, unless
`server.log_content` is on.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
from collections.abc import AsyncIterator, MutableMapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

from aiohttp import web

from proxy.settings import Settings, TelemetrySettings
from proxy.yaml_source import ConfigError

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span

    from proxy.screening.pipeline import CheckResult
    from proxy.server.state import Record

# Trace headers the proxy writes itself: a client's copy is never passed on as it came.
TRACE_HEADERS = frozenset({"traceparent", "tracestate"})
CONTENT_LIMIT = 16 * 1024  # characters of prompt/completion on a span, with log_content on
ERROR_LIMIT = 256


class Tracing:
    """The app's tracer provider (one per app, never the global one), its OTLP exporter and propagator."""

    def __init__(self, settings: TelemetrySettings, *, log_content: bool) -> None:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        except ImportError as exc:
            raise ConfigError(
                [f"telemetry.enabled needs the otel extra: pip install 'guardrail-proxy[otel]' ({exc})"]
            ) from exc
        self.provider: TracerProvider = TracerProvider(
            resource=Resource.create({"service.name": settings.service_name}),
            sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
            shutdown_on_exit=False,  # shut down with the app, not at interpreter exit
        )
        # Spans leave in batches from the processor's own thread: exporting never waits on the loop.
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.endpoint)))
        self.tracer = self.provider.get_tracer("guardrail-proxy")
        self.propagator = TraceContextTextMapPropagator()
        self.log_content = log_content


TRACING = web.AppKey("tracing", Tracing)


@dataclass
class RequestTrace:
    tracing: Tracing
    span: Span
    context: Context
    token: contextvars.Token[RequestTrace | None] | None = None


@dataclass
class CheckSpan:
    span: Span
    cache: dict[str, int] = field(default_factory=dict)  # verdict cache lookups by result, this check's task only
    token: contextvars.Token[CheckSpan | None] | None = None


# The request's trace, copied into the tasks it starts (guard checks); None when tracing is off.
_REQUEST: contextvars.ContextVar[RequestTrace | None] = contextvars.ContextVar("guardrail_trace", default=None)
_CHECK: contextvars.ContextVar[CheckSpan | None] = contextvars.ContextVar("guardrail_check_span", default=None)


def setup(app: web.Application, settings: Settings) -> None:
    """Called by build_app: with telemetry on, the app gets its tracer and flushes it on cleanup."""
    if not settings.telemetry.enabled:
        return
    app[TRACING] = Tracing(settings.telemetry, log_content=settings.server.log_content)
    app.cleanup_ctx.append(_flush_on_cleanup)


async def _flush_on_cleanup(app: web.Application) -> AsyncIterator[None]:
    yield
    # Shutting down exports what is queued over HTTP: a thread, never the loop.
    await asyncio.to_thread(app[TRACING].provider.shutdown)


# ---- hooks: each returns at once when tracing is off ----


def begin_request(request: web.Request, request_id: str) -> RequestTrace | None:
    """The server span of one /v1/ request, a child of the client's `traceparent` when it sent one."""
    tracing = request.app.get(TRACING)
    if tracing is None or not request.path.startswith("/v1/"):
        return None
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind

    resource = request.match_info.route.resource
    template = resource.canonical if resource is not None else "unmatched"
    span = tracing.tracer.start_span(
        f"{request.method} {template}",
        context=tracing.propagator.extract(request.headers),
        kind=SpanKind.SERVER,
        attributes={"http.request.method": request.method, "http.route": template, "guardrail.request_id": request_id},
    )
    current = RequestTrace(tracing, span, trace.set_span_in_context(span))
    current.token = _REQUEST.set(current)
    return current


def log_fields() -> dict[str, str]:
    """The trace id for the request's log lines (empty when the request is not traced)."""
    current = _REQUEST.get()
    if current is None:
        return {}
    ctx = current.span.get_span_context()
    return {"trace_id": f"{ctx.trace_id:032x}"} if ctx.is_valid else {}


def end_request(current: RequestTrace, record: Record) -> None:
    from opentelemetry.trace import Status, StatusCode

    span = current.span
    attributes: dict[str, Any] = {
        "guardrail.decision": record.decision,
        "http.response.status_code": record.status,
    }
    if record.policy is not None:
        attributes["guardrail.policy"] = record.policy
        attributes["guardrail.policy.version"] = record.policy.rpartition("@")[2]
    for key in ("tenant", "route", "upstream", "error"):
        value = getattr(record, key)
        if value is not None:
            attributes[f"guardrail.{key}"] = value
    if record.model is not None:
        attributes["guardrail.model"] = _cut(record.model, 128)
    if record.stream is not None:
        attributes["guardrail.stream"] = record.stream
    if record.categories:
        attributes["guardrail.categories"] = list(record.categories)
    if current.tracing.log_content:
        for key in ("prompt", "completion"):
            value = getattr(record, key)
            if value is not None:
                attributes[f"guardrail.{key}"] = _cut(json.dumps(value, ensure_ascii=False, default=str), CONTENT_LIMIT)
    span.set_attributes(attributes)
    if record.status >= 500:
        span.set_status(Status(StatusCode.ERROR, record.error or None))
    span.end()
    if current.token is not None:
        _REQUEST.reset(current.token)


def start_check(result: CheckResult) -> CheckSpan | None:
    """A child of the request span for one guard check (runs in the check's own task)."""
    current = _REQUEST.get()
    if current is None:
        return None
    attributes: dict[str, Any] = {
        "guardrail.guard": result.guard,
        "guardrail.side": result.side,
        "guardrail.threshold": result.threshold,
        "guardrail.enforced": result.enforced,
    }
    if result.choice is not None:
        attributes["guardrail.choice"] = result.choice
    span = current.tracing.tracer.start_span(f"check {result.guard}", context=current.context, attributes=attributes)
    check = CheckSpan(span)
    check.token = _CHECK.set(check)
    return check


def end_check(check: CheckSpan, result: CheckResult) -> None:
    from opentelemetry.trace import Status, StatusCode

    attributes: dict[str, Any] = {"guardrail.latency_ms": round(result.latency_ms, 3), "guardrail.hit": result.hit}
    if result.score is not None:
        attributes["guardrail.score"] = result.score
    if result.categories:
        attributes["guardrail.categories"] = list(result.categories)
    if result.windows is not None:
        attributes["guardrail.windows"] = result.windows
    for result_name, attribute in (("hit", "guardrail.cache.hits"), ("miss", "guardrail.cache.misses")):
        if result_name in check.cache:
            attributes[attribute] = check.cache[result_name]
    if result.dropped:
        attributes["guardrail.dropped"] = True
    if result.error is not None:
        attributes["guardrail.error"] = _cut(result.error, ERROR_LIMIT)
        attributes["guardrail.over_limit"] = result.over_limit
        check.span.set_status(Status(StatusCode.ERROR, _cut(result.error, ERROR_LIMIT)))
    check.span.set_attributes(attributes)
    check.span.end()
    if check.token is not None:
        _CHECK.reset(check.token)


def note_cache_lookup(result: str) -> None:
    """A verdict cache lookup ("hit" or "miss"); counted on the check span when it happens in the
    check's own task (Prompt Guard's lookups do; Llama Guard's run in the guard thread and are not seen)."""
    check = _CHECK.get()
    if check is not None:
        check.cache[result] = check.cache.get(result, 0) + 1


class UpstreamCall:
    """The upstream call's span; a no-op (the shared NO_CALL) when the request is not traced."""

    def __init__(self, current: RequestTrace | None, upstream: str, method: str, headers: MutableMapping[str, str]):
        self.span: Span | None = None
        self.status: int | None = None
        if current is None:
            return
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind

        self.span = current.tracing.tracer.start_span(
            f"upstream {upstream}",
            context=current.context,
            kind=SpanKind.CLIENT,
            attributes={"guardrail.upstream": upstream, "http.request.method": method},
        )
        for name in [k for k in headers if k.lower() in TRACE_HEADERS]:
            del headers[name]
        current.tracing.propagator.inject(headers, context=trace.set_span_in_context(self.span))

    def answered(self, status: int) -> None:
        if self.span is not None:
            self.status = status
            self.span.set_attribute("http.response.status_code", status)

    def __enter__(self) -> UpstreamCall:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.span is None:
            return
        from opentelemetry.trace import Status, StatusCode

        from proxy.errors import UpstreamError

        if exc is not None:
            self.span.set_attribute("error.type", type(exc).__name__)
        # An exception after the answer may be the caller's (a failed check, a client gone): only
        # the upstream's own failures mark the span as failed.
        if isinstance(exc, UpstreamError) or (exc is not None and self.status is None):
            self.span.set_status(Status(StatusCode.ERROR, _cut(str(exc), ERROR_LIMIT)))
        elif self.status is not None and self.status >= 500:
            self.span.set_status(Status(StatusCode.ERROR))
        self.span.end()


NO_CALL = UpstreamCall(None, "", "", {})


def upstream_call(upstream: str, method: str, headers: MutableMapping[str, str]) -> UpstreamCall:
    """The span around one upstream request; injects our `traceparent` into `headers`."""
    current = _REQUEST.get()
    return NO_CALL if current is None else UpstreamCall(current, upstream, method, headers)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f"...({len(text)} chars)"
