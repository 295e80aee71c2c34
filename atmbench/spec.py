"""Method spec strings and the run grid.

Grammar: ``METHOD[:k=v[,k=v...]][+REFINER[:k=v...]]...`` or ``REFINER[:k=v...]`` alone
(a refiner that starts from the base, e.g. ``atm``). On the command line specs are
comma-separated; a comma followed by ``k=v`` continues the previous spec, so
``ta:lam=0.3,ties:k=0.2,lam=0.5`` is two specs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from atmbench import plugins
from atmbench.cache import key_hash
from atmbench.hparams import HParamError, resolve
from atmbench.method import MergeMethod
from atmbench.refiner import Refiner

REFERENCES = ("pretrained", "experts", "mtl")
"""Reference rows computed for every (suite, model, seed): the pretrained lower bound, the
individual experts' upper bound and joint multi-task training at the experts' compute."""

_KV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


class SpecError(ValueError):
    """A spec string names something unknown or is malformed."""


@dataclass(frozen=True)
class Part:
    name: str
    fixed: Mapping[str, Any] = field(default_factory=dict)

    def label(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in sorted(self.fixed.items()))
        return f"{self.name}:{args}" if args else self.name


@dataclass(frozen=True)
class MethodSpec:
    """A parsed spec: an optional merge method followed by zero or more refiners."""

    method: Part | None
    refiners: tuple[Part, ...] = ()

    @property
    def label(self) -> str:
        parts = ([self.method] if self.method else []) + list(self.refiners)
        return "+".join(p.label() for p in parts)


def split_specs(text: str) -> list[str]:
    """Split a comma-separated list of specs, keeping ``,k=v`` with the spec before it."""
    specs: list[str] = []
    for token in (t.strip() for t in text.split(",")):
        if not token:
            continue
        if _KV.match(token) and specs:
            specs[-1] += "," + token
        else:
            specs.append(token)
    return specs


def _parse_part(text: str) -> tuple[str, dict[str, str]]:
    name, _, args = text.partition(":")
    fixed: dict[str, str] = {}
    for item in filter(None, args.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise SpecError(f"malformed hyperparameter {item!r} in {text!r}: expected NAME=VALUE")
        fixed[key.strip()] = value.strip()
    return name.strip(), fixed


def parse_spec(
    text: str, methods: Mapping[str, MergeMethod], refiners: Mapping[str, Refiner]
) -> MethodSpec:
    """Parse and validate one spec: unknown names and bad values fail here, before any work."""
    pieces = [p for p in text.split("+")]
    if not text.strip() or any(not p.strip() for p in pieces):
        raise SpecError(f"empty method spec in {text!r}")
    parsed = [_parse_part(p) for p in pieces]
    head_name, head_args = parsed[0]
    aliases = {a: n for n, m in methods.items() for a in m.aliases if a not in methods}
    head_name = aliases.get(head_name, head_name)
    method = None
    rest = parsed
    if head_name in methods:
        method = Part(head_name, _checked(methods[head_name].all_hparams(), head_args, head_name))
        rest = parsed[1:]
    elif head_name not in refiners or refiners[head_name].data_from_base is None:
        valid = sorted([*methods, *aliases]) + sorted(
            n for n, r in refiners.items() if r.data_from_base
        )
        raise SpecError(
            f"unknown method {head_name!r}{plugins.explain(head_name)} (valid: {', '.join(valid)})"
        )
    parts = []
    for name, args in rest:
        if name not in refiners:
            valid = ", ".join(sorted(refiners)) or "none"
            raise SpecError(
                f"unknown refiner {name!r}{plugins.explain(name)} in {text!r} (valid: {valid})"
            )
        parts.append(Part(name, _checked(refiners[name].hparams, args, name)))
    return MethodSpec(method, tuple(parts))


def _checked(declared, given: Mapping[str, str], owner: str) -> dict[str, Any]:
    try:
        return resolve(declared, given, owner)
    except HParamError as exc:
        raise SpecError(str(exc)) from None


@dataclass(frozen=True)
class Cell:
    """One (suite, model, method spec, seed): the unit that is scheduled, cached and stored."""

    suite: str
    model: str
    spec: MethodSpec | str
    """A parsed spec, or one of :data:`REFERENCES`."""
    seed: int
    identity: Mapping[str, Any] = field(default_factory=dict)
    """Everything else that decides the numbers (search spaces, method versions, suite)."""

    @property
    def method(self) -> str:
        return self.spec if isinstance(self.spec, str) else self.spec.label

    def config(self) -> dict[str, Any]:
        return {
            "suite": self.suite,
            "model": self.model,
            "method": self.method,
            "seed": self.seed,
            **self.identity,
        }

    @property
    def key(self) -> str:
        return key_hash(self.config())


def describe(declared: Sequence, fixed: Mapping[str, Any]) -> dict[str, Any]:
    """A search space as stored in a cell's identity: fixed values or the searched grid."""
    return {
        h.name: fixed[h.name] if h.name in fixed else list(h.search or (h.default,))
        for h in declared
    }


def describe_refiner(declared: Sequence, fixed: Mapping[str, Any]) -> dict[str, Any]:
    """A refiner's hyperparameters as stored in a cell's identity: the value used, or the
    searched grid (a list) for a hyperparameter with a search grid that the spec does not pin.

    Unlike :func:`describe`, a hyperparameter without a grid is stored as its bare default,
    so the keys of cells whose refiners search nothing stay what they always were.
    """
    return {
        h.name: fixed[h.name] if h.name in fixed else (list(h.search) if h.search else h.default)
        for h in declared
    }
