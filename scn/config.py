"""Config validation: unknown keys, wrong types and out-of-range values, each named clearly.

Plain Python over plain values (Hydra stays in scn.cli), driven by what the code already
declares instead of one hand-written check per key:

- `check_arguments(target, values, prefix)` checks the keys and values a config node gives a
  class or function against its signature and type annotations *before* it is called, so a
  typo or a word where a number belongs fails with the key's name, not with a TypeError from
  deep inside (nested nodes with a `_target_` are checked the same way);
- `validate(obj, prefix, limits)` is a dataclass's own check (call it in __post_init__):
  every field against its annotation, and against its range or choices in `limits`.

Every message has one shape, "<key>=<value> is invalid: it must be <what is valid>.", so a
user learns the key, the value given and the valid range from one line.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scn.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """A numeric range: low and high bounds (None: unbounded), each closed unless `*_open`."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            return (f"in {'(' if self.low_open else '['}{_num(self.low)}, "
                    f"{_num(self.high)}{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_num(self.low)}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {_num(self.high)}"
        return "finite"


POSITIVE = Range(low=1)  # for integers: 1, 2, ...
NON_NEGATIVE = Range(low=0)
Limit = Range | tuple  # a range, or the tuple of valid choices


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


# ---------------------------------------------------------------------------------------------
# Values against annotations


def _is_none(tp) -> bool:
    return tp is None or tp is type(None)


def _union_args(tp) -> tuple | None:
    origin = typing.get_origin(tp)
    return typing.get_args(tp) if origin is typing.Union or origin is types.UnionType else None


def matches(value: Any, tp) -> bool:
    """Whether `value` (a plain config value: number, string, bool, None, list, dict) fits `tp`.

    Annotations scn's checks cannot judge (a class that is not a plain type) accept a nested
    config node or an instance; `Any` and missing annotations accept everything.
    """
    if tp is Any or tp is inspect.Parameter.empty:
        return True
    if _is_none(tp):
        return value is None
    members = _union_args(tp)
    if members is not None:
        return any(matches(value, m) for m in members)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(matches(v, a) for v, a in zip(value, args, strict=True))
        return not args or all(matches(v, args[0]) for v in value)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp in (Path, os.PathLike):
        return isinstance(value, (str, os.PathLike))
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        return isinstance(value, Mapping)
    if isinstance(tp, type):
        return isinstance(value, (tp, Mapping))
    return True


def describe(tp, limit: Limit | None = None) -> str:
    """What a value of annotation `tp` (within `limit`) looks like, in words."""
    if isinstance(limit, tuple):
        return "one of " + ", ".join(str(c) for c in limit)
    members = _union_args(tp)
    if members is not None:
        plain = [m for m in members if not _is_none(m)]
        words = " or ".join(dict.fromkeys(describe(m, limit) for m in plain))
        return words + (" or null" if len(plain) < len(members) else "")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} " + _plural(describe(args[0]))
        return "a list" + (f" of {_plural(describe(args[0]))}" if args else "")
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
             Path: "a path", os.PathLike: "a path"}.get(tp)
    if words is None:
        words = f"a {tp.__name__} config node" if isinstance(tp, type) else str(tp)
    if isinstance(limit, Range) and tp in (int, float):
        words += f" {limit}"
    return words


def _plural(words: str) -> str:
    return words.removeprefix("an ").removeprefix("a ") + "s"


def invalid(key: str, value: Any, expectation: str) -> ConfigError:
    """The one message shape for a bad value."""
    return ConfigError(f"{key}={show(value)} is invalid: it must be {expectation}.")


def show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    return repr(value)


def check_value(key: str, value: Any, tp, limit: Limit | None = None) -> None:
    """Raise a ConfigError naming `key` unless `value` fits annotation `tp` and `limit`."""
    if not matches(value, tp):
        raise invalid(key, value, describe(tp, limit))
    if isinstance(limit, tuple):
        if value not in limit:
            raise invalid(key, value, describe(tp, limit))
    elif isinstance(limit, Range) and isinstance(value, (int, float)) and not isinstance(value, bool):
        if value not in limit:
            raise invalid(key, value, describe(tp, limit))


# ---------------------------------------------------------------------------------------------
# Dataclasses and call targets


def _hints(target) -> dict[str, Any]:
    """Resolved annotations of a function's or a class's parameters ({} if unresolvable)."""
    hints: dict[str, Any] = {}
    sources = [target]
    if isinstance(target, type):  # a dataclass declares its fields on the class, others on __init__
        sources = [target.__init__] + ([target] if dataclasses.is_dataclass(target) else [])
    for source in sources:
        try:
            hints.update(typing.get_type_hints(source))
        except Exception:  # an annotation naming something not importable here: judge nothing
            pass
    return hints


def validate(obj, prefix: str, limits: Mapping[str, Limit] | None = None) -> None:
    """Check every field of dataclass instance `obj` against its annotation and `limits`."""
    hints = _hints(type(obj))
    limits = limits or {}
    for f in dataclasses.fields(obj):
        check_value(f"{prefix}.{f.name}", getattr(obj, f.name), hints.get(f.name, Any),
                    limits.get(f.name))


def locate(path: Any) -> Any:
    """The object a `_target_` string names ("package.module.name"), or None."""
    if not isinstance(path, str) or "." not in path:
        return None
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def check_arguments(target: Callable, values: Mapping[str, Any], prefix: str,
                    supplied: Sequence[str] = (), extra: Sequence[str] = ()) -> None:
    """Check config node `values` (keys starting with "_" are Hydra's) against `target`.

    Every key must be a parameter of `target` (unless it takes **kwargs) or one of `extra`
    (keys a wrapper consumes before calling `target`); `supplied` names parameters the code
    fills in itself, which the config may not set. Each value must fit the parameter's
    annotation and, for a class with a `LIMITS` mapping, its range.
    """
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return
    open_ended = any(p.kind is p.VAR_KEYWORD for p in params.values())
    valid = [n for n, p in params.items() if n not in supplied and n != "self"
             and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)] + list(extra)
    hints = _hints(target)
    limits = getattr(target, "LIMITS", {})
    for key, value in values.items():
        if key.startswith("_") or key in extra:
            continue
        name = f"{prefix}.{key}"
        if key in supplied:
            raise ConfigError(f"{name} cannot be set: scn fills it in itself (from the dataset). "
                              f"Remove {name} from the command line or config.")
        if key not in params and not open_ended:
            raise ConfigError(f"{name}={show(value)} is not a setting: {prefix} has no key "
                              f"{key!r}. Its valid keys are {', '.join(sorted(valid))}.")
        if isinstance(value, Mapping) and "_target_" in value:
            nested = locate(value["_target_"])
            if nested is not None:
                check_arguments(nested, value, name)
            continue
        check_value(name, value, hints.get(key, Any), limits.get(key))
