"""Typed checks for config values, strict so that a file's "false" or NaN never passes for a bool or a number.

Each check takes the field's name and value and returns the value (normalised where PEFT accepts two spellings,
e.g. one layer index for a list) or raises ConfigError naming the field, the value and what is expected.
Values come from Python callers and from JSON alike, so the checks accept exactly JSON's types.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
from collections.abc import Callable
from typing import Any

from lorakit.errors import ConfigError

Check = Callable[[str, Any], Any]
MAX_RANK = 2**20  # far above any useful rank; larger values overflow torch's size arithmetic
MAX_ABS_NUMBER = 1e6  # alpha, d_initial...: larger values only ever come from a typo or a corrupt file


def _refuse(name: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        hint = " (write true/false without quotes in JSON)" if isinstance(value, str) else ""
        raise _refuse(name, value, "true or false" + hint)
    return value


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _refuse(name, value, "a positive integer")
    return value


def rank(name: str, value: Any) -> int:
    """A LoRA rank: a positive integer no larger than MAX_RANK."""
    if positive_int(name, value) > MAX_RANK:
        raise _refuse(name, value, f"a positive integer of at most {MAX_RANK} (the LoRA rank)")
    return value


def integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _refuse(name, value, "an integer")
    return value


def finite_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _refuse(name, value, "a number")
    if not math.isfinite(value) or abs(value) > MAX_ABS_NUMBER:
        raise _refuse(name, value, f"a finite number of magnitude at most {MAX_ABS_NUMBER:g}")
    return value


def probability(name: str, value: Any) -> float:
    value = finite_number(name, value)
    if not 0.0 <= value < 1.0:
        raise _refuse(name, value, "a probability in [0, 1)")
    return value


def one_of(*choices: Any) -> Check:
    def check(name: str, value: Any) -> Any:
        if not any(value == c and type(value) is type(c) for c in choices):
            raise _refuse(name, value, f"one of {choices}")
        return value

    return check


def optional(check: Check) -> Check:
    return lambda name, value: None if value is None else check(name, value)


def text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _refuse(name, value, "a string")
    return value


def text_list(name: str, value: Any) -> list[str]:
    if not isinstance(value, (list, tuple, set)) or not all(isinstance(v, str) for v in value):
        raise _refuse(name, value, "a list of strings")
    return list(value)


def text_or_text_list(name: str, value: Any) -> str | list[str]:
    return value if isinstance(value, str) else text_list(name, value)


def names_or_regex(name: str, value: Any) -> list[str] | str | None:
    """target_modules / exclude_modules: None, a list of names, "all-linear" or one regex."""
    if value is None:
        return None
    if isinstance(value, str):
        if value != "all-linear":
            regex(name, value)
        return value
    if isinstance(value, (list, tuple, set)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise _refuse(name, value, "a list of module names, a regex string or None")


def regex(name: str, value: Any) -> str:
    try:
        re.compile(text(name, value))
    except (re.error, RecursionError, OverflowError) as err:
        raise ConfigError(f"{name} {value!r} is not a valid regular expression: {err}") from None
    return value


def layer_indices(name: str, value: Any) -> list[int] | None:
    """One layer index or a list of them (PEFT accepts both); non-negative integers."""
    if value is None:
        return None
    values = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(values, (list, tuple)) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values
    ):
        raise _refuse(name, value, "a non-negative layer index or a list of them")
    return list(values)


def pattern_dict(value_check: Check) -> Check:
    """rank_pattern / alpha_pattern: {regex: value}."""

    def check(name: str, value: Any) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise _refuse(name, value, "a dict of module-name regex -> value")
        for key, item in value.items():
            regex(f"{name} key", key)
            value_check(f"{name}[{key!r}]", item)
        return dict(value)

    return check


def check_fields(config: Any, checks: dict[str, Check]) -> None:
    """Runs every field's check on `config` in place; a field without a check is a bug caught here."""
    unchecked = [f.name for f in dataclasses.fields(config) if f.name not in checks]
    if unchecked:
        raise TypeError(f"{type(config).__name__} fields without a type check: {unchecked}")
    for name, check in checks.items():
        setattr(config, name, check(name, getattr(config, name)))


def strict_init(cls: type, hints: dict[str, str]) -> type:
    """Makes `cls(unknown=...)` raise ConfigError naming the field (a dataclass raises a bare TypeError).

    hints: field -> why lorakit does not have it, for names that exist in PEFT's config.
    """
    init = cls.__init__
    known = [f.name for f in dataclasses.fields(cls)]

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        unknown = [k for k in kwargs if k not in known]
        if unknown:
            raise ConfigError(f"{cls.__name__} has no field {unknown[0]!r}: {_why_unknown(unknown[0], known, hints)}")
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


def _why_unknown(key: str, known: list[str], hints: dict[str, str]) -> str:
    if key in hints:
        return hints[key]
    close = difflib.get_close_matches(key, known, n=1)
    return f"did you mean {close[0]!r}?" if close else f"its fields are {', '.join(known)}"
