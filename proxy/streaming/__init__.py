"""Streaming: SSE reading and writing, one reader of upstream chat streams, and the two relays (buffered:
hold a stream until it is checked; incremental: release it in checked windows)."""
