"""Response state: the screened turns of each Responses-API response, so a turn that names a
`previous_response_id` (or a `conversation`) is judged by Llama Guard with the context the upstream
keeps and the request does not repeat. In process by default; in Redis when `state.redis_url` is set."""

from proxy.state.store import ResponseStore, build_store

__all__ = ["ResponseStore", "build_store"]
