"""Typed app state: everything long-lived hangs off the aiohttp app under these keys."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from proxy.guards.guard import Guard
from proxy.guards.runner import current_tenant
from proxy.observability import Metrics
from proxy.policy.store import PolicyStore
from proxy.server.auth import Tenants
from proxy.settings import Settings
from proxy.state import ResponseStore
from proxy.upstream.relay import Upstream


@dataclass
class Readiness:
    ready: bool = False
    error: str | None = None


SETTINGS = web.AppKey("settings", Settings)
POLICIES = web.AppKey("policies", PolicyStore)
GUARDS = web.AppKey("guards", dict[str, Guard])
UPSTREAMS = web.AppKey("upstreams", dict[str, Upstream])
METRICS = web.AppKey("metrics", Metrics)
TENANTS = web.AppKey("tenants", Tenants)
READINESS = web.AppKey("readiness", Readiness)
RESPONSE_STATE = web.AppKey("response_state", ResponseStore)


@dataclass
class Record:
    """What one request did; logged as one JSON line and counted in metrics when it ends."""

    request_id: str = field(default_factory=lambda: "req_" + uuid.uuid4().hex[:24])
    started: float = field(default_factory=time.perf_counter)
    tenant: str | None = None
    route: str | None = None
    policy: str | None = None
    model: str | None = None
    stream: bool | None = None
    decision: str = "allow"
    status: int = 0
    checks: list[dict[str, Any]] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    upstream: str | None = None
    upstream_ms: float | None = None
    error: str | None = None
    unscreened: list[str] | None = None
    context: str | None = None
    """Responses API: `stored` when a previous response's turns were judged with the request,
    `unknown` when the request named one the state store did not know."""
    prompt: Any = None
    completion: Any = None

    def fields(self) -> Mapping[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if v is not None and k not in ("started",)}
        if self.model is not None:
            out["model"] = loggable(self.model)  # the client's string: may be huge or hold control characters
        out["latency_ms"] = round((time.perf_counter() - self.started) * 1000, 2)
        if not self.checks:
            out.pop("checks", None)
        if not self.categories:
            out.pop("categories", None)
        return out


def loggable(text: str, limit: int = 64) -> str:
    """A client-chosen string fit for a log line: at most `limit` characters, anything non-printable
    (controls, invisible format characters, lone surrogates) escaped, the length noted when cut."""
    head = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text[:limit])
    return head if len(text) <= limit else f"{head}...({len(text)} chars)"


RECORD = web.RequestKey("record", Record)


def bind_tenant(request: web.Request, tenant: str) -> None:
    """Record the tenant, bind it into every later log line of this request, and tell the guard
    runner whose jobs this request queues (its per-tenant queue share)."""
    import structlog

    record_of(request).tenant = tenant
    structlog.contextvars.bind_contextvars(tenant=tenant)
    current_tenant.set(tenant)


def record_of(request: web.Request) -> Record:
    rec = request.get(RECORD)
    if rec is None:
        rec = Record()
        request[RECORD] = rec
    return rec
