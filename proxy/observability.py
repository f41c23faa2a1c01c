"""Logging and metrics: one structlog JSON line per request, Prometheus metrics on a registry owned
by the app (no module-level metric globals). Prompt and completion text are logged only when
`server.log_content` is on; API keys never."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from structlog.typing import EventDict, Processor, WrappedLogger

HELD_BYTES_BUCKETS = tuple(float(4**k * 1024) for k in range(10))  # 1 KiB .. 256 MiB
HOLDBACK_TOKEN_BUCKETS = (4.0, 8.0, 16.0, 32.0, 48.0, 64.0, 96.0, 128.0, 256.0, 512.0, 1024.0, 4096.0)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
REDACTED = "[redacted]"
# Credentials as they appear in headers, reprs of raw header bytes, and exception texts.
_CREDENTIALS = (
    (re.compile(r"(?i)\b(bearer|basic)(\s+)[^\s'\",;\\]+"), rf"\1\2{REDACTED}"),
    (
        re.compile(r"(?i)\b(authorization|cookie|api-key)(['\"]?\s*[:=]\s*)[^\r\n'\"\\]+"),
        rf"\1\2{REDACTED}",
    ),
    (re.compile(r"\bsk-[A-Za-z0-9_\-]{6,}"), REDACTED),
)
# One cheap search first: most strings in a log line hold none of these words.
_SUSPECT = re.compile(r"(?i)bearer|basic|authorization|cookie|api-key|sk-")


def setup_logging(level: str = "info", secrets: Iterable[str] = ()) -> None:
    """Every log line, structlog's and the stdlib's (aiohttp, asyncio, litellm), leaves as one JSON
    object through one formatter that redacts credentials and the configured keys."""
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.add_logger_name,
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            summarize_parser_errors,
            structlog.processors.format_exc_info,
            Redactor(secrets),
            structlog.processors.JSONRenderer(),
        ],
    )
    handler = StdoutHandler()
    handler.setFormatter(formatter)
    logging.basicConfig(handlers=[handler], level=level.upper(), force=True)
    logging.captureWarnings(True)  # a library's warning is a log line too, not plain text on stderr
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )


class StdoutHandler(logging.Handler):
    """Writes each line to the current sys.stdout (looked up per line, so a swapped stream, as test
    capture does, gets it) and flushes it: one JSON object per line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stdout.write(self.format(record) + "\n")
            sys.stdout.flush()
        except Exception:
            self.handleError(record)


def summarize_parser_errors(logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
    """aiohttp's HTTP parser errors quote the raw bytes they choked on (a header with its key, a
    request line): keep the exception's type and a short reason, never its text or traceback."""
    info = event.get("exc_info")
    exc = info[1] if isinstance(info, tuple) else info
    if isinstance(exc, BaseException) and _quotes_raw_input(exc):
        del event["exc_info"]
        event["error_type"] = type(exc).__name__
        event["reason"] = short_reason(exc)
    return event


def _quotes_raw_input(exc: BaseException) -> bool:
    from aiohttp.http_exceptions import HttpProcessingError

    return isinstance(exc, HttpProcessingError)


def short_reason(exc: BaseException) -> str:
    text = str(getattr(exc, "message", "") or exc)
    text = re.split(r"[:'\"\r\n\\]", text, maxsplit=1)[0]
    return "".join(c for c in text if " " <= c <= "~").strip()[:80]


class Redactor:
    """Replaces credentials and the configured secrets in every string of an event."""

    def __init__(self, secrets: Iterable[str]) -> None:
        # Longest first: a secret that contains another is replaced whole.
        self.secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def __call__(self, logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
        return {k: self.redact(v) for k, v in event.items()}

    def redact(self, value: Any) -> Any:
        if isinstance(value, str):
            for secret in self.secrets:
                if secret in value:
                    value = value.replace(secret, REDACTED)
            if _SUSPECT.search(value):
                for pattern, replacement in _CREDENTIALS:
                    value = pattern.sub(replacement, value)
            return value
        if isinstance(value, dict):
            return {k: self.redact(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.redact(v) for v in value]
        return value


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "guardrail_requests",
            "Requests by tenant, route, decision and HTTP status",
            ["tenant", "route", "decision", "status"],
            registry=r,
        )
        self.blocks = Counter(
            "guardrail_blocks",
            "Blocked or flagged checks by category",
            ["tenant", "route", "side", "category", "decision"],
            registry=r,
        )
        self.guard_latency = Histogram(
            "guardrail_guard_latency_seconds",
            "Time one guard check took",
            ["guard", "side"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.guard_errors = Counter(
            "guardrail_guard_errors", "Guard checks that failed or timed out", ["guard"], registry=r
        )
        self.fail_open = Counter(
            "guardrail_fail_open",
            "Guard errors let through by on_guard_error: allow",
            ["tenant", "route", "guard"],
            registry=r,
        )
        self.upstream_latency = Histogram(
            "guardrail_upstream_latency_seconds",
            "Upstream time to full reply",
            ["upstream"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "guardrail_upstream_errors", "Upstream failures by kind", ["upstream", "kind"], registry=r
        )
        self.held_bytes = Histogram(
            "guardrail_held_reply_bytes",
            "Bytes of one upstream reply held until checked, by kind (stream, json; incremental: most held at once)",
            ["kind"],
            buckets=HELD_BYTES_BUCKETS,
            registry=r,
        )
        self.holdback_tokens = Histogram(
            "guardrail_stream_holdback_tokens",
            "Incremental streams: tokens (4 characters) of one released window, held back until its check passed",
            ["route"],
            buckets=HOLDBACK_TOKEN_BUCKETS,
            registry=r,
        )
        self.holdback_seconds = Histogram(
            "guardrail_stream_holdback_seconds",
            "Incremental streams: how long the oldest event of one released window was held back",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.held_over_cap = Counter(
            "guardrail_held_reply_over_cap",
            "Upstream replies refused for going over max_held_bytes or max_stream_events",
            ["kind", "cap"],
            registry=r,
        )
        self.unscreened_parts = Counter(
            "guardrail_unscreened_parts",
            "Content parts sent upstream unscreened because the route's unscreened_parts allows their type",
            ["tenant", "route", "type"],
            registry=r,
        )
        self.in_flight = Gauge("guardrail_in_flight_requests", "Requests being handled", registry=r)
        self.ready = Gauge(
            "guardrail_ready",
            "1 when /readyz answers 200 (guards loaded, not draining); set at each scrape",
            registry=r,
        )
        self.queue_depth = Gauge(
            "guardrail_guard_queue_depth", "Jobs waiting in a guard runner queue", ["device"], registry=r
        )
        self.queue_rejections = Counter(
            "guardrail_guard_queue_rejections",
            "Guard jobs refused with 503: queue full, or the tenant's share of it taken",
            ["device", "reason"],
            registry=r,
        )
        self.prefix_cache_tokens = Counter(
            "guardrail_prefix_cache_tokens",
            "Llama Guard prompt tokens read from the prefix KV cache (hit), computed by checks (computed) or "
            "computed ahead of an output check while the upstream answered (prefetched)",
            ["guard", "kind"],
            registry=r,
        )
        self.prefetches = Counter(
            "guardrail_prefetch",
            "Output-check prefetches by outcome: done, cached (nothing new), busy (checks were waiting, or one "
            "prefetch already ran), stopped (the reply came first), too_long (over max_tokens), off, failed",
            ["guard", "outcome"],
            registry=r,
        )
        self.prefix_cache_bytes = Gauge(
            "guardrail_prefix_cache_bytes", "Bytes of keys/values held by a guard's prefix cache", ["guard"], registry=r
        )
        self.prefix_cache_evictions = Counter(
            "guardrail_prefix_cache_evictions", "Prefix cache blocks evicted to stay within prefix_cache_mb", ["guard"],
            registry=r,
        )
        self.verdict_cache = Counter(
            "guardrail_verdict_cache_lookups", "Verdict cache lookups by result (hit, miss)", ["guard", "result"],
            registry=r,
        )
        self.policy_reload_failures = Gauge(
            "guardrail_policy_reload_failures", "Policy reloads rejected since start", registry=r
        )
        self.response_state_entries = Gauge(
            "guardrail_response_state_entries", "Responses whose screened turns the in-process store holds", registry=r
        )
        self.response_state_bytes = Gauge(
            "guardrail_response_state_bytes", "Bytes (JSON) of screened turns the in-process store holds", registry=r
        )
        self.response_state_lookups = Counter(
            "guardrail_response_state_lookups",
            "Response state lookups by result (hit, miss: unknown, expired or evicted id)",
            ["result"],
            registry=r,
        )
        self.response_state_evictions = Counter(
            "guardrail_response_state_evictions",
            "In-process response state entries dropped, by reason (ttl, lru, bytes)",
            ["reason"],
            registry=r,
        )
        self.response_state_trimmed_turns = Counter(
            "guardrail_response_state_trimmed_turns",
            "Oldest turns dropped (or a turn cut to its tail) to keep a chain within the entry bounds",
            registry=r,
        )
        self.response_state_errors = Counter(
            "guardrail_response_state_errors",
            "Response state operations that failed (Redis down, timeout, unreadable value), by op; "
            "a failed get answers unknown",
            ["op"],
            registry=r,
        )
        self.response_owner_refusals = Counter(
            "guardrail_response_owner_refusals",
            "Requests refused (404) for naming a response or conversation another tenant owns, or (with "
            "state.require_owner) one whose owner is unknown, by the refused tenant",
            ["tenant"],
            registry=r,
        )
        self.open_connections = Gauge("guardrail_open_connections", "Client connections open now", registry=r)
        self.connections_rejected = Counter(
            "guardrail_connections_rejected",
            "Client connections refused past max_connections, or requests too slow to arrive (header/body timeout)",
            ["reason"],
            registry=r,
        )
