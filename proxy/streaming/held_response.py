"""The client side of a held stream: headers wait for the decision, unless the first keep-alive (or,
in incremental mode, the first checked event) is due first; then they go out with
`x-guardrail-decision: deferred` and SSE comments keep the connection alive until the checked reply
(or the refusal, or a final error event) is sent.

Once its headers are out, this object is the only writer of the response: any failure, inside its
block or later in the handler (the middleware hands it over), becomes one final error event and
`data: [DONE]`, never a second HTTP response written into the SSE body."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Iterator
from types import TracebackType

import structlog
from aiohttp import web

from proxy.errors import PolicyViolation, ProxyError
from proxy.streaming.sse import DONE, KEEPALIVE, encode

log = structlog.get_logger("proxy.stream")

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
WRITE_PIECE_BYTES = 64 * 1024
CLIENT_GONE = "client_disconnected"
"""The record's error when the client hung up mid-answer: logged and counted with status 499."""


class HeldResponse:
    def __init__(
        self, request: web.Request, headers: dict[str, str], interval_s: float, first_s: float | None = None
    ) -> None:
        self.request = request
        self.headers = {**SSE_HEADERS, **headers}
        self.interval_s = interval_s
        self.first_s = interval_s if first_s is None else first_s
        """How long the headers wait for the decision before the first keep-alive sends them."""
        self.response: web.StreamResponse | None = None
        self.keepalives_sent = 0
        self.failure: str | None = None
        """The error code of the final error event, when one was sent."""
        self._finished = False
        self._task: asyncio.Task[None] | None = None
        # The first keep-alive is a timer, not a task: most replies are checked before it is due,
        # and a timer costs a tenth of a task's start and cancel.
        self._timer: asyncio.TimerHandle | None = None
        self._writing = asyncio.Lock()  # a keep-alive (or the headers) is never cut in half

    @property
    def prepared(self) -> bool:
        return self.response is not None

    def result(self) -> web.StreamResponse:
        """The response, once its headers went out."""
        if self.response is None:
            raise RuntimeError("the held response was never prepared")
        return self.response

    async def __aenter__(self) -> HeldResponse:
        self.request[HELD] = self
        self._timer = asyncio.get_running_loop().call_later(self.first_s, self._start_keepalive)
        return self

    def _start_keepalive(self) -> None:
        self._timer = None
        self._task = asyncio.create_task(self._keepalive())

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        """After the headers, an exception ends the stream with an error event and is swallowed;
        before them it goes on to the middleware, which answers with a JSON error."""
        await self.stop_keepalive()
        if not isinstance(exc, Exception) or self.response is None:
            return False
        await self.fail(exc)
        return True

    async def _prepare(self, decision: str) -> web.StreamResponse:
        if self.response is None:
            response = web.StreamResponse(status=200, headers={**self.headers, "x-guardrail-decision": decision})
            await response.prepare(self.request)
            self.response = response
        return self.response

    async def _keepalive(self) -> None:
        try:
            while True:
                async with self._writing:
                    response = await self._prepare("deferred")
                    await response.write(KEEPALIVE)
                self.keepalives_sent += 1
                await asyncio.sleep(self.interval_s)
        except ConnectionError:
            return  # the client went away; the handler's next write says so

    async def stop_keepalive(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task, self._task = self._task, None
        if task is None:
            return
        async with self._writing:
            task.cancel()
        await asyncio.wait([task])  # unlike awaiting the task, never swallows our own cancellation

    async def write(self, data: bytes) -> None:
        """Send checked events before the end (incremental streams): the headers, if still held, leave
        with `x-guardrail-decision: deferred`; keep-alives go on between writes."""
        async with self._writing:
            response = await self._prepare("deferred")
            await response.write(data)

    async def send(self, chunks: Iterable[bytes], decision: str) -> web.StreamResponse:
        await self.stop_keepalive()
        deferred = self.prepared
        response = await self._prepare(decision)
        if deferred:
            # The headers already left; say the decision as a comment the SDKs ignore.
            await response.write(f": x-guardrail-decision={decision}\n\n".encode())
        for piece in _pieces(chunks):
            await response.write(piece)
        await response.write_eof()
        self._finished = True
        return response

    async def send_error(self, error: ProxyError) -> web.StreamResponse:
        """Before the headers: a normal JSON error. After: the decision as a comment (as `send` says
        it), then one final error event with the same envelope and code as the JSON error, then [DONE]."""
        await self.stop_keepalive()
        if self.response is None:
            raise error
        decision = "block" if isinstance(error, PolicyViolation) else "error"
        with contextlib.suppress(ConnectionError):  # `fail` below records the disconnect
            await self.response.write(f": x-guardrail-decision={decision}\n\n".encode())
        return await self.fail(error)

    async def fail(self, exc: BaseException) -> web.StreamResponse:
        """End a prepared stream for any failure: a ProxyError says what went wrong, anything else
        is logged with its traceback and told to the client only as an internal error."""
        await self.stop_keepalive()
        response = self.result()
        if self._finished:
            return response
        self._finished = True
        if isinstance(exc, ConnectionError):
            self.failure = CLIENT_GONE
            return response
        if isinstance(exc, ProxyError):
            error = exc
        else:
            log.error("unhandled_error", exc_info=exc, path=self.request.path)
            error = ProxyError("The proxy failed to handle the request.")
        self.failure = error.code
        try:
            await response.write(encode(error.body()) + DONE)
            await response.write_eof()
        except ConnectionError:
            self.failure = CLIENT_GONE
        return response


HELD = web.RequestKey("held_response", HeldResponse)


def _pieces(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Many small events joined into fewer writes of about WRITE_PIECE_BYTES."""
    batch: list[bytes] = []
    size = 0
    for chunk in chunks:
        batch.append(chunk)
        size += len(chunk)
        if size >= WRITE_PIECE_BYTES:
            yield b"".join(batch)
            batch, size = [], 0
    if batch:
        yield b"".join(batch)
