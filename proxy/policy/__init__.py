"""Policies: per-tenant YAML files that say what is screened, how strictly, and what a block looks like."""
