"""Client connections, before and around the request path: a cap on open connections, a deadline
for a request's headers and one for its body, so a client that stops sending holds nothing for long.

Past `max_connections` a new connection is closed at once, without an HTTP answer: reading a request
in order to refuse it is the work the cap exists to bound (the OpenAI SDK retries connection errors).
"""

from __future__ import annotations

import asyncio

import structlog
from aiohttp import StreamReader, web
from aiohttp.typedefs import Handler
from yarl import URL

from proxy.errors import RequestTimeout
from proxy.guards.guard import GuardError
from proxy.observability import Metrics
from proxy.server.shutdown import (
    CUT_WAIT_S,
    DRAIN,
    Drain,
    StopSignals,
    close_when_draining,
    drain_server,
    drained,
)
from proxy.server.state import METRICS, READINESS, SETTINGS
from proxy.server.workers import watch_parent
from proxy.settings import ServerSettings

log = structlog.get_logger("proxy.connections")
READY_POLL_S = 0.05
BODY_GRACE_S = 1.0  # time for a handler's own 408 (read_body) to go out before the connection is cut


class ConnectionLimits:
    """Counts the open connections of one process and admits new ones up to the cap."""

    def __init__(self, settings: ServerSettings, metrics: Metrics) -> None:
        self.max_connections = settings.max_connections
        self.header_timeout_s = settings.header_timeout_s
        self.body_timeout_s = settings.body_timeout_s
        self.metrics = metrics
        self.open = 0
        self._full = False

    def admit(self) -> bool:
        if self.open >= self.max_connections:
            self.metrics.connections_rejected.labels("max_connections").inc()
            if not self._full:  # once per episode, not once per refused connection
                self._full = True
                log.warning("max_connections_reached", max_connections=self.max_connections)
            return False
        self.open += 1
        self.metrics.open_connections.inc()
        return True

    def release(self) -> None:
        self.open -= 1
        self.metrics.open_connections.dec()
        if self.open <= self.max_connections * 3 // 4:
            self._full = False


class Connection(asyncio.Protocol):
    """aiohttp's protocol for one connection, behind the cap and two deadlines.

    Between requests (from the connection's start, and from the end of each request until the next
    one's headers are complete) the header deadline runs; a response still leaving the write buffer
    postpones it: a client reading slowly is not a client that stopped sending. While a request is
    handled, its body must be complete by `body_deadline`: `read_body` answers 408 then, and a
    handler that reads the body some other way has its connection closed BODY_GRACE_S later.
    """

    def __init__(self, inner: asyncio.Protocol, limits: ConnectionLimits) -> None:
        self._inner = inner
        self._limits = limits
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._handling = False
        self._answered_408 = False
        self.body_deadline = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        if not self._limits.admit():
            transport.close()
            return
        self._transport = transport
        self._between_requests()
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is None:
            return  # refused at the cap: aiohttp never saw it
        self._transport = None
        self._cancel_timer()
        self._limits.release()
        self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def request_started(self, request: web.Request) -> None:
        self._handling = True
        self._cancel_timer()
        loop = asyncio.get_running_loop()
        self.body_deadline = loop.time() + self._limits.body_timeout_s
        self._timer = loop.call_at(self.body_deadline + BODY_GRACE_S, self._body_late, request.content)

    def request_finished(self) -> None:
        self._handling = False
        if self._transport is not None:
            self._between_requests()

    def answered_408(self) -> None:
        """The header deadline that follows closes the connection, counted once (as body_timeout)."""
        self._answered_408 = True

    def _between_requests(self) -> None:
        self._cancel_timer()
        self._timer = asyncio.get_running_loop().call_later(self._limits.header_timeout_s, self._headers_late)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _headers_late(self) -> None:
        self._timer = None
        transport = self._transport
        if transport is None or self._handling or transport.is_closing():
            return
        if transport.get_write_buffer_size():
            self._between_requests()
            return
        if not self._answered_408:
            self._limits.metrics.connections_rejected.labels("header_timeout").inc()
        transport.close()

    def _body_late(self, body: StreamReader) -> None:
        self._timer = None
        if self._transport is None or body.is_eof():
            return
        self._limits.metrics.connections_rejected.labels("body_timeout").inc()
        self._transport.close()  # the handler is cancelled (handler_cancellation)


@web.middleware
async def track_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Tells the connection a request's headers are complete (the body deadline starts) and when
    the handler is done (the deadline for the next request's headers starts); counts the request
    as in flight for a graceful shutdown (proxy/server/shutdown.py)."""
    connection = connection_of(request)
    drain = request.app.get(DRAIN)
    if connection is not None:
        connection.request_started(request)
    try:
        if drain is None:
            return await handler(request)  # served without start_server
        return await drained(request, handler, drain)
    finally:
        if connection is not None:
            connection.request_finished()


def connection_of(request: web.Request) -> Connection | None:
    transport = request.transport
    protocol = transport.get_protocol() if transport is not None else None
    return protocol if isinstance(protocol, Connection) else None


async def read_body(request: web.Request) -> bytes:
    """The whole request body, or 408 when it has not arrived within `body_timeout_s` of the headers."""
    timeout_s = request.app[SETTINGS].server.body_timeout_s
    connection = connection_of(request)
    deadline = connection.body_deadline if connection is not None else asyncio.get_running_loop().time() + timeout_s
    try:
        async with asyncio.timeout_at(deadline):
            return await request.read()
    except TimeoutError as exc:
        request.app[METRICS].connections_rejected.labels("body_timeout").inc()
        if connection is not None:
            connection.answered_408()
        raise RequestTimeout(f"The request body did not arrive within {timeout_s:g} seconds.") from exc


class ConnectionSite(web.BaseSite):
    """A TCP site like aiohttp's TCPSite, whose connections go through ConnectionLimits."""

    def __init__(
        self, runner: web.BaseRunner, host: str, port: int, limits: ConnectionLimits, *, reuse_port: bool = False
    ) -> None:
        super().__init__(runner)
        self._host, self._port = host, port
        self._limits = limits
        self._reuse_port = reuse_port
        self._listening: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The bound port once started (useful with port 0)."""
        if self._listening is not None and self._listening.sockets:
            return int(self._listening.sockets[0].getsockname()[1])
        return self._port

    @property
    def name(self) -> str:
        return str(URL.build(scheme="http", host=self._host, port=self.port))

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        limits = self._limits
        self._server = self._listening = await asyncio.get_running_loop().create_server(
            lambda: Connection(server(), limits),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_port=self._reuse_port,
        )


async def start_server(
    app: web.Application, host: str, port: int, *, reuse_port: bool = False, shutdown_timeout_s: float = 60.0
) -> tuple[web.AppRunner, ConnectionSite]:
    """Start `app` on host:port behind the connection limits of its settings; the caller cleans up
    the runner. Used by `serve` and by the tests, so both run the same server. `reuse_port`: several
    processes share the port (`serve --workers`): then the port is bound once the guards are loaded;
    `shutdown_timeout_s`: how long the runner's cleanup
    waits for a request still running before it cancels it."""
    app[DRAIN] = Drain()
    app.on_response_prepare.append(close_when_draining)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=shutdown_timeout_s)
    await runner.setup()
    if reuse_port:
        try:
            await guards_loaded(app)
        except BaseException:
            await runner.cleanup()
            raise
    limits = ConnectionLimits(app[SETTINGS].server, app[METRICS])
    site = ConnectionSite(runner, host, port, limits, reuse_port=reuse_port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, site


async def guards_loaded(app: web.Application) -> None:
    """A process that shares its port joins the kernel's group only once its guards are loaded: the
    kernel would hand it new connections at once, and each would get 503 not_ready until then."""
    readiness = app[READINESS]
    while not readiness.ready:
        if readiness.error is not None:
            raise GuardError(f"guards failed to load: {readiness.error}")
        await asyncio.sleep(READY_POLL_S)


async def run_server(
    app: web.Application, host: str, port: int, *, reuse_port: bool = False, supervised: bool = False
) -> int:
    """Serve until SIGTERM or SIGINT, then shut down gracefully (proxy/server/shutdown.py); returns the
    exit status. `supervised`: a worker of `serve --workers`, which also stops when its parent is gone."""
    signals = StopSignals()  # before the startup: a stop during it is a stop, not a kill
    watcher = asyncio.create_task(watch_parent(signals.stop)) if supervised else None
    try:
        runner, site = await start_server(app, host, port, reuse_port=reuse_port, shutdown_timeout_s=CUT_WAIT_S)
        listened = signals.received is None  # a stop during the startup: no load balancer saw this process
        try:
            sig = await signals.wait()
            return await drain_server(app, runner, site, sig, grace=listened and app[READINESS].ready)
        finally:
            await runner.cleanup()
    finally:
        if watcher is not None:
            watcher.cancel()
        signals.remove()
