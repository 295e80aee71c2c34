"""The plugin contract: three registration hooks, each taking a ``register`` callback.

Hooks receive a callback instead of returning lists so that one plugin can register
any number of items and the plugin manager can attribute each item to its plugin.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("atmbench")
hookimpl = pluggy.HookimplMarker("atmbench")


@hookspec
def register_methods(register):
    """Register merge methods: call ``register(MergeMethod(...))`` once per method."""


@hookspec
def register_refiners(register):
    """Register refiners (e.g. ATM refinement): call ``register(Refiner(...))``."""


@hookspec
def register_suites(register):
    """Register task suites: call ``register(Suite(...))`` once per suite."""
