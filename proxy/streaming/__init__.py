"""Streaming: SSE reading and writing, and the buffered relay that holds a stream until it is checked."""
