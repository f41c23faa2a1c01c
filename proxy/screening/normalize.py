"""The copy of a text that guards see: Unicode tricks undone, the forwarded body untouched.

A trigger split by a zero-width space, written in full-width letters, or wrapped in tag or bidi
control characters reads the same to the upstream model but not to a classifier. Guards therefore
score NFKC-normalised text with invisible format characters removed and whitespace runs collapsed.
"""

from __future__ import annotations

import re
import unicodedata

# Characters that render as nothing (or as blank) but are not category Cf.
_INVISIBLE = frozenset(
    [
        *(0x115F, 0x1160, 0x3164, 0xFFA0, 0x2800, 0x034F, 0x17B4, 0x17B5, 0x180B, 0x180C, 0x180D, 0x180E, 0x180F),
        *range(0xFE00, 0xFE10),  # variation selectors
        *range(0xE0100, 0xE01F0),  # variation selectors supplement
    ]
)
_SPACES = re.compile(r"[^\S\n]+")
_BLANK_LINES = re.compile(r"\n\s*\n")


def _visible(char: str) -> bool:
    return unicodedata.category(char) != "Cf" and ord(char) not in _INVISIBLE


def guard_view(text: str) -> str:
    """NFKC; format (Cf: zero-width, bidi, tag characters) and other invisible characters removed;
    runs of spaces collapsed to one and runs of blank lines to one blank line."""
    cleaned = text if text.isascii() else "".join(c for c in unicodedata.normalize("NFKC", text) if _visible(c))
    cleaned = _SPACES.sub(" ", cleaned)
    cleaned = _BLANK_LINES.sub("\n\n", cleaned)
    return cleaned
