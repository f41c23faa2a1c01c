"""The one exception tree of the proxy and its mapping to the OpenAI error envelope.

ProxyError
  BadRequest (400)            malformed JSON, wrong types, unknown roles, limits exceeded
    PolicyViolation (400)     a check blocked the request and the route says `on_block: error`
    TooLargeToScreen (400)    a text is over a guard's `max_tokens` (the route fails closed)
  Unauthorized (401)          missing or unknown API key
  NotFound (404)              unknown path or model
  PayloadTooLarge (413)       body over `max_body_bytes`
  RequestTimeout (408)        the request body did not arrive within `body_timeout_s`
  UnsupportedMediaType (415)  body is not JSON
  UpstreamError (502)         upstream unreachable, broken stream, malformed reply
    UpstreamTimeout (504)     upstream too slow (connect, total, between chunks)
  GuardUnavailable (503)      a guard failed, timed out or is overloaded and the policy blocks on that
  NotReady (503)              guards still loading
  ShuttingDown (503)          the drain deadline passed before the request finished
"""

from __future__ import annotations

from typing import Any, ClassVar

from proxy.protocol import error_body


class ProxyError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = "internal_error"
    should_retry: ClassVar[bool | None] = None
    """False where a retry cannot help: sent as `x-should-retry: false`, which the openai SDKs honour."""

    def __init__(self, message: str, *, param: str | None = None, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code, self.param)

    def headers(self) -> dict[str, str]:
        out = {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else {}
        if self.should_retry is not None:
            out["x-should-retry"] = "true" if self.should_retry else "false"
        return out


class BadRequest(ProxyError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class PolicyViolation(BadRequest):
    code = "content_policy_violation"

    def __init__(self, message: str, categories: list[str]) -> None:
        super().__init__(message)
        self.categories = categories

    def body(self) -> dict[str, Any]:
        body = super().body()
        body["error"]["categories"] = self.categories
        return body


class TooLargeToScreen(BadRequest):
    """A text is over a guard's `max_tokens` and the route fails closed: shorten the request."""

    code = "too_large_to_screen"
    should_retry = False


class Unauthorized(ProxyError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class NotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class PayloadTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RequestTimeout(ProxyError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class UnsupportedMediaType(ProxyError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class UpstreamError(ProxyError):
    status = 502
    type = "upstream_error"
    code = "upstream_error"


class ReplyTooLongToScreen(UpstreamError):
    """The upstream's reply is over a guard's `max_tokens` (the route fails closed): the same request
    would get the same reply, so the SDK must not retry it."""

    code = "upstream_reply_too_large"
    should_retry = False


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class GuardUnavailable(ProxyError):
    status = 503
    type = "server_error"
    code = "guard_unavailable"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message, retry_after_s=retry_after_s)


class NotReady(GuardUnavailable):
    code = "not_ready"


class ShuttingDown(ProxyError):
    """503: the process stopped before this request could finish (the drain deadline passed)."""

    status = 503
    type = "server_error"
    code = "shutting_down"

    def __init__(self) -> None:
        super().__init__("The proxy is shutting down and could not finish this request; retry it.", retry_after_s=1)
