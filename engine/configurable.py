"""The one way a component's config dataclass is built from a plain mapping (a YAML section)."""
from __future__ import annotations

import dataclasses


class FromDict:
    """Mixin for config dataclasses: `Config.from_dict(mapping)`, where an unknown key is an error that
    names it and lists the allowed keys; each dataclass validates its values in `__post_init__`."""

    @classmethod
    def from_dict(cls, values: dict):
        if not isinstance(values, dict):
            raise ValueError(f"{cls.__name__} must be built from a mapping, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {unknown}; allowed: {sorted(known)}")
        return cls(**values)
