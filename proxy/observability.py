"""Logging and metrics: one structlog JSON line per request, Prometheus metrics on a registry owned
by the app (no module-level metric globals). Prompt and completion text are logged only when
`server.log_content` is on; API keys never."""

from __future__ import annotations

import logging
import sys

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

HELD_BYTES_BUCKETS = tuple(float(4**k * 1024) for k in range(10))  # 1 KiB .. 256 MiB
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def setup_logging(level: str = "info") -> None:
    logging.basicConfig(format="%(message)s", stream=sys.stdout, level=level.upper(), force=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=False,
    )


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
            "Bytes of one upstream reply held until checked, by kind (stream, json)",
            ["kind"],
            buckets=HELD_BYTES_BUCKETS,
            registry=r,
        )
        self.held_over_cap = Counter(
            "guardrail_held_reply_over_cap",
            "Upstream replies refused for going over max_held_bytes or max_stream_events",
            ["kind", "cap"],
            registry=r,
        )
        self.in_flight = Gauge("guardrail_in_flight_requests", "Requests being handled", registry=r)
        self.queue_depth = Gauge(
            "guardrail_guard_queue_depth", "Jobs waiting in a guard runner queue", ["device"], registry=r
        )
        self.queue_rejections = Counter(
            "guardrail_guard_queue_rejections",
            "Guard jobs refused with 503: queue full, or the tenant's share of it taken",
            ["device", "reason"],
            registry=r,
        )
        self.policy_reload_failures = Gauge(
            "guardrail_policy_reload_failures", "Policy reloads rejected since start", registry=r
        )
        self.open_connections = Gauge("guardrail_open_connections", "Client connections open now", registry=r)
        self.connections_rejected = Counter(
            "guardrail_connections_rejected",
            "Client connections refused past max_connections, or requests too slow to arrive (header/body timeout)",
            ["reason"],
            registry=r,
        )
