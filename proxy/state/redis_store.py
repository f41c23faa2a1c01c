"""The Redis response state store (`state.redis_url`): every replica reads and writes the same
entries, so a `previous_response_id` answered by one replica is known to the others.

Each operation is bounded by `state.redis_timeout_s` (connect, pool wait and reply together, no
retries). A failure never fails the request: `get` answers unknown (None), so the turn is screened
with what the request itself shows, and `put` stores nothing; both count an error.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Sequence

import structlog
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from proxy.guards.guard import Turn
from proxy.observability import Metrics
from proxy.settings import StateSettings
from proxy.state.entry import build_entry, decode_entry, valid_id

log = structlog.get_logger("proxy.state")

CLIENT_NAME = "guardrail-proxy"
_FAILURES = (RedisError, OSError, TimeoutError, ValueError)
"""What a Redis call or a stored value can fail with (ValueError: a value that is not an entry)."""


class RedisStore:
    def __init__(self, settings: StateSettings, metrics: Metrics, *, url: str) -> None:
        self._settings = settings
        self._metrics = metrics
        timeout = settings.redis_timeout_s
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=settings.redis_max_connections,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            client_name=CLIENT_NAME,
        )
        self._redis = Redis.from_pool(pool)

    def key(self, tenant: str | None, response_id: str) -> str:
        """One key per (tenant, id): hashed, so tenants never share a key whatever their names or ids
        hold, and no client-chosen text reaches Redis's key space. Tenant None: the id's owner (JSON
        null, which no tenant's name encodes to)."""
        pair = json.dumps([tenant, response_id]).encode()
        return self._settings.redis_key_prefix + hashlib.sha256(pair).hexdigest()

    async def get(self, tenant: str, response_id: str) -> list[Turn] | None:
        try:
            async with asyncio.timeout(self._settings.redis_timeout_s):
                turns = await self._read(tenant, response_id)
        except _FAILURES as exc:
            self._failed("get", exc)
            return None
        self._metrics.response_state_lookups.labels("miss" if turns is None else "hit").inc()
        return turns

    async def put(
        self, tenant: str, response_id: str, turns: Sequence[Turn], *, previous: str | None = None
    ) -> None:
        if not valid_id(response_id):
            self._metrics.response_state_errors.labels("put").inc()
            return
        s = self._settings
        try:
            async with asyncio.timeout(s.redis_timeout_s):
                before = await self._read(tenant, previous) if previous is not None else None
                chain = [*before, *turns] if before is not None else list(turns)
                entry = build_entry(chain, max_turns=s.max_turns_per_entry, max_bytes=s.max_entry_bytes)
                # Read, then write: two replicas appending to one conversation at once keep the last
                # writer's chain (that turn's context lacks the other's newest turn).
                await self._redis.set(self.key(tenant, response_id), entry.value, ex=s.ttl_s)
        except _FAILURES as exc:
            self._failed("put", exc)
            return
        if entry.trimmed:
            self._metrics.response_state_trimmed_turns.inc(entry.trimmed)

    async def get_owner(self, response_id: str) -> str | None:
        if not valid_id(response_id):
            return None
        try:
            async with asyncio.timeout(self._settings.redis_timeout_s):
                value = await self._redis.get(self.key(None, response_id))
            return value.decode() if isinstance(value, bytes) else value
        except _FAILURES as exc:
            self._failed("get_owner", exc)
            return None

    async def put_owner(self, response_id: str, tenant: str) -> None:
        if not valid_id(response_id):
            self._metrics.response_state_errors.labels("put_owner").inc()
            return
        s = self._settings
        try:
            async with asyncio.timeout(s.redis_timeout_s):
                await self._redis.set(self.key(None, response_id), tenant.encode(), ex=s.ttl_s)
        except _FAILURES as exc:
            self._failed("put_owner", exc)

    async def close(self) -> None:
        await self._redis.aclose()

    async def _read(self, tenant: str, response_id: str) -> list[Turn] | None:
        if not valid_id(response_id):
            return None
        value = await self._redis.get(self.key(tenant, response_id))
        return None if value is None else decode_entry(value)

    def _failed(self, op: str, exc: BaseException) -> None:
        self._metrics.response_state_errors.labels(op).inc()
        # The type only: a Redis error's text may quote the URL (and its password) or a key.
        log.warning("response_state_error", op=op, error_type=type(exc).__name__)
