"""Middleware: request id, the OpenAI error envelope for every failure, the per-request record.
A stream whose headers already went out is never answered twice: its held response ends it."""

from __future__ import annotations

import re

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from proxy import telemetry
from proxy.errors import BadRequest, NotFound, ProxyError, UpstreamError
from proxy.protocol import error_body
from proxy.server.state import METRICS, RECORD, Record, loggable
from proxy.streaming.held_response import CLIENT_GONE, HELD, HeldResponse

log = structlog.get_logger("proxy.request")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def error_response(error: ProxyError, record: Record) -> web.Response:
    headers = {**error.headers(), "x-request-id": record.request_id}
    if record.policy is not None:
        headers["x-guardrail-policy"] = record.policy
        headers["x-guardrail-decision"] = record.decision
    return web.json_response(error.body(), status=error.status, headers=headers)


@web.middleware
async def record_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    record = Record()
    incoming = request.headers.get("x-request-id", "")
    if _REQUEST_ID.match(incoming):
        record.request_id = incoming
    request[RECORD] = record
    # Each request runs in its own task (own context): every log line it writes carries these.
    structlog.contextvars.clear_contextvars()
    trace = telemetry.begin_request(request, record.request_id)  # None unless telemetry is on
    structlog.contextvars.bind_contextvars(request_id=record.request_id, **telemetry.log_fields())
    metrics = request.app[METRICS]
    metrics.in_flight.inc()
    try:
        response = await _handle(request, handler, record)
        # A client that hung up mid-answer got nothing whole: 499, whatever status the headers said.
        record.status = 499 if record.error == CLIENT_GONE else response.status
        if not response.prepared:
            response.headers["x-request-id"] = record.request_id
        return response
    finally:
        metrics.in_flight.dec()
        _finish(request, record)
        if trace is not None:
            telemetry.end_request(trace, record)


async def _handle(request: web.Request, handler: Handler, record: Record) -> web.StreamResponse:
    try:
        return await handler(request)
    except Exception as exc:
        held: HeldResponse | None = request.get(HELD)
        if held is not None and held.prepared:
            # The stream's headers left: the held response ends it with one final error event;
            # a second response here would be written into the SSE body.
            response = await held.fail(exc)
            record.error = record.error or held.failure
            return response
        if request.writer.output_size > 0:
            # Another response (a passthrough relay) already sent bytes: a second one would land in
            # its body. aiohttp closes the connection instead, so the client sees a broken reply.
            log.error("failed_after_headers", exc_info=exc, request_id=record.request_id, path=request.path)
            record.error = record.error or (exc.code if isinstance(exc, ProxyError) else None) or "internal_error"
            record.status = 502 if isinstance(exc, UpstreamError) else 500
            raise
        return _error(request, exc, record)


def _error(request: web.Request, exc: Exception, record: Record) -> web.StreamResponse:
    if isinstance(exc, web.RequestPayloadError):
        # The body could not be read as sent (e.g. `Content-Encoding: gzip` on a plain body): the client's fault.
        exc = BadRequest("The request body could not be read; check its Content-Encoding and Content-Length.")
    if isinstance(exc, ProxyError):
        record.error = record.error or exc.code
        if exc.status == 503 and record.policy is not None:
            record.decision = "block"
        return error_response(exc, record)
    if isinstance(exc, web.HTTPException):
        if exc.status == 404:
            return error_response(NotFound(f"Unknown path {request.path}"), record)
        body = error_body(exc.reason, "invalid_request_error", f"http_{exc.status}")
        return web.json_response(body, status=exc.status, headers={"x-request-id": record.request_id})
    log.error("unhandled_error", exc_info=exc, request_id=record.request_id, path=request.path)
    record.error = "internal_error"
    return web.json_response(
        error_body("The proxy failed to handle the request.", "server_error", "internal_error"),
        status=500,
        headers={"x-request-id": record.request_id},
    )


def _finish(request: web.Request, record: Record) -> None:
    if not request.path.startswith("/v1/"):
        return
    if record.status == 0:
        record.status = 499  # the client went away before an answer
    metrics = request.app[METRICS]
    metrics.requests.labels(record.tenant or "-", record.route or "-", record.decision, str(record.status)).inc()
    fields = dict(record.fields())
    structlog.contextvars.unbind_contextvars("request_id", "tenant")
    log.info("request", path=loggable(request.path, 128), **fields)
