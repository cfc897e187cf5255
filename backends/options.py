"""Backend options: frozen dataclasses, defaults in the dataclass only, unknown keys an error,
strings from the command line coerced to the field's type, build-time apart from run-time."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from pipeline.errors import InputError


def runtime_option(default: Any) -> Any:
    """A field that only affects running an engine, not building it: kept out of the cache key."""
    return dataclasses.field(default=default, metadata={"runtime": True})


O = TypeVar("O", bound="BackendOptions")


@dataclass(frozen=True)
class BackendOptions:
    """Base of every backend's options: frozen, defaults in the dataclass only, unknown keys an error."""

    @classmethod
    def from_mapping(cls: type[O], values: Mapping[str, Any] | None = None) -> O:
        values = dict(values or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise InputError(f"unknown option(s) {', '.join(unknown)} for {cls.__name__}; valid: {', '.join(fields) or '(none)'}")
        hints = typing.get_type_hints(cls)
        coerced = {k: _coerce(k, v, hints[k]) for k, v in values.items()}
        options = cls(**coerced)  # a backend's own checks first: their messages say more
        for k, v in coerced.items():  # counts, sizes, budgets and levels: none of them is meaningful below zero
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0:
                raise InputError(f"option {k}={v!r}: must be >= 0")
        return options

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def build_options(self) -> dict[str, Any]:
        """The options that force a rebuild: everything not marked runtime_option."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.metadata.get("runtime")}


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Strings from the command line become the field's type; anything else must already match."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else (hint,)
    if typing.get_origin(hint) is typing.Literal:
        if value not in typing.get_args(hint):
            raise InputError(f"option {name}={value!r}; valid: {', '.join(map(str, typing.get_args(hint)))}")
        return value
    if not isinstance(value, str) or str in allowed:
        return value
    if value.lower() in ("none", "null") and type(None) in allowed:
        return None
    if bool in allowed and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    for t in (int, float):
        if t in allowed:
            try:
                number = t(value)
            except ValueError:
                continue
            if not math.isfinite(number):
                raise InputError(f"option {name}={value!r}: must be a finite number")
            return number
    raise InputError(f"option {name}={value!r} is not a valid {hint}")
