"""A small structural validator for JSON documents that names the bad field.

JSON Schema would do, but the serving image should not carry a validator stack for
one document; this covers what our contracts need: types, optional keys, lists,
nested objects and value checks, and error messages with a path such as
``targets[0].threshold.similarity``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


class SchemaError(ValueError):
    """A document does not match its schema; ``path`` says where."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(f"{path or '<document>'}: {why}")
        self.path = path
        self.why = why


@dataclass(frozen=True)
class Opt:
    """A key that may be absent or null."""

    spec: Any


@dataclass(frozen=True)
class ListOf:
    spec: Any
    min_len: int = 0


@dataclass(frozen=True)
class MapOf:
    """An object with free keys whose values all follow ``spec``."""

    spec: Any


@dataclass(frozen=True)
class Check:
    """A base spec plus a predicate; ``why`` explains a failure."""

    spec: Any
    ok: Callable[[Any], bool]
    why: str


NUMBER = (int, float)


def validate(value: Any, spec: Any, path: str = "") -> None:
    """Raise :class:`SchemaError` at the first place where ``value`` breaks ``spec``."""
    if isinstance(spec, Opt):
        if value is not None:
            validate(value, spec.spec, path)
    elif isinstance(spec, Check):
        validate(value, spec.spec, path)
        if not spec.ok(value):
            raise SchemaError(path, f"{spec.why} (got {value!r})")
    elif isinstance(spec, ListOf):
        _need(isinstance(value, list), path, "expected a list", value)
        _need(len(value) >= spec.min_len, path, f"needs at least {spec.min_len} entries", value)
        for i, item in enumerate(value):
            validate(item, spec.spec, f"{path}[{i}]")
    elif isinstance(spec, MapOf):
        _need(isinstance(value, dict), path, "expected an object", value)
        for key, item in value.items():
            validate(item, spec.spec, _join(path, key))
    elif isinstance(spec, Mapping):
        _need(isinstance(value, dict), path, "expected an object", value)
        for key, sub in spec.items():
            if key not in value or value[key] is None:
                if not isinstance(sub, Opt):
                    raise SchemaError(_join(path, key), "required field is missing")
                continue
            validate(value[key], sub, _join(path, key))
    else:
        _check_type(value, spec, path)


def _check_type(value: Any, spec: type | tuple[type, ...], path: str) -> None:
    kinds = spec if isinstance(spec, tuple) else (spec,)
    # bool is an int in Python, but never a number in a JSON contract.
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    names = " or ".join(k.__name__ for k in kinds)
    _need(ok, path, f"expected {names}", value)


def _need(ok: bool, path: str, why: str, value: Any) -> None:
    if not ok:
        raise SchemaError(path, f"{why}, got {type(value).__name__} {_short(value)}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
