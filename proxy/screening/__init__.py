"""Screening: collect everything the model will read, run the policy's checks, decide."""
