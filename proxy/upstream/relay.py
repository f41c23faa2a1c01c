"""The OpenAI-compatible relay: the client's JSON body goes upstream as is (only fields the route
changes are replaced), the upstream's status and body come back unchanged.

One aiohttp ClientSession serves every upstream. Timeouts: connect, total, and for streams between
chunks (`read_timeout_s`). Leaving the `open()` block early (client gone, check failed) closes the
upstream connection, so the upstream stops generating.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from proxy import telemetry
from proxy.errors import UpstreamError, UpstreamTimeout
from proxy.settings import UpstreamSettings

# Client headers forwarded upstream. Everything else stays at the proxy: a header can select the
# account, organization or project the proxy's key is billed to (OpenAI-Organization, OpenAI-Project),
# or carry anything an upstream or a gateway in front of it acts on. A route adds names with
# `forward_headers`. Content-Type, X-Request-ID, X-Guardrail-Request-ID and Authorization are set by the proxy.
FORWARDED_HEADERS = ("accept", "user-agent")
# Never forwarded, and refused in a route's `forward_headers`: credentials, one-hop headers, and
# headers the proxy sets itself.
NEVER_FORWARDED = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "content-encoding",
        "content-type",
        "expect",
        "authorization",
        "api-key",
        "x-api-key",
        "cookie",
        "set-cookie",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-real-ip",
        "x-request-id",
    }
)
RELAYED_RESPONSE_HEADERS = (
    "content-type",
    "openai-processing-ms",
    "openai-version",
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "retry-after",
)


@dataclass
class Outgoing:
    path: str  # e.g. "/chat/completions" (relative to the upstream base_url)
    body: bytes
    payload: Mapping[str, Any] | None
    stream: bool
    client_headers: Mapping[str, str]
    client_key: str | None
    request_id: str
    method: str = "POST"
    forward_headers: tuple[str, ...] = ()  # lower-case names the route forwards besides FORWARDED_HEADERS


class Reply(Protocol):
    status: int
    headers: Mapping[str, str]

    async def body(self) -> bytes: ...

    def chunks(self) -> AsyncIterator[bytes]: ...


class Upstream(Protocol):
    name: str

    def open(self, out: Outgoing) -> contextlib.AbstractAsyncContextManager[Reply]: ...


class _AiohttpReply:
    def __init__(self, resp: aiohttp.ClientResponse, name: str) -> None:
        self._resp = resp
        self._name = name
        self.status = resp.status
        self.headers: Mapping[str, str] = {
            k.lower(): v for k, v in resp.headers.items() if k.lower() in RELAYED_RESPONSE_HEADERS
        }

    async def body(self) -> bytes:
        try:
            return await self._resp.read()
        except aiohttp.ServerTimeoutError as exc:
            raise UpstreamTimeout(f"upstream {self._name} stopped sending (read timeout)") from exc
        except TimeoutError as exc:
            raise UpstreamTimeout(f"upstream {self._name} did not finish its reply within its total timeout") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"upstream {self._name} broke off its reply: {type(exc).__name__}") from exc

    async def chunks(self) -> AsyncIterator[bytes]:
        # aiohttp raises ServerTimeoutError when `sock_read` passes between chunks, and a plain
        # TimeoutError when the request's `total` time is up.
        try:
            async for chunk in self._resp.content.iter_any():
                yield chunk
        except aiohttp.ServerTimeoutError as exc:
            raise UpstreamTimeout(f"upstream {self._name} stopped sending (read timeout)") from exc
        except TimeoutError as exc:
            raise UpstreamTimeout(f"upstream {self._name} did not finish its reply within its total timeout") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"upstream {self._name} broke off its reply: {type(exc).__name__}") from exc


class OpenAIUpstream:
    def __init__(self, name: str, settings: UpstreamSettings, session: aiohttp.ClientSession) -> None:
        self.name = name
        self.settings = settings
        self.session = session
        self.base_url = settings.base_url.rstrip("/")
        self._key = settings.key()
        # Between chunks is a stream's silence limit only: a non-streamed reply is silent until it is
        # done, so there only the total timeout applies (else a slow but working upstream got 504).
        self._stream_timeout = aiohttp.ClientTimeout(
            total=settings.total_timeout_s, connect=settings.connect_timeout_s, sock_read=settings.read_timeout_s
        )
        self._json_timeout = aiohttp.ClientTimeout(total=settings.total_timeout_s, connect=settings.connect_timeout_s)

    def _headers(self, out: Outgoing) -> dict[str, str]:
        wanted = {*FORWARDED_HEADERS, *out.forward_headers} - NEVER_FORWARDED
        headers = {k: v for k, v in out.client_headers.items() if k.lower() in wanted}
        headers.update(self.settings.headers)
        headers["Content-Type"] = "application/json"
        # Our id under our own name; X-Request-ID only as the client sent it (some servers, e.g.
        # llama-cpp-python's, reject an id that is not a UUID, so the proxy imposes no format).
        headers["X-Guardrail-Request-ID"] = out.request_id
        if out.client_headers.get("x-request-id") == out.request_id:
            headers["X-Request-ID"] = out.request_id
        key = out.client_key if self.settings.forward_client_key else self._key
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _timed_out(self, exc: BaseException) -> str:
        """Say which timeout fired: each means what its name says."""
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return f"upstream {self.name} did not accept a connection within connect_timeout_s"
        if isinstance(exc, aiohttp.SocketTimeoutError):
            return f"upstream {self.name} sent nothing for read_timeout_s (read timeout)"
        return f"upstream {self.name} did not answer within its total timeout ({self.settings.total_timeout_s:g} s)"

    async def _send(self, out: Outgoing, headers: dict[str, str]) -> aiohttp.ClientResponse:
        try:
            return await self.session.request(
                out.method,
                self.base_url + out.path,
                data=_payload(out.body) if out.method != "GET" else None,
                headers=headers,
                timeout=self._stream_timeout if out.stream else self._json_timeout,
                allow_redirects=False,  # a redirect would carry the proxy's key to wherever it points
            )
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout(self._timed_out(exc)) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"upstream {self.name} is unreachable: {type(exc).__name__}") from exc

    @contextlib.asynccontextmanager
    async def open(self, out: Outgoing) -> AsyncIterator[Reply]:
        headers = self._headers(out)
        # Traced, the span's own traceparent replaces any the client sent.
        with telemetry.upstream_call(self.name, out.method, headers) as call:
            resp = await self._send(out, headers)
            call.answered(resp.status)
            if 300 <= resp.status < 400:
                resp.close()
                raise UpstreamError(f"upstream {self.name} answered with a redirect ({resp.status}), never followed")
            try:
                yield _AiohttpReply(resp, self.name)
            finally:
                # Closing (not releasing) drops the connection: an unfinished upstream generation stops.
                resp.close()


LARGE_BODY_BYTES = 1 << 20


def _payload(body: bytes) -> bytes | io.BytesIO:
    """A body over a megabyte (images inline) goes as a stream: aiohttp warns of raw bytes that size."""
    return io.BytesIO(body) if len(body) > LARGE_BODY_BYTES else body


def rewrite_body(raw: bytes, payload: dict[str, Any], changes: Mapping[str, Any]) -> bytes:
    """The body to forward: the client's bytes untouched unless the route changes a field."""
    if not changes or all(payload.get(k) == v for k, v in changes.items()):
        return raw
    return json.dumps({**payload, **changes}, ensure_ascii=False).encode()


async def read_json(reply: Reply) -> Any:
    raw = await reply.body()
    try:
        return raw, json.loads(raw)
    except ValueError as exc:
        raise UpstreamError("upstream returned a reply that is not JSON") from exc


__all__ = [
    "FORWARDED_HEADERS",
    "NEVER_FORWARDED",
    "OpenAIUpstream",
    "Outgoing",
    "Reply",
    "Upstream",
    "read_json",
    "rewrite_body",
]
