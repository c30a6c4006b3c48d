"""Typed settings that travel to a Triton model as `config.pbtxt` parameters.

The repository generator builds one of these dataclasses and writes `parameters()`; the model reads
them back with `from_parameters`. Both ends share the field names, types and defaults, so a setting is
defined once and arrives typed. Parameters the class does not name (another settings class's, in the
same model) are left alone.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

S = TypeVar("S", bound="ModelParameters")
_PARSERS = {int: int, float: float, str: str, bool: lambda value: value == "true"}


def config_parameters(config: Mapping[str, Any]) -> dict[str, str]:
    """The `parameters` of a model config as Triton gives it in JSON; an empty string_value comes without
    the key."""
    return {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}


class ModelParameters:
    """Mixin for a frozen dataclass of int, float, str and bool fields."""

    def parameters(self) -> dict[str, str]:
        values = dataclasses.asdict(self)
        return {name: str(value).lower() if isinstance(value, bool) else str(value) for name, value in values.items()}

    @classmethod
    def from_parameters(cls: type[S], params: Mapping[str, str], **values: Any) -> S:
        """The settings named in ``params`` (strings), over ``values``, over the fields' defaults."""
        types = typing.get_type_hints(cls)
        parsed = {f.name: _PARSERS[types[f.name]](params[f.name]) for f in dataclasses.fields(cls) if f.name in params}
        return cls(**{**values, **parsed})

    def with_parameters(self: S, params: Mapping[str, str]) -> S:
        """These settings with the fields named in ``params`` replaced."""
        return type(self).from_parameters(params, **dataclasses.asdict(self))
