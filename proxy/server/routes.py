"""The proxy's routes besides chat: health, readiness, metrics, model list, and the explicit
passthrough of other `/v1/*` paths (unscreened, only where a policy route says `passthrough: true`)."""

from __future__ import annotations

import json
import os
import re
import urllib.parse

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy.errors import BadRequest, NotFound, UnsupportedMediaType
from proxy.server.chat import CHAT, chat_completions
from proxy.server.completions import COMPLETIONS, completions
from proxy.server.connections import read_body
from proxy.server.exchange import outgoing, relay_unchanged
from proxy.server.moderations import MODERATIONS_PATH, moderations
from proxy.server.responses import RESPONSES, relay_stored, responses
from proxy.server.shutdown import DRAIN
from proxy.server.state import METRICS, POLICIES, READINESS, SETTINGS, TENANTS, UPSTREAMS, bind_tenant, record_of
from proxy.streaming.buffered import hold_body
from proxy.upstream.relay import Outgoing


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def readiness_of(app: web.Application) -> dict[str, object]:
    """`status`: ready, or not: loading, failed (`error`), draining."""
    readiness, drain = app[READINESS], app.get(DRAIN)
    if drain is not None and drain.draining:
        return {"status": "draining"}
    if readiness.ready:
        return {"status": "ready"}
    return {"status": "loading" if readiness.error is None else "failed", "error": readiness.error}


async def readyz(request: web.Request) -> web.Response:
    """503 while guards load, after they failed, and from the moment a shutdown starts (load
    balancers stop sending before the listener closes). `pid`: which `--workers` process answered."""
    body = {**readiness_of(request.app), "pid": os.getpid()}
    return web.json_response(body, status=200 if body["status"] == "ready" else 503)


async def metrics(request: web.Request) -> web.Response:
    m = request.app[METRICS]
    m.ready.set(1 if readiness_of(request.app)["status"] == "ready" else 0)
    return web.Response(body=generate_latest(m.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def models(request: web.Request) -> web.StreamResponse:
    """The model list of the upstream named by `server.models_upstream` (default: the tenant's first
    chat route's upstream)."""
    record = record_of(request)
    tenant = request.app[TENANTS].identify(request)
    bind_tenant(request, tenant.name)
    policy = request.app[POLICIES].current.get(tenant.policy)
    record.policy = policy.tag
    upstreams = request.app[UPSTREAMS]
    name = request.app[SETTINGS].server.models_upstream
    if name is None:
        route = policy.resolve(CHAT.path, None)
        name = route.upstream if route is not None else next(iter(upstreams))
    upstream = upstreams[name]
    record.upstream = name
    chat_route = policy.resolve(CHAT.path, None)
    out = Outgoing(
        path="/models",
        body=b"",
        payload=None,
        stream=False,
        client_headers=request.headers,
        client_key=tenant.key,
        request_id=record.request_id,
        method="GET",
        forward_headers=chat_route.forward_headers if chat_route is not None and chat_route.upstream == name else (),
    )
    async with upstream.open(out) as reply:
        body = await hold_body(reply.chunks(), request.app[SETTINGS].server.max_held_bytes)
        return relay_unchanged(
            reply.status,
            body,
            dict(reply.headers),
            {"x-request-id": record.request_id, "x-guardrail-policy": policy.tag},
            "allow",
        )


# Percent-encoded characters that would change what the path means once an upstream (or a gateway in
# front of it) decodes it: a separator that climbs out of the route, a query, a fragment, a NUL.
_ENCODED_SEPARATOR = re.compile(r"%(2f|5c|3f|23|00)", re.IGNORECASE)
# RFC 3986 path characters that need no encoding (no '%'): what is checked is what goes on the wire.
_PATH = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=:@/-]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def safe_path(request: web.Request) -> str:
    """The passthrough target relative to the upstream's base URL: the validated path, and the query
    string re-encoded from its decoded pairs so that it can never end the path or add a fragment.
    A path that could leave its route upstream is a 400, never normalised into something else."""
    raw_path = request.raw_path.partition("?")[0]
    decoded = (request.path, urllib.parse.unquote(raw_path, errors="replace"))
    if (
        _ENCODED_SEPARATOR.search(raw_path)
        or not all(_PATH.fullmatch(p) for p in decoded)
        or any(seg in (".", "..") for p in decoded for seg in p.split("/"))
        or any("//" in p for p in decoded)
    ):
        raise BadRequest(
            "The request path is not allowed: it holds dot segments, empty segments, encoded separators, "
            "backslashes, control characters or characters that need percent-encoding."
        )
    pairs = list(request.rel_url.query.items())
    if any(_CONTROL.search(k) or _CONTROL.search(v) for k, v in pairs):
        raise BadRequest("The query string holds control characters.")
    query = urllib.parse.urlencode(pairs, quote_via=urllib.parse.quote)
    return request.path.removeprefix("/v1") + (f"?{query}" if query else "")


async def passthrough(request: web.Request) -> web.StreamResponse:
    record = record_of(request)
    tenant = request.app[TENANTS].identify(request)
    bind_tenant(request, tenant.name)
    target = safe_path(request)
    policy = request.app[POLICIES].current.get(tenant.policy)
    record.policy = policy.tag
    raw = await read_body(request)
    model = None
    if raw and request.content_type == "application/json":
        try:
            payload = json.loads(raw)
        except ValueError as exc:
            raise UnsupportedMediaType("The request body is not valid JSON.") from exc
        model = payload.get("model") if isinstance(payload, dict) else None
    route = policy.resolve(request.path, model if isinstance(model, str) else None)
    if route is None or not route.passthrough:
        raise NotFound(
            f"Unknown path {request.path}: this proxy screens chat completions, responses, completions and "
            "moderations, and forwards other paths only where the policy allows passthrough."
        )
    record.route, record.upstream = route.name, route.upstream
    upstream = request.app[UPSTREAMS][route.upstream]
    out = outgoing(request, route, tenant.key, target, raw)
    headers = {"x-request-id": record.request_id, "x-guardrail-policy": policy.tag, "x-guardrail-decision": "allow"}
    async with upstream.open(out) as reply:
        response = web.StreamResponse(status=reply.status, headers=headers)
        response.content_type = reply.headers.get("content-type", "application/octet-stream").split(";")[0]
        await response.prepare(request)
        async for chunk in reply.chunks():
            await response.write(chunk)
        await response.write_eof()
        return response


async def stored_response(request: web.Request) -> web.StreamResponse:
    """A stored response's paths (retrieve, delete, input_items, cancel): proxy/server/responses.py."""
    return await relay_stored(request, safe_path(request))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_post(CHAT.path, chat_completions)
    app.router.add_post(COMPLETIONS.path, completions)
    app.router.add_get("/v1/models", models)
    app.router.add_post(RESPONSES.path, responses)
    app.router.add_route("*", r"/v1/responses/{tail:[\s\S]*}", stored_response)
    app.router.add_post(MODERATIONS_PATH, moderations)
    app.router.add_route("*", r"/v1/{tail:[\s\S]*}", passthrough)  # any character: safe_path decides
