"""The response state store's interface and its construction from the `state:` settings.

The Responses endpoint asks it for the screened turns behind a `previous_response_id` (or a
`conversation` id) before screening a new turn, and hands it each screened response's turns after.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

import structlog

from proxy.guards.guard import Turn
from proxy.observability import Metrics
from proxy.settings import StateSettings, resolve_secret

log = structlog.get_logger("proxy.state")


class ResponseStore(Protocol):
    """Screened turns per (tenant, response id). Each entry holds its whole chain (bounded), so a
    lookup is one read and an entry outlives its expired ancestors.

    Never raises for a backend failure: `get` then answers None (unknown) and `put` stores nothing;
    both count `guardrail_response_state_errors_total`."""

    async def get(self, tenant: str, response_id: str) -> list[Turn] | None:
        """The chain's turns, oldest first (text only), or None: unknown id, expired, evicted,
        another tenant's, or the backend failed. An empty list is a known id with no turns."""
        ...

    async def put(
        self, tenant: str, response_id: str, turns: Sequence[Turn], *, previous: str | None = None
    ) -> None:
        """Store `turns` (this response's screened turns, oldest first) for `response_id`, after the
        chain stored under `previous` when given and known. `previous == response_id` appends to an
        entry (a `conversation`). The TTL starts again at each put."""
        ...

    async def get_owner(self, response_id: str) -> str | None:
        """The tenant whose request created `response_id` (or first named a conversation id), or
        None: never recorded, expired, evicted, or the backend failed."""
        ...

    async def put_owner(self, response_id: str, tenant: str) -> None:
        """Record `tenant` as the owner of `response_id`, for every tenant to see (tenants share the
        upstream's key, so its ids are good for any of them). The TTL starts again at each put."""
        ...

    async def close(self) -> None: ...


def build_store(
    settings: StateSettings, metrics: Metrics, *, clock: Callable[[], float] = time.monotonic
) -> ResponseStore:
    """In process unless `redis_url` is set; `clock` drives the in-process TTL (tests pass their own)."""
    if settings.redis_url is None:
        from proxy.state.memory_store import MemoryStore

        log.info("response_state", backend="memory", ttl_s=settings.ttl_s, max_entries=settings.max_entries)
        return MemoryStore(settings, metrics, clock=clock)
    from proxy.state.redis_store import RedisStore

    # The URL may carry a password: it is never logged.
    log.info("response_state", backend="redis", ttl_s=settings.ttl_s, timeout_s=settings.redis_timeout_s)
    return RedisStore(settings, metrics, url=resolve_secret(settings.redis_url))
