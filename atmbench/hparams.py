"""Declared hyperparameters: defaults, validation search spaces and range checks.

Declaring them (rather than reading ``**kwargs``) lets the runner reject a bad value
such as ``ties:k=1.7`` before any work starts, and lets the search space be part of a
cell's identity in the result store.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


class HParamError(ValueError):
    """A hyperparameter value is unknown, malformed or out of range."""


@dataclass(frozen=True)
class HParam:
    """One hyperparameter of a method or refiner.

    ``search`` is the grid tried on the validation split (the papers' protocol); an
    empty tuple means the default is always used. ``low``/``high`` bound the value
    (inclusive unless ``open_low``/``open_high``); ``choices`` restricts strings.
    """

    name: str
    default: Any
    search: tuple = ()
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    choices: tuple = ()
    help: str = ""
    type: type = field(default=float)

    def __post_init__(self) -> None:
        for value in (self.default, *self.search):
            self.check(value)

    def describe_range(self) -> str:
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        lo = "(" if self.open_low else "["
        hi = ")" if self.open_high else "]"
        low = "-inf" if self.low is None else self.low
        high = "inf" if self.high is None else self.high
        return f"a {self.type.__name__} in {lo}{low}, {high}{hi}"

    def check(self, value: Any) -> Any:
        """Return ``value`` converted to this type, or raise :class:`HParamError`."""
        bad = HParamError(f"{self.name}={value} is invalid: expected {self.describe_range()}")
        try:
            if self.type is bool and isinstance(value, str):
                if value.lower() not in {"true", "false", "1", "0"}:
                    raise bad
                value = value.lower() in {"true", "1"}
            value = self.type(value)
        except (TypeError, ValueError):
            raise bad from None
        if self.choices and value not in self.choices:
            raise bad
        if self.type in (int, float):
            if value != value:  # NaN
                raise bad
            if self.low is not None and (value < self.low or (self.open_low and value == self.low)):
                raise bad
            if self.high is not None and (
                value > self.high or (self.open_high and value == self.high)
            ):
                raise bad
        return value


def resolve(declared: Sequence[HParam], given: Mapping[str, Any], owner: str) -> dict[str, Any]:
    """Check ``given`` against ``declared`` and return the checked values (no defaults)."""
    by_name = {h.name: h for h in declared}
    checked = {}
    for name, value in given.items():
        if name not in by_name:
            valid = ", ".join(sorted(by_name)) or "none"
            raise HParamError(f"{owner} has no hyperparameter {name!r} (valid: {valid})")
        try:
            checked[name] = by_name[name].check(value)
        except HParamError as exc:
            raise HParamError(f"{owner}: {exc}") from None
    return checked


def grid(declared: Iterable[HParam], fixed: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every combination to try on validation: fixed values pinned, others searched."""
    axes = []
    for h in declared:
        if h.name in fixed:
            values: tuple = (fixed[h.name],)
        else:
            values = h.search or (h.default,)
        axes.append([(h.name, v) for v in values])
    return [dict(combo) for combo in itertools.product(*axes)]


def defaults(declared: Iterable[HParam], fixed: Mapping[str, Any]) -> dict[str, Any]:
    return {h.name: fixed.get(h.name, h.default) for h in declared}
