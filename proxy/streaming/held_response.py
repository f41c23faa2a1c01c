"""The client side of a buffered stream: headers wait for the decision, unless the first keep-alive
is due first; then they go out with `x-guardrail-decision: deferred` and SSE comments keep the
connection alive until the checked reply (or the refusal, or a final error event) is sent."""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType

from aiohttp import web

from proxy.errors import ProxyError
from proxy.streaming.sse import DONE, KEEPALIVE, encode

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


class HeldResponse:
    def __init__(self, request: web.Request, headers: dict[str, str], interval_s: float) -> None:
        self.request = request
        self.headers = {**SSE_HEADERS, **headers}
        self.interval_s = interval_s
        self.response: web.StreamResponse | None = None
        self.keepalives_sent = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def prepared(self) -> bool:
        return self.response is not None

    async def __aenter__(self) -> HeldResponse:
        self._task = asyncio.create_task(self._keepalive())
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop_keepalive()

    async def _prepare(self, decision: str) -> web.StreamResponse:
        if self.response is None:
            response = web.StreamResponse(status=200, headers={**self.headers, "x-guardrail-decision": decision})
            await response.prepare(self.request)
            self.response = response
        return self.response

    async def _keepalive(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            response = await self._prepare("deferred")
            await response.write(KEEPALIVE)
            self.keepalives_sent += 1

    async def stop_keepalive(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def send(self, chunks: list[bytes], decision: str) -> web.StreamResponse:
        await self.stop_keepalive()
        deferred = self.prepared
        response = await self._prepare(decision)
        if deferred:
            # The headers already left; say the decision as a comment the SDKs ignore.
            await response.write(f": x-guardrail-decision={decision}\n\n".encode())
        for chunk in chunks:
            await response.write(chunk)
        await response.write_eof()
        return response

    async def send_error(self, error: ProxyError) -> web.StreamResponse:
        """Before the headers: a normal JSON error. After: one final error event, then [DONE]."""
        await self.stop_keepalive()
        if self.response is None:
            raise error
        await self.response.write(encode(error.body()))
        await self.response.write(DONE)
        await self.response.write_eof()
        return self.response
