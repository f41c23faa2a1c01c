"""Guards: models that score text. They return scores, never decisions; thresholds live in policies."""
