"""The plugin manager: loads built-in and third-party plugins through one path.

Built-in methods, refiners and suites are declared as entry points of the ``atmbench``
distribution itself (see pyproject.toml), so the path a third-party package takes is the
path every run of ours exercises. A plugin that fails to import, raises while
registering, or registers a name that is already taken is reported once, by name, and
skipped; the others keep working. A failure inside one hook drops that hook's items only
(a plugin whose ``register_methods`` clashes keeps its refiners and suites). An unknown
name is then explained by the failure that most likely dropped it (:func:`explain`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import pluggy

from atmbench import hookspecs

GROUP = "atmbench"
BUILTIN_PACKAGE = "atmbench"
ALLOW_ENV = "ATMBENCH_PLUGINS"
"""Comma-separated entry-point names of third-party plugins to load ("" loads none)."""

NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")

pm = pluggy.PluginManager(GROUP)
pm.add_hookspecs(hookspecs)


class PluginError(Exception):
    """A plugin could not be loaded or registered something invalid."""


@dataclass(frozen=True)
class Source:
    """Where a registered item came from: shown by ``atmbench list`` and stored with results."""

    plugin: str
    package: str
    version: str

    def __str__(self) -> str:
        return f"{self.package} {self.version} ({self.plugin})"


@dataclass(frozen=True)
class Registered:
    item: Any
    source: Source


@dataclass(frozen=True)
class Failure:
    """A plugin that failed to import (``hook`` is None) or failed in one of its hooks."""

    plugin: str
    source: Source
    hook: str | None
    reason: str
    """``ExceptionType: message``."""
    names: tuple[str, ...] = ()
    """The names the failed hook registered, or tried to, before it failed: all dropped."""

    def __str__(self) -> str:
        if self.hook is None:
            where = f"{self.source.package} {self.source.version}"
            return f"plugin {self.plugin!r} from {where} failed to import: {self.reason}"
        return f"plugin {self.plugin!r} ({self.source}) failed in {self.hook}: {self.reason}"

    def concerns(self, name: str) -> bool:
        """True if this failure plausibly dropped an item called ``name``."""
        if name in self.names:
            return True
        if self.hook is not None:
            return False
        squashed = name.replace("_", "").replace("-", "")
        candidates = (self.plugin, self.source.package)
        return any(squashed in c.replace("_", "").replace("-", "") for c in candidates)


_sources: dict[str, Source] = {}
_errors: list[Failure] = []
_loaded = False


def load_plugins() -> None:
    """Load every entry point of the ``atmbench`` group once (idempotent)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    allow = os.environ.get(ALLOW_ENV)
    allowed = None if allow is None else {n.strip() for n in allow.split(",") if n.strip()}
    found_builtin = False
    for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        package = ep.dist.name if ep.dist else "?"
        version = ep.dist.version if ep.dist else "?"
        builtin = package == BUILTIN_PACKAGE
        found_builtin |= builtin
        if not builtin and allowed is not None and ep.name not in allowed:
            continue
        if pm.has_plugin(ep.name):
            continue
        try:
            module = ep.load()
        except Exception as exc:  # noqa: BLE001 - any import failure is the plugin's, report it
            source = Source(ep.name, package, version)
            _errors.append(Failure(ep.name, source, None, f"{type(exc).__name__}: {exc}"))
            continue
        register_plugin(module, ep.name, package=package, version=version)
    if not found_builtin:
        raise PluginError(
            "atmbench's built-in plugins are not registered: install the package "
            "(pip install -e .) so its entry points exist"
        )


def register_plugin(plugin: object, name: str, package: str = "", version: str = "") -> None:
    """Register a plugin object (a module or an instance with ``@hookimpl`` methods)."""
    pm.register(plugin, name=name)
    _sources[name] = Source(name, package or name, version or "-")


def unregister_plugin(name: str) -> None:
    pm.unregister(name=name)
    _sources.pop(name, None)


def errors() -> list[str]:
    """One line per plugin that failed to load or to register an item.

    Hook failures are found when a hook's items are collected (:func:`collect`), so the
    list is complete once the registry has collected all three hooks.
    """
    return [str(f) for f in failures()]


def failures() -> list[Failure]:
    """The failures behind :func:`errors`, with what each dropped."""
    load_plugins()
    return list(_errors)


def explain(name: str) -> str:
    """Why ``name`` may be missing: the failures that concern it, else every failure, as
    text to append to an "unknown ..." message ("" when every plugin loaded)."""
    found = failures()
    related = [f for f in found if f.concerns(name)]
    if related:
        return " (" + "; ".join(map(str, related)) + ")"
    if found:
        return f" ({len(found)} plugin(s) failed to load: " + "; ".join(map(str, found)) + ")"
    return ""


def _impls_in_order(hook_name: str) -> Iterator[tuple[str, Callable]]:
    """Built-ins first, then the rest by name: registration order never decides a clash."""
    impls = getattr(pm.hook, hook_name).get_hookimpls()
    builtin_first = sorted(
        impls,
        key=lambda i: (_source(i.plugin_name).package != BUILTIN_PACKAGE, i.plugin_name),
    )
    for impl in builtin_first:
        yield impl.plugin_name, impl.function


def _source(plugin_name: str) -> Source:
    return _sources.get(plugin_name, Source(plugin_name, plugin_name, "-"))


def collect(hook_name: str, kind: type, noun: str) -> dict[str, Registered]:
    """Call one registration hook plugin by plugin and return name -> item with its source.

    Errors are recorded (see :func:`errors`) rather than raised, so that one broken
    plugin cannot take the whole command line down with it.
    """
    load_plugins()
    items: dict[str, Registered] = {}
    for plugin_name, function in _impls_in_order(hook_name):
        source = _source(plugin_name)
        pending: dict[str, Registered] = {}
        attempted: list[str] = []

        def register(item: object, _pending=pending, _source=source, _tried=attempted) -> None:
            if isinstance(getattr(item, "name", None), str):
                _tried.append(item.name)
            if not isinstance(item, kind):
                raise PluginError(
                    f"register() expects a {kind.__name__}, got {type(item).__name__}"
                )
            name = item.name
            if not NAME_RE.match(name):
                raise PluginError(f"{noun} name {name!r} must match {NAME_RE.pattern}")
            if name in items or name in _pending:
                owner = items[name].source if name in items else _source
                raise PluginError(f"{noun} {name!r} is already registered by {owner}")
            _pending[name] = Registered(item, _source)

        try:
            function(register=register)
        except Exception as exc:  # noqa: BLE001 - a plugin's bug is reported, not fatal
            reason = str(exc) if isinstance(exc, PluginError) else f"{type(exc).__name__}: {exc}"
            failure = Failure(plugin_name, source, hook_name, reason, tuple(attempted))
            if failure not in _errors:
                _errors.append(failure)
            continue
        items.update(pending)
    return items
