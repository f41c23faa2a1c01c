"""The incremental SSE parser: line endings, events split across reads at every byte, many events
in one read, comments and other fields, and a stream that ends inside an event."""

from __future__ import annotations

import pytest

from proxy.streaming.sse import Event, EventReader, MalformedStream, data_of, frame_data


def read_all(pieces: list[bytes]) -> list[Event]:
    reader = EventReader()
    events = [e for piece in pieces for e in reader.feed(piece)]
    return events + list(reader.close())


STREAMS = {
    "lf": b'data: {"a":1}\n\ndata: {"a":2}\n\ndata: [DONE]\n\n',
    "crlf": b'data: {"a":1}\r\n\r\ndata: {"a":2}\r\n\r\ndata: [DONE]\r\n\r\n',
    "cr": b'data: {"a":1}\r\rdata: {"a":2}\r\rdata: [DONE]\r\r',
    "mixed": b'data: {"a":1}\r\n\ndata: {"a":2}\n\r\ndata: [DONE]\r\r\n',
}


@pytest.mark.parametrize("name", STREAMS)
def test_line_endings(name: str) -> None:
    events = read_all([STREAMS[name]])
    assert [e.data for e in events] == ['{"a":1}', '{"a":2}', "[DONE]"]
    assert b"".join(e.raw for e in events) == STREAMS[name]
    assert all(e.data_only for e in events)


@pytest.mark.parametrize("name", STREAMS)
def test_every_split_point_gives_the_same_events(name: str) -> None:
    stream = STREAMS[name]
    whole = read_all([stream])
    for cut in range(1, len(stream)):
        assert read_all([stream[:cut], stream[cut:]]) == whole, cut
    assert read_all([stream[i : i + 1] for i in range(len(stream))]) == whole


def test_many_events_in_one_read() -> None:
    stream = b"".join(f'data: {{"n":{i}}}\n\n'.encode() for i in range(10_000))
    events = list(EventReader().feed(stream))
    assert [e.data for e in events] == [f'{{"n":{i}}}' for i in range(10_000)]


def test_a_large_event_in_small_reads() -> None:
    payload = b"x" * 200_000
    stream = b"data: " + payload + b"\n\n"
    reader = EventReader()
    events = [e for i in range(0, len(stream), 7) for e in reader.feed(stream[i : i + 7])]
    assert [e.data for e in events] == [payload.decode()]
    assert reader.pending == 0


def test_multi_line_data_and_field_forms() -> None:
    events = read_all([b"data:a\ndata\ndata:  b\n\n"])
    assert events[0].data == "a\n\n b"
    assert events[0].data_only


def test_comments_and_other_fields_are_marked() -> None:
    events = read_all([b": keep-alive\n\nevent: message\nid: 7\ndata: {}\n\nretry: 5\n\n"])
    assert [(e.data, e.data_only) for e in events] == [(None, False), ("{}", False), (None, False)]
    assert events[1].frame() == b"data: {}\n\n"
    assert events[0].frame() == events[0].raw


def test_stray_blank_lines_are_no_events() -> None:
    assert [e.data for e in read_all([b"\n\n\r\ndata: 1\n\n\n\n"])] == ["1"]


@pytest.mark.parametrize("tail", [b"data: {", b"data: {}\n", b": comment\n"])
def test_stream_ending_inside_an_event_is_malformed(tail: bytes) -> None:
    reader = EventReader()
    assert [e.data for e in reader.feed(b"data: 1\n\n" + tail)] == ["1"]
    with pytest.raises(MalformedStream):
        list(reader.close())


def test_non_utf8_data_is_malformed() -> None:
    with pytest.raises(MalformedStream, match="UTF-8"):
        list(EventReader().feed(b"data: \xff\xfe\n\n"))


@pytest.mark.parametrize("data", ["{}", "a\nb", "[DONE]", " x"])
def test_stored_frames_give_their_data_back(data: str) -> None:
    assert data_of(frame_data(data)) == data
    (event,) = read_all([frame_data(data)])
    assert event.data == data
