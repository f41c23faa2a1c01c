"""What a client may show of a reply's `logprobs`, read by the output check with the text they belong
to (chat JSON choices and stream chunks, legacy completions): the tokens where they do not spell the
text, each position's alternatives, and any other string. Log-probabilities and offsets are no text.

An upstream chooses what it puts there: a token list that spells something else, or alternatives
that never made it into the text, reach a client that prints them unless they are screened here.
"""

from __future__ import annotations

from typing import Any

from proxy.screening.collect import extra_text

# Keys of one chat token entry read apart below (`logprob` is a number).
_ENTRY_FIELDS = frozenset({"token", "bytes", "logprob"})


def unspelled(tokens: Any, text: str) -> list[str]:
    """`tokens` (a list of strings) as text to screen, or nothing where they spell `text` exactly."""
    if isinstance(tokens, list) and all(isinstance(t, str) for t in tokens) and "".join(tokens) == text:
        return []
    return extra_text({"tokens": tokens})


def token_entries_text(entries: Any, text: str) -> list[str]:
    """A chat (or Responses) token list, `[{token, logprob, bytes, top_logprobs}]`: its tokens and the
    text its `bytes` decode to where they do not spell `text`, and every alternative (token and bytes)."""
    if entries is None:
        return []
    if not (isinstance(entries, list) and all(isinstance(e, dict) for e in entries)):
        return extra_text({"logprobs": entries})
    shown = unspelled([e.get("token") for e in entries], text)
    said = decoded([e.get("bytes") for e in entries])
    if said is not None and said != text:
        shown.append(said)
    for entry in entries:
        alternatives = entry.get("top_logprobs")
        if isinstance(alternatives, list):
            # The chosen token heads its own alternatives, as a rule: it was read above already.
            alternatives = [_other_than(a, entry.get("token")) for a in alternatives]
        shown += extra_text({"top_logprobs": alternatives})
        for alternative in alternatives if isinstance(alternatives, list) else []:
            if isinstance(alternative, dict):
                said = decoded([alternative.get("bytes")])
                if said is not None and said != alternative.get("token", entry.get("token")):
                    shown.append(said)
        shown += extra_text({k: v for k, v in entry.items() if k not in _ENTRY_FIELDS and k != "top_logprobs"})
    return shown


def chat_logprobs_text(logprobs: Any, content: str, refusal: str) -> list[str]:
    """A chat choice's `logprobs` (`{content: [...], refusal: [...]}`) against the content and refusal
    text it came with (a whole message, or one chunk's delta)."""
    if logprobs is None:
        return []
    if not isinstance(logprobs, dict):
        return extra_text({"logprobs": logprobs})
    rest = {k: v for k, v in logprobs.items() if k not in ("content", "refusal")}
    return [
        *token_entries_text(logprobs.get("content"), content),
        *token_entries_text(logprobs.get("refusal"), refusal),
        *extra_text(rest),
    ]


def _other_than(alternative: Any, chosen: Any) -> Any:
    """An alternative without its `token` where that is the chosen one."""
    if isinstance(alternative, dict) and isinstance(chosen, str) and alternative.get("token") == chosen:
        return {k: v for k, v in alternative.items() if k != "token"}
    return alternative


def decoded(lists: list[Any]) -> str | None:
    """The text byte lists decode to as a client would (UTF-8, bad sequences replaced), or None where
    there are none; a value that is not a list of byte values counts for its strings only."""
    data = bytearray()
    seen = False
    odd: list[str] = []
    for value in lists:
        if value is None:
            continue
        seen = True
        if isinstance(value, list) and all(type(b) is int and 0 <= b < 256 for b in value):
            data += bytes(value)
        else:
            odd += extra_text({"bytes": value})
    if not seen:
        return None
    return " ".join([data.decode("utf-8", "replace"), *odd]) if odd else data.decode("utf-8", "replace")
