"""The proxy's routes besides chat: health, readiness, metrics, model list, and the explicit
passthrough of other `/v1/*` paths (unscreened, only where a policy route says `passthrough: true`)."""

from __future__ import annotations

import json

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy.errors import NotFound, UnsupportedMediaType
from proxy.server.chat import CHAT_PATH, chat_completions, relay_unchanged
from proxy.server.state import METRICS, POLICIES, READINESS, SETTINGS, TENANTS, UPSTREAMS, bind_tenant, record_of
from proxy.upstream.relay import Outgoing


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    readiness = request.app[READINESS]
    if readiness.ready:
        return web.json_response({"status": "ready"})
    body = {"status": "loading" if readiness.error is None else "failed", "error": readiness.error}
    return web.json_response(body, status=503)


async def metrics(request: web.Request) -> web.Response:
    m = request.app[METRICS]
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
        route = policy.resolve(CHAT_PATH, None)
        name = route.upstream if route is not None else next(iter(upstreams))
    upstream = upstreams[name]
    record.upstream = name
    out = Outgoing(
        path="/models",
        body=b"",
        payload=None,
        stream=False,
        client_headers=request.headers,
        client_key=tenant.key,
        request_id=record.request_id,
        method="GET",
    )
    async with upstream.open(out) as reply:
        body = await reply.body()
        return relay_unchanged(
            reply.status,
            body,
            dict(reply.headers),
            {"x-request-id": record.request_id, "x-guardrail-policy": policy.tag},
            "allow",
        )


async def passthrough(request: web.Request) -> web.StreamResponse:
    record = record_of(request)
    tenant = request.app[TENANTS].identify(request)
    bind_tenant(request, tenant.name)
    policy = request.app[POLICIES].current.get(tenant.policy)
    record.policy = policy.tag
    raw = await request.read()
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
            f"Unknown path {request.path}: this proxy screens /v1/chat/completions and forwards "
            "other paths only where the policy allows passthrough."
        )
    record.route, record.upstream = route.name, route.upstream
    upstream = request.app[UPSTREAMS][route.upstream]
    out = Outgoing(
        path=request.path.removeprefix("/v1"),
        body=raw,
        payload=None,
        stream=False,
        client_headers=request.headers,
        client_key=tenant.key,
        request_id=record.request_id,
        method=request.method,
    )
    headers = {"x-request-id": record.request_id, "x-guardrail-policy": policy.tag, "x-guardrail-decision": "allow"}
    async with upstream.open(out) as reply:
        response = web.StreamResponse(status=reply.status, headers=headers)
        response.content_type = reply.headers.get("content-type", "application/octet-stream").split(";")[0]
        await response.prepare(request)
        async for chunk in reply.chunks():
            await response.write(chunk)
        await response.write_eof()
        return response


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_post(CHAT_PATH, chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_route("*", "/v1/{tail:.*}", passthrough)
