"""Upstreams: where screened requests go. OpenAI-compatible ones through one shared aiohttp session,
other providers through the litellm adapter."""
