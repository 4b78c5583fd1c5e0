"""JSON round-tripping shared by moeify's frozen config dataclasses (MoEConfig, UpcycleConfig)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, TypeVar

from moeify.errors import ConfigError, MoeifyError

C = TypeVar("C", bound="JsonConfig")


class JsonConfig:
    """Mixin for a frozen dataclass: `replace`, `to_dict`/`to_json`, and validating `from_dict`/`from_json`.

    `from_dict` rejects what `cls(**data)` would turn into a confusing TypeError: a non-dict, unknown fields
    (listed against the valid ones) and missing required fields. Field values are then validated by the
    class's own `__post_init__`.
    """

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def _config_error(cls, message: str) -> MoeifyError:
        return ConfigError(message)

    @classmethod
    def from_dict(cls: type[C], data: dict) -> C:
        name = cls.__name__
        if not isinstance(data, dict):
            raise cls._config_error(f"a {name} must be a JSON object / dict, got {type(data).__name__}")
        fields = dataclasses.fields(cls)
        known = {f.name for f in fields}
        unknown = sorted(set(data) - known)
        if unknown:
            raise cls._config_error(
                f"unknown {name} field(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}"
            )
        required = [f.name for f in fields
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [field for field in required if field not in data]
        if missing:
            raise cls._config_error(f"{name} is missing required field(s) {', '.join(missing)}")
        return cls(**data)

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise cls._config_error(f"{cls.__name__} JSON is not valid JSON: {e}") from None
        return cls.from_dict(data)
