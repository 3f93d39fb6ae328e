"""JSON for the frozen dataclasses that describe an NCA or a decoder (``NCASpec``, ``DecoderSpec``)."""
from __future__ import annotations

import dataclasses
import json
from typing import Any

MAX_SPEC_JSON = 1 << 20  # characters: a spec is a few KB


class JsonSpec:
    """``to_dict`` / ``to_json`` / ``from_dict`` / ``from_json`` / ``replace`` for a frozen dataclass;
    bad input (not an object, unknown fields, nesting too deep, too long) raises ValueError."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def _fields_from_json(cls, d: dict) -> dict:
        """Turn parsed values into field values (nested dataclasses); the identity by default."""
        return d

    @classmethod
    def from_dict(cls, d: dict):
        name = cls.__name__
        if not isinstance(d, dict):
            raise ValueError(f"{name} must be a JSON object, got {type(d).__name__}")
        unknown = sorted(map(str, set(d) - {f.name for f in dataclasses.fields(cls)}))
        if unknown:
            more = f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""
            raise ValueError(f"unknown {name} fields: {[u[:40] for u in unknown[:8]]}{more}")
        try:
            return cls(**cls._fields_from_json(dict(d)))
        except TypeError as e:  # a field of the wrong type where a container was expected
            raise ValueError(f"{name}: {str(e)[:200]}") from None

    @classmethod
    def from_json(cls, s: str):
        name = cls.__name__
        if not isinstance(s, str):
            raise ValueError(f"{name} JSON must be a string, got {type(s).__name__}")
        if len(s) > MAX_SPEC_JSON:
            raise ValueError(f"{name} JSON of {len(s)} characters is longer than {MAX_SPEC_JSON}")
        try:
            d = json.loads(s)
        except RecursionError:
            raise ValueError(f"{name} JSON is nested too deeply") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{name}: not valid JSON ({e})") from None
        return cls.from_dict(d)

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)
