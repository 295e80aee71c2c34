"""What is registered: methods, refiners and suites, each with the plugin it came from."""

from __future__ import annotations

from atmbench import plugins
from atmbench.method import MergeMethod
from atmbench.plugins import Registered
from atmbench.refiner import Refiner
from atmbench.suite import Suite


def registered_methods() -> dict[str, Registered]:
    return plugins.collect("register_methods", MergeMethod, "method")


def registered_refiners() -> dict[str, Registered]:
    return plugins.collect("register_refiners", Refiner, "refiner")


def registered_suites() -> dict[str, Registered]:
    return plugins.collect("register_suites", Suite, "suite")


def methods() -> dict[str, MergeMethod]:
    """Every registered merge method by name."""
    return {name: r.item for name, r in registered_methods().items()}


def refiners() -> dict[str, Refiner]:
    """Every registered refiner by name."""
    return {name: r.item for name, r in registered_refiners().items()}


def suites() -> dict[str, Suite]:
    """Every registered suite by name."""
    return {name: r.item for name, r in registered_suites().items()}


def get_suite(name: str) -> Suite:
    available = suites()
    if name not in available:
        raise ValueError(
            f"unknown suite {name!r}{plugins.explain(name)} (valid: {', '.join(sorted(available))})"
        )
    return available[name]
