"""The guards' normalised view: piecewise work equals whole-text work, and a reply of megabytes is
normalised without holding the event loop (the autouse fixture fails any gap over 0.5 s)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy.guards.guard import ConversationScore, Taxonomy, Turn
from proxy.policy.models import RouteSettings
from proxy.protocol import ChatRequest
from proxy.screening import normalize
from proxy.screening.collect import Reply
from proxy.screening.pipeline import screen

PIECES = st.sampled_from(
    ["a", "Z", "9", " ", "  ", "\n", "\n\n", " \n \n ", "\t", "\u200b", "ｆ", "e\u0301", " \u0301", "\u202e", "한",
     "\u3164", "\U000e0041", "\u00ad"]
)


@given(text=st.lists(PIECES, max_size=300).map("".join), piece=st.integers(1, 40))
def test_pieces_give_the_view_of_the_whole(text: str, piece: int) -> None:
    whole = normalize._view(text)
    parts = normalize._pieces(text, piece)
    assert "".join(parts) == text
    assert "".join(normalize._view(p) for p in parts) == whole


class CountingGuard:
    name = "llama_guard"

    def __init__(self) -> None:
        self.seen = 0

    async def score_conversation(
        self, turns: list[Turn], taxonomy: Taxonomy, *, categories_from: float = 0.5
    ) -> ConversationScore:
        self.seen = sum(len(t.text) for t in turns)
        return ConversationScore(0.0, 0.0, 1.0)


async def test_megabytes_of_reply_are_normalised_off_the_loop() -> None:
    route = RouteSettings.model_validate({"name": "chat", "output": [{"guard": "llama_guard"}]})
    request = ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    reply = Reply(0, "wörd\u200b  ｆ " * 1_500_000)  # 15 M characters, every path of the view
    guard = CountingGuard()
    verdict = await screen(route, {"llama_guard": guard}, request, reply)
    assert verdict.decision == "allow"
    assert guard.seen == len("hi") + len("wörd f ") * 1_500_000
