"""guardrail-proxy: an OpenAI-compatible reverse proxy that screens traffic with Llama Guard and Prompt Guard."""

__version__ = "0.1.0"
