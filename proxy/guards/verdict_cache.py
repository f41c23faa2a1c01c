"""The verdict cache: scores a guard already computed, so an unchanged input (every earlier turn of a
chat under Prompt Guard, a retried request under Llama Guard) is never scored twice.

It holds scores, never decisions: thresholds stay in the policy, so one entry serves every tenant's
thresholds. One cache per loaded guard (the model is part of its identity); keys are digests of the
exact input (token ids, or text and source), never the text itself, so an entry costs the same
whatever the input's size and no prompt text is kept. Bounded by entries, least recently used first;
thread-safe (the event loop and the runner's thread both use it).
"""

from __future__ import annotations

import array
import collections
import hashlib
import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Generic, TypeVar

V = TypeVar("V")


def digest_ids(ids: Sequence[int]) -> bytes:
    return hashlib.sha256(array.array("q", ids).tobytes()).digest()


def digest_text(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


class VerdictCache(Generic[V]):
    def __init__(self, entries: int) -> None:
        self.max_entries = entries
        self.hits = 0
        self.misses = 0
        self.observe: Callable[[str], None] | None = None
        """Called with "hit" or "miss" for each lookup (from either thread)."""
        self._entries: collections.OrderedDict[Hashable, V] = collections.OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable, serves: Callable[[V], bool] | None = None) -> V | None:
        """The entry for `key`, if any and `serves` accepts it (a hit); otherwise None (a miss)."""
        if not self.enabled:
            return None
        with self._lock:
            found = self._entries.get(key)
            if found is not None and (serves is None or serves(found)):
                self._entries.move_to_end(key)
                self.hits += 1
            else:
                found = None
                self.misses += 1
        if self.observe is not None:
            self.observe("hit" if found is not None else "miss")
        return found

    def peek(self, key: Hashable) -> V | None:
        """The entry for `key` without counting a lookup or refreshing it."""
        with self._lock:
            return self._entries.get(key)

    def put(self, key: Hashable, value: V) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
