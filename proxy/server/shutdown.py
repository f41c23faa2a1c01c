"""Graceful shutdown of one serving process, around the request path: on SIGTERM `/readyz` answers
503 at once, the listening socket closes after `shutdown_grace_s` (load balancers see the 503 before
connections are refused), requests in flight finish within `drain_timeout_s`, and the process exits 0.

Past the deadline what is left is cut: a held stream whose headers went out ends with one final error
event (`shutting_down`) and `data: [DONE]`, never with the unchecked text it held; a request with no
response yet gets a 503 with `Retry-After`; the process then exits EXIT_CUT. SIGINT (an interactive
stop) skips the grace period, as does a stop before `/readyz` ever said ready. A repeated signal
changes nothing (a supervisor or a cgroup kill may deliver the same stop twice); SIGKILL is the way
to stop at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from proxy.errors import ShuttingDown
from proxy.server.middleware import error_response
from proxy.server.state import SETTINGS, record_of
from proxy.streaming.held_response import HELD, HeldResponse

log = structlog.get_logger("proxy.shutdown")

EXIT_DRAINED = 0
EXIT_CUT = 3
"""Exit status when the drain deadline passed and requests were cut."""
CUT_WAIT_S = 2.0  # for the cut requests' last writes (error events, 503s) to a client that may not read
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Drain:
    """The requests in flight in one process, and how far its shutdown has gone."""

    def __init__(self) -> None:
        self.draining = False
        self.cutting = False
        self._active: set[asyncio.Task[object]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def in_flight(self) -> int:
        return len(self._active)

    @contextlib.contextmanager
    def tracking(self, task: asyncio.Task[object]) -> Iterator[None]:
        """One request's handler, from its headers to its response (aiohttp runs one at a time per task)."""
        self._active.add(task)
        self._idle.clear()
        try:
            yield
        finally:
            self._active.discard(task)
            if not self._active:
                self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def cut(self) -> int:
        """Cancel every handler still running; the request middleware answers each one's client."""
        self.cutting = True
        tasks = list(self._active)
        for task in tasks:
            task.cancel()
        await self.wait_idle(CUT_WAIT_S)
        return len(tasks)


DRAIN = web.AppKey("drain", Drain)


async def drained(request: web.Request, handler: Handler, drain: Drain) -> web.StreamResponse:
    """Run one request's handler as in flight; when the cut cancels it, answer its client."""
    task = asyncio.current_task()
    assert task is not None
    with drain.tracking(task):
        try:
            response = await handler(request)
        except asyncio.CancelledError:
            if not drain.cutting or not answerable(request):
                raise  # a client disconnect, or a passthrough relay that already sent bytes: cut the connection
            task.uncancel()
            return await answer_cut(request)
    return response


async def close_when_draining(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: once draining, every response says `Connection: close`, so a client's next
    request opens a new connection (to a process that stays) instead of racing the close of this one."""
    drain = request.app.get(DRAIN)
    if drain is not None and drain.draining:
        response.force_close()  # the server closes it after this response...
        response.headers["Connection"] = "close"  # ...and says so (the hook runs after aiohttp set the header)


def answerable(request: web.Request) -> bool:
    held = request.get(HELD)
    return (held is not None and held.prepared) or request.writer.output_size == 0


async def answer_cut(request: web.Request) -> web.StreamResponse:
    """A held stream whose headers went out ends with the error event; otherwise a 503."""
    error = ShuttingDown()
    held: HeldResponse | None = request.get(HELD)
    if held is not None and held.prepared:
        return await held.fail(error)
    return error_response(error, record_of(request))


class StopSignals:
    """SIGTERM / SIGINT handlers on the running loop: the first one received starts the shutdown."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._event = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            self._loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.received is None:
            self.received = sig
            self._event.set()
        else:
            log.info("signal_ignored", signal=sig.name, reason="already shutting down")

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Start the shutdown as if `sig` was received (a supervised worker whose parent went away)."""
        self._on_signal(sig)

    async def wait(self) -> signal.Signals:
        await self._event.wait()
        assert self.received is not None
        return self.received

    def remove(self) -> None:
        for sig in STOP_SIGNALS:
            self._loop.remove_signal_handler(sig)


async def drain_server(
    app: web.Application, runner: web.AppRunner, site: web.BaseSite, sig: signal.Signals, *, grace: bool = True
) -> int:
    """Readiness off, the grace period, the listener closed, the drain, and the cut past its deadline:
    the exit status (EXIT_DRAINED or EXIT_CUT). `grace`: False when /readyz never said ready (no load
    balancer sends anything to warn)."""
    settings = app[SETTINGS].server
    drain = app[DRAIN]
    drain.draining = True
    grace_s = settings.shutdown_grace_s if sig == signal.SIGTERM and grace else 0.0
    log.info("draining", signal=sig.name, in_flight=drain.in_flight, grace_s=grace_s,
             drain_timeout_s=settings.drain_timeout_s)  # fmt: skip
    await asyncio.sleep(grace_s)  # the load balancer's time to see /readyz fail; connections still taken
    await site.stop()
    if runner.server is not None:
        runner.server.pre_shutdown()  # idle keep-alive connections close now, busy ones after their response
    log.info("listener_closed", in_flight=drain.in_flight)
    if await drain.wait_idle(settings.drain_timeout_s):
        log.info("drained")
        return EXIT_DRAINED
    cut = await drain.cut()
    log.warning("drain_deadline_passed", cut=cut, drain_timeout_s=settings.drain_timeout_s)
    return EXIT_CUT
