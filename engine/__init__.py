"""AlignFlow engine: models, transport, samplers (and, from other issues, data and trainer)."""
