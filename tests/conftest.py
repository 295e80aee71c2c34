"""Shared fixtures: an isolated ATMBENCH_HOME, in-process plugin registration, tiny tensors."""

from __future__ import annotations

import contextlib

import pytest
import torch

from atmbench import kernels, plugins


@pytest.fixture(scope="session", autouse=True)
def _compiled_kernels():
    """Tests check the compiled kernels, which users' merges run once they are ready: wait for
    them, or a test's first merges would run their torch forms while they compile."""
    kernels.compile_kernels()


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh, empty ATMBENCH_HOME for one test."""
    monkeypatch.setenv("ATMBENCH_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="session")
def shared_home(tmp_path_factory):
    """One ATMBENCH_HOME for the session: the tiny backbone and experts are trained once."""
    return tmp_path_factory.mktemp("shared-home")


@pytest.fixture
def use_shared_home(shared_home, monkeypatch):
    monkeypatch.setenv("ATMBENCH_HOME", str(shared_home))
    return shared_home


@pytest.fixture
def register():
    """``with register(obj, "name"):`` registers a plugin object for the block only."""

    @contextlib.contextmanager
    def _register(plugin: object, name: str):
        plugins.register_plugin(plugin, name, package=f"test-{name}", version="0.0")
        try:
            yield plugin
        finally:
            plugins.unregister_plugin(name)

    return _register


@pytest.fixture
def fresh_plugin_state(monkeypatch):
    """Let a test re-run entry-point loading with its own errors list."""
    monkeypatch.setattr(plugins, "_loaded", False)
    monkeypatch.setattr(plugins, "_errors", [])
    return plugins
