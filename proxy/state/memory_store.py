"""The in-process response state store (the default): one replica's screened turns per response,
bounded by a TTL, an entry count (LRU) and a byte total. A replica that did not serve a response
does not know its id; `state.redis_url` shares the state between replicas."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from proxy.guards.guard import Turn
from proxy.observability import Metrics
from proxy.settings import StateSettings
from proxy.state.entry import Entry, build_entry, valid_id

Key = tuple[str | None, str]
"""(tenant, id) for a chain; (None, id) for the id's owner, which no tenant's name can be."""


@dataclass(frozen=True)
class _Held:
    entry: Entry | str
    """A chain, or (under an owner key) the owning tenant's name."""
    size: int
    expires: float


class MemoryStore:
    def __init__(
        self, settings: StateSettings, metrics: Metrics, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._entries: OrderedDict[Key, _Held] = OrderedDict()  # least recently used first
        # Every entry lives ttl_s from its last put, so put order is expiry order: expired entries
        # leave from the front of this one without a scan.
        self._by_expiry: OrderedDict[Key, None] = OrderedDict()
        self.bytes_held = 0
        metrics.response_state_entries.set_function(lambda: float(len(self._entries)))
        metrics.response_state_bytes.set_function(lambda: float(self.bytes_held))

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, tenant: str, response_id: str) -> list[Turn] | None:
        held = self._lookup((tenant, response_id))
        self._metrics.response_state_lookups.labels("miss" if held is None else "hit").inc()
        return None if held is None or isinstance(held.entry, str) else list(held.entry.turns)

    async def put(
        self, tenant: str, response_id: str, turns: Sequence[Turn], *, previous: str | None = None
    ) -> None:
        if not valid_id(response_id):
            self._metrics.response_state_errors.labels("put").inc()
            return
        held = self._lookup((tenant, previous)) if previous is not None else None
        before = held.entry if held is not None and not isinstance(held.entry, str) else None
        s = self._settings
        try:
            entry = build_entry(turns, max_turns=s.max_turns_per_entry, max_bytes=s.max_entry_bytes, before=before)
        except UnicodeEncodeError:  # a lone surrogate: screening refuses such text, so never here
            self._metrics.response_state_errors.labels("put").inc()
            return
        if entry.trimmed:
            self._metrics.response_state_trimmed_turns.inc(entry.trimmed)
        self._hold((tenant, response_id), entry, entry.size)

    async def get_owner(self, response_id: str) -> str | None:
        held = self._lookup((None, response_id))
        return held.entry if held is not None and isinstance(held.entry, str) else None

    async def put_owner(self, response_id: str, tenant: str) -> None:
        if not valid_id(response_id):
            self._metrics.response_state_errors.labels("put_owner").inc()
            return
        # Bounded with the chains (ttl_s, max_entries, max_bytes): an owner evicted is unknown.
        self._hold((None, response_id), tenant, len(tenant.encode()) + len(response_id.encode()))

    def _hold(self, key: Key, entry: Entry | str, size: int) -> None:
        self._drop(key)
        self._entries[key] = _Held(entry, size, self._clock() + self._settings.ttl_s)
        self._by_expiry[key] = None
        self.bytes_held += size
        self._evict()

    async def close(self) -> None:
        self._entries.clear()
        self._by_expiry.clear()
        self.bytes_held = 0

    def _lookup(self, key: Key) -> _Held | None:
        if not valid_id(key[1]):
            return None
        held = self._entries.get(key)
        if held is None:
            return None
        if held.expires <= self._clock():
            self._drop(key, "ttl")
            return None
        self._entries.move_to_end(key)
        return held

    def _evict(self) -> None:
        now = self._clock()
        while self._by_expiry:
            oldest = next(iter(self._by_expiry))
            if self._entries[oldest].expires > now:
                break
            self._drop(oldest, "ttl")
        while len(self._entries) > self._settings.max_entries:
            self._drop(next(iter(self._entries)), "lru")
        while self.bytes_held > self._settings.max_bytes:
            self._drop(next(iter(self._entries)), "bytes")

    def _drop(self, key: Key, reason: str | None = None) -> None:
        held = self._entries.pop(key, None)
        if held is None:
            return
        del self._by_expiry[key]
        self.bytes_held -= held.size
        if reason is not None:
            self._metrics.response_state_evictions.labels(reason).inc()
