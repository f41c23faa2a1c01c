"""What each guard sees, shape by shape: Prompt Guard's texts (user/tool roles by default) and
Llama Guard's User/Agent turns, for every message, part and field shape a client can send."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.errors import BadRequest
from proxy.protocol import ChatRequest, ChoiceMessage
from proxy.screening.collect import (
    Reply,
    input_conversations,
    output_conversation,
    screen_texts,
    unscreened_parts,
)
from proxy.screening.completion import reply_text
from proxy.screening.normalize import guard_view


def request(*messages: dict[str, Any]) -> ChatRequest:
    return ChatRequest.model_validate({"model": "m", "messages": list(messages)})


def views(req: ChatRequest) -> tuple[list[str], list[tuple[str, str]]]:
    texts = [t.text for t in screen_texts(req, ("user", "tool"))]
    subjects = input_conversations(req)
    turns: list[tuple[str, str]] = [(t.speaker, t.text) for t in (subjects[0] if subjects else [])]
    return texts, turns


CALL = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "x"}'}}
CASES: list[tuple[str, list[dict[str, Any]], list[str], list[tuple[str, str]]]] = [
    ("string content", [{"role": "user", "content": "hi"}], ["hi"], [("User", "hi")]),
    (
        "text parts of every text type",
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "a"},
                    {"type": "input_text", "text": "b"},
                    {"type": "output_text", "text": "c"},
                    {"type": "thinking", "thinking": "d"},
                    {"type": "refusal", "refusal": "e"},
                    {"type": "image_url", "image_url": {"url": "https://example.invalid/x.png"}},
                ],
            }
        ],
        ["a", "b", "c", "d", "e"],
        [("User", "a\nb\nc\nd\ne")],
    ),
    (
        "system is trusted",
        [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
        ["u"],
        [("User", "u")],
    ),
    (
        "developer is trusted",
        [{"role": "developer", "content": "s"}, {"role": "user", "content": "u"}],
        ["u"],
        [("User", "u")],
    ),
    (
        "leading assistant turn is judged as User text",
        [{"role": "assistant", "content": "a"}, {"role": "user", "content": "u"}],
        ["u"],
        [("User", "a\n\nu")],
    ),
    ("assistant only", [{"role": "assistant", "content": "a"}], [], [("User", "a")]),
    (
        "assistant reasoning, text and tool call",
        [
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": "t", "reasoning_content": "r1", "reasoning": "r2", "tool_calls": [CALL]},
            {"role": "user", "content": "v"},
        ],
        ["u", "v"],
        [("User", "u"), ("Agent", 'r1\nr2\nt\nlookup({"q": "x"})'), ("User", "v")],
    ),
    (
        "tool result is User, screened as third-party text",
        [
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "result"}]},
        ],
        ["u", "result"],
        [("User", "u"), ("Agent", 'lookup({"q": "x"})'), ("User", "result")],
    ),
    (
        "legacy function role and function_call",
        [
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}},
            {"role": "function", "name": "f", "content": "out"},
        ],
        ["u", "f", "out"],
        [("User", "u"), ("Agent", "f({})"), ("User", "f\nout")],
    ),
    (
        "name and unknown fields are read",
        [{"role": "user", "content": "u", "name": "alice", "vendor": {"note": "n", "id": "skip", "list": ["x"]}}],
        ["alice", "u", "n", "x"],
        [("User", "alice\nu\nn\nx")],
    ),
    (
        "normalised copy",
        [{"role": "user", "content": "ｂｏ\u200bｍｂ  and\u202e   more\n\n\n\nend"}],
        ["bomb and more\n\nend"],
        [("User", "bomb and more\n\nend")],
    ),
    ("empty content is nothing", [{"role": "user", "content": ""}], [], []),
]


@pytest.mark.parametrize(("label", "messages", "texts", "turns"), CASES, ids=[c[0] for c in CASES])
def test_what_guards_see(
    label: str, messages: list[dict[str, Any]], texts: list[str], turns: list[tuple[str, str]]
) -> None:
    assert views(request(*messages)) == (texts, turns)


def test_input_check_also_judges_a_trailing_assistant_turn() -> None:
    req = request({"role": "user", "content": "u"}, {"role": "assistant", "content": "prefill"})
    subjects = [[(t.speaker, t.text) for t in turns] for turns in input_conversations(req)]
    assert subjects == [[("User", "u")], [("User", "u"), ("Agent", "prefill")]]
    assert len(input_conversations(request({"role": "user", "content": "u"}))) == 1


def test_output_conversation_appends_the_reply_and_keeps_it_agent() -> None:
    req = request({"role": "system", "content": "s"})
    assert [(t.speaker, t.text) for t in output_conversation(req, Reply(0, "answer"))] == [("Agent", "answer")]
    req = request({"role": "user", "content": "u"}, {"role": "assistant", "content": "a"})
    got = [(t.speaker, t.text) for t in output_conversation(req, Reply(0, "b"))]
    assert got == [("User", "u"), ("Agent", "a\n\nb")]
    assert output_conversation(req, Reply(0, " \u200b ")) == []


@pytest.mark.parametrize(
    ("message", "text"),
    [
        ({"content": "c"}, "c"),
        ({"content": "c", "reasoning_content": "r"}, "r\nc"),
        ({"content": None, "reasoning": "r", "refusal": "no"}, "r\nno"),
        ({"content": None, "tool_calls": [CALL]}, 'lookup({"q": "x"})'),
        ({"content": "c", "audio": {"id": "a1", "data": "UklGRg==", "transcript": "spoken"}}, "c\nspoken"),
        ({"content": "c", "annotations": [{"type": "url_citation", "url_citation": {"title": "T"}}]}, "c\nT"),
    ],
)
def test_reply_text(message: dict[str, Any], text: str) -> None:
    assert reply_text(ChoiceMessage.model_validate({"role": "assistant", **message})) == text


@pytest.mark.parametrize(
    ("part", "allowed", "passed", "param"),
    [
        ({"type": "input_audio", "input_audio": {}}, (), None, "messages.0.content.0.type"),
        ({"type": "input_audio", "input_audio": {}}, ("input_audio",), ["input_audio"], None),
        ({"type": "file", "file": {"file_id": "f"}}, ("input_audio",), None, "messages.0.content.0.type"),
        ({"type": "input_text"}, ("input_text",), None, "messages.0.content.0.text"),
        ({"type": "image_url"}, ("image_url",), None, "messages.0.content.0"),
        ({"type": "text", "text": "ok"}, (), [], None),
    ],
)
def test_part_types_the_proxy_cannot_read_are_refused(
    part: dict[str, Any], allowed: tuple[str, ...], passed: list[str] | None, param: str | None
) -> None:
    req = request({"role": "user", "content": [part]})
    if passed is not None:
        assert unscreened_parts(req, allowed) == passed
        return
    with pytest.raises(BadRequest) as info:
        unscreened_parts(req, allowed)
    assert info.value.param == param


@pytest.mark.parametrize(
    ("raw", "seen"),
    [
        ("plain ascii  text", "plain ascii text"),
        ("ｆｕｌｌ", "full"),
        ("zero\u200bwidth\u200c\u200d\u2060joiners\ufeff", "zerowidthjoiners"),
        ("\U000e0074\U000e0061\U000e0067tag", "tag"),
        ("bi\u202adi\u202c \u2066iso\u2069", "bidi iso"),
        ("hangul\u3164filler", "hangulfiller"),
        ("tabs\t\tand\r\nlines", "tabs and \nlines"),
    ],
)
def test_guard_view(raw: str, seen: str) -> None:
    assert guard_view(raw) == seen


def test_an_upper_case_data_url_is_an_inline_image() -> None:
    """Servers read `DATA:` (schemes ignore case) and leading blanks as inline: so does the guard."""
    from proxy.protocol import ImagePart
    from proxy.screening.collect import decode_image

    part = ImagePart.model_validate({"type": "image_url", "image_url": {"url": " DATA:image/png;base64,iVBORw0K"}})
    image = decode_image(part)
    assert image is not None
    assert image.media_type == "image/png"
