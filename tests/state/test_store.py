"""The response state contract, the same for both backends (in process, and a real redis-server):
chains, tenant isolation, entry bounds, unknown ids, and the lookup metrics."""

from __future__ import annotations

from proxy.guards.guard import Image, Turn
from proxy.observability import Metrics
from proxy.state.entry import MAX_ID_CHARS
from tests.state.conftest import StoreFactory, sample


def user(text: str) -> Turn:
    return Turn("User", text)


def agent(text: str) -> Turn:
    return Turn("Agent", text)


async def test_put_then_get_returns_the_turns_text_only(make_store: StoreFactory) -> None:
    store = make_store()
    picture = Image(b"\x89PNG...", "image/png")
    await store.put("acme", "resp_1", [Turn("User", "look at this", (picture,)), agent("a cat")])
    assert await store.get("acme", "resp_1") == [user("look at this"), agent("a cat")]


async def test_unknown_id_is_none_and_an_empty_chain_is_known(make_store: StoreFactory, metrics: Metrics) -> None:
    store = make_store()
    assert await store.get("acme", "resp_never") is None
    await store.put("acme", "resp_empty", [])
    assert await store.get("acme", "resp_empty") == []
    assert sample(metrics, "guardrail_response_state_lookups_total", {"result": "miss"}) == 1
    assert sample(metrics, "guardrail_response_state_lookups_total", {"result": "hit"}) == 1


async def test_previous_chains_the_whole_history_oldest_first(make_store: StoreFactory) -> None:
    store = make_store()
    await store.put("acme", "resp_1", [user("u1"), agent("a1")])
    await store.put("acme", "resp_2", [user("u2"), agent("a2")], previous="resp_1")
    await store.put("acme", "resp_3", [user("u3"), agent("a3")], previous="resp_2")
    whole = [user("u1"), agent("a1"), user("u2"), agent("a2"), user("u3"), agent("a3")]
    assert await store.get("acme", "resp_3") == whole
    # Each response keeps its own chain: a branch from resp_1 does not see resp_2.
    await store.put("acme", "resp_2b", [user("other")], previous="resp_1")
    assert await store.get("acme", "resp_2b") == [user("u1"), agent("a1"), user("other")]
    assert await store.get("acme", "resp_1") == [user("u1"), agent("a1")]


async def test_an_unknown_previous_starts_the_chain_over(make_store: StoreFactory) -> None:
    store = make_store()
    await store.put("acme", "resp_2", [user("u2"), agent("a2")], previous="resp_gone")
    assert await store.get("acme", "resp_2") == [user("u2"), agent("a2")]


async def test_a_conversation_appends_to_its_own_entry(make_store: StoreFactory) -> None:
    store = make_store()
    await store.put("acme", "conv_1", [user("u1"), agent("a1")], previous="conv_1")
    await store.put("acme", "conv_1", [user("u2"), agent("a2")], previous="conv_1")
    assert await store.get("acme", "conv_1") == [user("u1"), agent("a1"), user("u2"), agent("a2")]


async def test_tenants_never_read_each_others_entries(make_store: StoreFactory) -> None:
    store = make_store()
    await store.put("acme", "resp_1", [user("acme's secret")])
    assert await store.get("globex", "resp_1") is None
    await store.put("globex", "resp_1", [user("globex's own")])
    assert await store.get("acme", "resp_1") == [user("acme's secret")]
    assert await store.get("globex", "resp_1") == [user("globex's own")]
    # Nor chain from another tenant's response.
    await store.put("globex", "resp_2", [user("next")], previous="resp_x")
    await store.put("acme", "resp_x", [user("acme only")])
    await store.put("globex", "resp_3", [user("next")], previous="resp_x")
    assert await store.get("globex", "resp_3") == [user("next")]
    # Names that would run together if keys were joined with a separator stay apart.
    await store.put("a:b", "c", [user("one")])
    assert await store.get("a", "b:c") is None


async def test_oldest_turns_leave_past_max_turns_per_entry(make_store: StoreFactory, metrics: Metrics) -> None:
    store = make_store(max_turns_per_entry=3)
    await store.put("acme", "resp_1", [user("u1"), agent("a1")])
    await store.put("acme", "resp_2", [user("u2"), agent("a2")], previous="resp_1")
    assert await store.get("acme", "resp_2") == [agent("a1"), user("u2"), agent("a2")]
    assert sample(metrics, "guardrail_response_state_trimmed_turns_total") == 1


async def test_oldest_turns_leave_past_max_entry_bytes(make_store: StoreFactory, metrics: Metrics) -> None:
    store = make_store(max_entry_bytes=300)
    await store.put("acme", "resp_1", [user("x" * 120), agent("y" * 120)])
    await store.put("acme", "resp_2", [user("new question")], previous="resp_1")
    assert await store.get("acme", "resp_2") == [agent("y" * 120), user("new question")]
    assert sample(metrics, "guardrail_response_state_trimmed_turns_total") == 1


async def test_a_turn_alone_over_max_entry_bytes_keeps_its_tail(make_store: StoreFactory) -> None:
    store = make_store(max_entry_bytes=300)
    text = "".join(f"{i:04d}é\n" for i in range(200))  # multi-byte and escaped characters
    await store.put("acme", "resp_1", [user("before"), agent(text)])
    turns = await store.get("acme", "resp_1")
    assert turns is not None
    assert len(turns) == 1
    assert turns[0].speaker == "Agent"
    assert 100 < len(turns[0].text) < len(text)
    assert text.endswith(turns[0].text)


async def test_an_overlong_id_is_never_stored_or_found(make_store: StoreFactory, metrics: Metrics) -> None:
    store = make_store()
    long_id = "r" * (MAX_ID_CHARS + 1)
    await store.put("acme", long_id, [user("u")])
    assert sample(metrics, "guardrail_response_state_errors_total", {"op": "put"}) == 1
    assert await store.get("acme", long_id) is None
    assert await store.get("acme", "") is None


async def test_an_owner_is_kept_for_every_tenant_apart_from_the_chains(make_store: StoreFactory) -> None:
    store = make_store()
    assert await store.get_owner("resp_1") is None
    await store.put("acme", "resp_1", [user("acme's turn")])
    assert await store.get_owner("resp_1") is None  # a chain says nothing of its owner
    await store.put_owner("resp_1", "acme")
    assert await store.get_owner("resp_1") == "acme"
    assert await store.get("acme", "resp_1") == [user("acme's turn")]  # nor an owner of the chain
    await store.put_owner("resp_2", "globex")
    assert await store.get("globex", "resp_2") is None
    assert await store.get_owner("resp_2") == "globex"
    # A tenant whose name is empty (the every-tenant marks' name) is still not an owner record.
    await store.put("", "resp_3", [])
    assert await store.get_owner("resp_3") is None


async def test_an_overlong_id_has_no_owner(make_store: StoreFactory, metrics: Metrics) -> None:
    store = make_store()
    long_id = "r" * (MAX_ID_CHARS + 1)
    await store.put_owner(long_id, "acme")
    assert sample(metrics, "guardrail_response_state_errors_total", {"op": "put_owner"}) == 1
    assert await store.get_owner(long_id) is None
