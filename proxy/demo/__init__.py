"""Demo guards: tiny deterministic models that react only to trigger words. For tests and `demo`."""
