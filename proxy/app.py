"""build_app: the aiohttp application with its long-lived parts (settings, policies, guards,
upstreams, metrics) as typed app state, started and stopped in one cleanup context."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
from collections.abc import AsyncIterator, Callable, Mapping

import aiohttp
import structlog
from aiohttp import web

from proxy import telemetry
from proxy.guards.guard import Guard, TextGuard
from proxy.guards.loading import GuardSet
from proxy.observability import Metrics
from proxy.policy.store import GuardKind, PolicyContext, PolicyStore
from proxy.server.auth import Tenants
from proxy.server.connections import run_server, track_requests
from proxy.server.middleware import record_middleware
from proxy.server.routes import add_routes
from proxy.server.state import (
    GUARDS,
    METRICS,
    POLICIES,
    READINESS,
    RESPONSE_STATE,
    SETTINGS,
    TENANTS,
    UPSTREAMS,
    Readiness,
)
from proxy.server.workers import Supervisor, worker_command
from proxy.settings import Settings
from proxy.state import build_store
from proxy.upstream.relay import OpenAIUpstream, Upstream
from proxy.yaml_source import ConfigError

log = structlog.get_logger("proxy.app")


def guard_kinds(settings: Settings, guards: Mapping[str, Guard] | None) -> dict[str, GuardKind]:
    if guards is not None:
        return {name: ("text" if isinstance(g, TextGuard) else "conversation") for name, g in guards.items()}
    return {name: ("text" if g.is_prompt_guard else "conversation") for name, g in settings.guards.items()}


def build_app(
    settings: Settings, *, guards: Mapping[str, Guard] | None = None, upstreams: Mapping[str, Upstream] | None = None
) -> web.Application:
    """`guards` and `upstreams` replace the configured ones (tests inject scripted fakes here)."""
    tenants = Tenants(settings.tenants)
    ctx = PolicyContext(
        guards=guard_kinds(settings, guards), upstreams=frozenset(settings.upstreams), required=tenants.policies
    )
    store = PolicyStore(settings.policies_dir, ctx, reload_interval_s=settings.server.policy_reload_interval_s)
    app = web.Application(
        middlewares=[track_requests, record_middleware], client_max_size=settings.server.max_body_bytes
    )
    app[SETTINGS] = settings
    app[TENANTS] = tenants
    app[POLICIES] = store
    app[METRICS] = Metrics()
    app[READINESS] = Readiness()
    app[GUARDS] = dict(guards or {})
    app[UPSTREAMS] = dict(upstreams or {})
    app.cleanup_ctx.append(_lifecycle(guards is not None, upstreams is not None))
    telemetry.setup(app, settings)
    add_routes(app)
    return app


def _lifecycle(guards_injected: bool, upstreams_injected: bool) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        app[RESPONSE_STATE] = build_store(settings.state, app[METRICS])
        session = aiohttp.ClientSession(auto_decompress=True)
        if not upstreams_injected:
            app[UPSTREAMS] = build_upstreams(settings, session)
        litellm_models = [
            (u.provider_model_prefix or "") + "warm-up" for u in settings.upstreams.values() if u.kind == "litellm"
        ]
        if litellm_models:
            from proxy.upstream.litellm_adapter import prepare_litellm

            await prepare_litellm(litellm_models)  # before serving: seconds of imports that must not stall a request
        if app[TENANTS].open:
            log.warning(
                "open_mode",
                message="no tenants configured: single-tenant open mode, every request "
                "uses policy 'default' and no API key is checked",
            )
        watcher = asyncio.create_task(app[POLICIES].watch())
        app[METRICS].policy_reload_failures.set_function(lambda: app[POLICIES].reload_failures)
        guard_set = None if guards_injected else GuardSet(settings)
        loader = _start_guards(app, guard_set)
        try:
            yield
        finally:
            for task in (watcher, loader):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            if guard_set is not None:
                await guard_set.stop()
            await session.close()
            await app[RESPONSE_STATE].close()

    return lifecycle


def _start_guards(app: web.Application, guard_set: GuardSet | None) -> asyncio.Task[None] | None:
    """Injected guards are ready at once; configured ones load in the background (/readyz waits)."""
    if guard_set is None:
        app[READINESS].ready = True
        return None
    for runner in guard_set.runner_list:
        depth = app[METRICS].queue_depth.labels(runner.device)
        depth.set_function(lambda r=runner: float(r.queue_depth))  # type: ignore[misc]
        rejections = app[METRICS].queue_rejections
        runner.on_reject = lambda reason, d=runner.device, m=rejections: m.labels(d, reason).inc()
    for name, guard in guard_set.guards.items():
        _watch_caches(app[METRICS], name, guard)
    return asyncio.create_task(_load(app, guard_set))


def _watch_caches(metrics: Metrics, name: str, guard: Guard) -> None:
    """A guard's prefix and verdict caches report to /metrics (counted in the runner's thread)."""
    verdicts = getattr(guard, "verdicts", None)
    if verdicts is not None:
        lookups = metrics.verdict_cache

        def looked_up(result: str) -> None:
            lookups.labels(name, result).inc()
            telemetry.note_cache_lookup(result)

        verdicts.observe = looked_up
    prefix = getattr(guard, "prefix_cache", None)
    if prefix is None:
        return
    metrics.prefix_cache_bytes.labels(name).set_function(lambda: float(prefix.bytes_held))
    tokens, evictions = metrics.prefix_cache_tokens, metrics.prefix_cache_evictions.labels(name)

    def observe(kind: str, count: int) -> None:
        if kind == "evicted":
            evictions.inc(count)
        else:
            tokens.labels(name, kind).inc(count)

    prefix.observe = observe


async def _load(app: web.Application, guard_set: GuardSet) -> None:
    try:
        loaded = await guard_set.load()
    except Exception as exc:
        app[READINESS].error = str(exc)
        log.error("guards_failed_to_load", error=str(exc))
        return
    app[GUARDS].update(loaded)
    # The models' objects live as long as the process: out of the collector's sight they cost
    # nothing in the full collections that run on the event loop (hundreds of ms otherwise).
    gc.freeze()
    app[READINESS].ready = True
    log.info("guards_ready", guards=sorted(loaded))


def build_upstreams(settings: Settings, session: aiohttp.ClientSession) -> dict[str, Upstream]:
    out: dict[str, Upstream] = {}
    for name, upstream in settings.upstreams.items():
        if upstream.kind == "litellm":
            from proxy.upstream.litellm_adapter import LiteLLMUpstream

            out[name] = LiteLLMUpstream(name, upstream)
        else:
            out[name] = OpenAIUpstream(name, upstream, session)
    return out


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve anywhere


def check_open_mode(settings: Settings, host: str) -> None:
    """Open mode (no tenants: no key checked, the operator's upstream key spent for anyone) is for a
    loopback bind only, unless the config says `server.allow_open_mode: true`."""
    if settings.tenants or settings.server.allow_open_mode or is_loopback(host):
        return
    raise ConfigError(
        [
            f"refusing open mode on {host!r}: no tenants are configured, so anyone who reaches this address "
            "would use the upstream's key. Configure tenants (keys: ['env:GUARDRAIL_API_KEY']), bind to "
            "127.0.0.1, or set server.allow_open_mode: true"
        ]
    )


async def serve(settings: Settings, host: str | None = None, port: int | None = None, *, worker: bool = False) -> int:
    """Serve until SIGTERM / SIGINT, then drain (proxy/server/shutdown.py); the exit status. A client
    disconnect cancels its handler (and so the upstream request). `worker`: one of `serve --workers`."""
    host = host or settings.server.host
    check_open_mode(settings, host)
    app = build_app(settings)
    port = port if port is not None else settings.server.port
    log.info("serving", host=host, port=port, worker=worker)
    # connection cap, header/body deadlines and the drain: proxy/server/connections.py
    return await run_server(app, host, port, reuse_port=worker, supervised=worker)


async def serve_workers(
    settings: Settings, config: str, workers: int, host: str | None = None, port: int | None = None
) -> int:
    """`serve --workers N`: N processes of `serve` on one port (proxy/server/workers.py)."""
    host = host or settings.server.host
    check_open_mode(settings, host)
    port = port if port is not None else settings.server.port
    if port == 0:
        raise ConfigError(["--workers needs a fixed port: with port 0 each worker would bind a port of its own"])
    log.info("serving", host=host, port=port, workers=workers)
    return await Supervisor(worker_command(config, host, port), workers).run()
