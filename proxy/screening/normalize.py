"""The copy of a text that guards see: Unicode tricks undone, the forwarded body untouched.

A trigger split by a zero-width space, written in full-width letters, or wrapped in tag or bidi
control characters reads the same to the upstream model but not to a classifier. Guards therefore
score NFKC-normalised text with invisible format characters removed and whitespace runs collapsed.
Everything here is C-level work (normalize, translate, re.sub on the rare runs), since a held reply
of several megabytes is normalised on the event loop.
"""

from __future__ import annotations

import re
import sys
import unicodedata

# Characters that render as nothing (or as blank) but are not category Cf.
_INVISIBLE = (
    *(0x115F, 0x1160, 0x3164, 0xFFA0, 0x2800, 0x034F, 0x17B4, 0x17B5, 0x180B, 0x180C, 0x180D, 0x180E, 0x180F),
    *range(0xFE00, 0xFE10),  # variation selectors
    *range(0xE0100, 0xE01F0),  # variation selectors supplement
)
# Format characters (Cf: zero-width, bidi controls, tags, soft hyphen ...) live in these planes only.
_CF_PLANES = (range(0, 0x20000), range(0xE0000, min(0xE1000, sys.maxunicode + 1)))
_DELETE = dict.fromkeys(
    [cp for plane in _CF_PLANES for cp in plane if unicodedata.category(chr(cp)) == "Cf"] + list(_INVISIBLE)
)
# Only what must change: two or more blanks, or one blank that is not a plain space.
_SPACES = re.compile(r"[^\S\n]{2,}|[^\S\n ]")
_BLANK_LINES = re.compile(r"\n[^\S\n]*\n\s*")


PIECE_CHARS = 1 << 16
# A safe cut: after whitespace, before an ASCII letter or digit. NFKC never composes across it and
# no whitespace run spans it, so viewing the pieces one by one gives the view of the whole.
_CUT = re.compile(r"\s[A-Za-z0-9]")


def guard_view(text: str) -> str:
    """NFKC; format (Cf: zero-width, bidi, tag characters) and other invisible characters removed;
    runs of spaces collapsed to one and runs of blank lines to one blank line. A long text is done
    in pieces of about PIECE_CHARS, so a thread doing it gives the interpreter's lock up in between."""
    if len(text) <= PIECE_CHARS:
        return _view(text)
    return "".join(_view(piece) for piece in _pieces(text, PIECE_CHARS))


def _view(text: str) -> str:
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text).translate(_DELETE)
    text = _SPACES.sub(" ", text)
    return _BLANK_LINES.sub("\n\n", text)


def _pieces(text: str, size: int) -> list[str]:
    out, start = [], 0
    while start < len(text):
        cut = _CUT.search(text, start + size)
        end = cut.start() + 1 if cut else len(text)
        out.append(text[start:end])
        start = end
    return out
