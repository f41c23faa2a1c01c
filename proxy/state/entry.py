"""One stored entry of response state: the screened turns of a response's whole chain, trimmed to the
entry bounds and encoded as JSON (never pickle: a value read back from a shared Redis is data, not code).

Both backends encode through here, so a chain is trimmed and counted in bytes the same way wherever it
is kept. Only text is kept: images are dropped (see README, Response state).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from proxy.guards.guard import Turn

FORMAT = 1
MAX_ID_CHARS = 256
"""Longer ids are never stored or looked up: OpenAI's are ~50 characters, and a client-chosen
`previous_response_id` must not size a key."""

_HEAD = b'{"v":%d,"turns":[' % FORMAT
_TAIL = b"]}"
_SPEAKERS = frozenset(("User", "Agent"))


@dataclass(frozen=True)
class Entry:
    turns: tuple[Turn, ...]
    parts: tuple[bytes, ...]
    """Each turn's JSON: a chain extended later is not encoded again."""
    trimmed: int
    """Turns dropped (or one cut to its tail) to fit the bounds."""

    @property
    def size(self) -> int:
        """Bytes of the stored JSON value."""
        return _size(self.parts)

    @property
    def value(self) -> bytes:
        return _HEAD + b",".join(self.parts) + _TAIL


def valid_id(response_id: str) -> bool:
    return 0 < len(response_id) <= MAX_ID_CHARS


def _turn_json(turn: Turn) -> bytes:
    return json.dumps({"speaker": turn.speaker, "text": turn.text}, ensure_ascii=False, separators=(",", ":")).encode()


def _size(parts: Sequence[bytes]) -> int:
    return len(_HEAD) + sum(len(p) for p in parts) + max(len(parts) - 1, 0) + len(_TAIL)


def build_entry(
    turns: Sequence[Turn], *, max_turns: int, max_bytes: int, before: Entry | None = None
) -> Entry:
    """The chain as stored, `before`'s turns then `turns`: text only, at most `max_turns` turns and
    `max_bytes` bytes of JSON, the oldest turns dropped first (the newest are the context a next turn
    is judged with); a newest turn that alone is over `max_bytes` keeps the tail of its text."""
    new = [Turn(t.speaker, t.text) for t in turns[-max_turns:]]
    kept = [*(before.turns if before else ()), *new]
    parts = [*(before.parts if before else ()), *map(_turn_json, new)]
    cut = max(len(kept) - max_turns, 0)
    del kept[:cut], parts[:cut]
    trimmed = len(turns) - len(new) + cut
    size = _size(parts)
    while size > max_bytes and len(parts) > 1:
        size -= len(parts.pop(0)) + 1
        kept.pop(0)
        trimmed += 1
    if size > max_bytes:
        kept[0], parts[0] = _cut_to_tail(kept[0], max_bytes - (size - len(parts[0])))
        trimmed += 1
    return Entry(tuple(kept), tuple(parts), trimmed)


def _cut_to_tail(turn: Turn, budget: int) -> tuple[Turn, bytes]:
    """The turn with only as much of its text's end as encodes within `budget` bytes."""
    text = turn.text
    part = _turn_json(turn)
    while len(part) > budget and text:
        # Shrink in proportion (escapes and UTF-8 make bytes per character uneven); converges in a few steps.
        keep = max(len(text) * budget // len(part) - 1, 0)
        text = text[len(text) - keep :] if keep else ""
        part = _turn_json(Turn(turn.speaker, text))
    return Turn(turn.speaker, text), part


def decode_entry(value: bytes | str) -> list[Turn]:
    """Turns from a stored value; ValueError for anything that is not exactly what `build_entry` writes."""
    data: Any = json.loads(value)
    if not isinstance(data, dict) or data.get("v") != FORMAT or not isinstance(data.get("turns"), list):
        raise ValueError("not a response state entry")
    out: list[Turn] = []
    for item in data["turns"]:
        if not isinstance(item, dict) or item.get("speaker") not in _SPEAKERS or not isinstance(item.get("text"), str):
            raise ValueError("not a response state turn")
        out.append(Turn(item["speaker"], item["text"]))
    return out
