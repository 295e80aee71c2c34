"""The registry: built-ins via entry points, test plugins in-process, clashes and breakage."""

from __future__ import annotations

import inspect
import subprocess
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import atmbench
from atmbench import hookspecs, plugins, runner
from atmbench.cli import cli
from atmbench.hookspecs import hookimpl
from atmbench.method import MergeMethod
from atmbench.refiner import Refiner, RefineResult
from atmbench.spec import SpecError
from atmbench.suite import Suite


def _double(base, task_vectors, ctx):
    return 2 * task_vectors.sum(0)


class MethodPlugin:
    @hookimpl
    def register_methods(self, register):
        register(MergeMethod(name="double_sum", merge=_double, data="none"))


def test_builtins_come_from_the_atmbench_entry_points():
    registered = atmbench.registry.registered_methods()
    assert {"average", "ta"} <= set(registered)
    assert registered["ta"].source.package == "atmbench"
    assert registered["ta"].source.plugin == "ta"
    assert "digits8" in atmbench.suites()


def test_every_declared_entry_point_module_registers_something():
    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    section = text.split("[project.entry-points.atmbench]")[1].split("\n[")[0]
    declared = [line.split("=")[0].strip() for line in section.splitlines() if "=" in line]
    sources = {
        r.source.plugin
        for getter in (
            atmbench.registry.registered_methods,
            atmbench.registry.registered_refiners,
            atmbench.registry.registered_suites,
        )
        for r in getter().values()
    }
    assert declared and set(declared) <= sources


def test_register_methods_in_process_then_unregister(register):
    with register(MethodPlugin(), "double"):
        methods = atmbench.methods()
        assert "double_sum" in methods
        assert atmbench.registry.registered_methods()["double_sum"].source.package == "test-double"
        base = {"w": torch.zeros(2)}
        merged = atmbench.merge("double_sum", base, {"a": {"w": torch.ones(2)}})
        assert torch.equal(merged["w"], torch.full((2,), 2.0))
    assert "double_sum" not in atmbench.methods()


def test_register_refiners(register):
    class RefinerPlugin:
        @hookimpl
        def register_refiners(self, register):
            register(Refiner("noop", lambda req: RefineResult(req.start), data="validation"))

    with register(RefinerPlugin(), "noop"):
        assert atmbench.refiners()["noop"].data == "validation"
    assert "noop" not in atmbench.refiners()


def test_register_suites(register):
    class SuitePlugin:
        @hookimpl
        def register_suites(self, register):
            register(Suite("toy", ("a",), ("m",), load=lambda *a: None))

    with register(SuitePlugin(), "toy"):
        assert atmbench.suites()["toy"].tasks == ("a",)


def test_duplicate_name_is_reported_naming_both_plugins(register, fresh_plugin_state):
    class Clash:
        @hookimpl
        def register_methods(self, register):
            register(MergeMethod(name="ta", merge=_double, data="none"))

    with register(Clash(), "clash"):
        methods = atmbench.methods()
        assert methods["ta"].merge is not _double  # the built-in wins
        (line,) = [e for e in plugins.errors() if "clash" in e]
        assert "'ta' is already registered by atmbench" in line


def test_plugin_raising_in_its_hook_is_isolated(register, fresh_plugin_state):
    class Broken:
        @hookimpl
        def register_methods(self, register):
            register(MergeMethod(name="half_registered", merge=_double, data="none"))
            raise RuntimeError("boom")

    with register(Broken(), "broken"):
        methods = atmbench.methods()
        assert "ta" in methods and "half_registered" not in methods
        assert any("'broken'" in e and "boom" in e for e in plugins.errors())


def test_missing_data_access_is_a_registration_error(register, fresh_plugin_state):
    class NoData:
        @hookimpl
        def register_methods(self, register):
            register(MergeMethod(name="nodata", merge=_double))  # type: ignore[call-arg]

    with register(NoData(), "nodata"):
        assert "nodata" not in atmbench.methods()
        assert any("'nodata'" in e and "data" in e for e in plugins.errors())


def test_entry_point_that_fails_to_import_is_reported(fresh_plugin_state, monkeypatch):
    real = plugins.entry_points

    def with_broken(group):
        broken = EntryPoint("broken_ep", "atmbench_no_such_module_xyz", group)
        return [*real(group=group), broken]

    monkeypatch.setattr(plugins, "entry_points", with_broken)
    plugins.load_plugins()
    (line,) = plugins.errors()
    assert line.startswith("plugin 'broken_ep'") and "failed to import" in line
    assert "ta" in atmbench.methods()


def _with_broken_entry_point(monkeypatch, name="fancymerge", module="atmbench_no_such_module_xyz"):
    real = plugins.entry_points
    monkeypatch.setattr(
        plugins, "entry_points", lambda group: [*real(group=group), EntryPoint(name, module, group)]
    )


def test_an_unknown_method_names_the_plugin_that_failed_to_import(fresh_plugin_state, monkeypatch):
    _with_broken_entry_point(monkeypatch)
    with pytest.raises(SpecError) as info:
        runner.plan("digits8", None, ["ta", "fancymerge"], [0])
    message = str(info.value)
    assert message.startswith(
        "unknown method 'fancymerge' (plugin 'fancymerge' from ? ? failed to import: "
        "ModuleNotFoundError: No module named 'atmbench_no_such_module_xyz') (valid: "
    )
    assert "\n" not in message
    # a name no failure concerns still lists every failure: it may be the cause
    with pytest.raises(SpecError, match=r"unknown method 'zzz' \(1 plugin\(s\) failed to load: "):
        runner.plan("digits8", None, ["zzz"], [0])
    with pytest.raises(SpecError, match=r"unknown refiner 'fancymerge' \(plugin 'fancymerge' from"):
        runner.plan("digits8", None, ["ta+fancymerge"], [0])
    with pytest.raises(ValueError, match=r"unknown suite 'fancymerge' \(plugin 'fancymerge' from"):
        atmbench.registry.get_suite("fancymerge")


def test_the_cli_names_the_failed_plugin_in_one_line(fresh_plugin_state, monkeypatch, home):
    _with_broken_entry_point(monkeypatch)
    result = CliRunner().invoke(cli, ["run", "--methods", "ta,fancymerge", "--dry-run"])
    assert result.exit_code == 1
    (line,) = [row for row in result.output.splitlines() if row.startswith("Error")]
    assert "unknown method 'fancymerge' (plugin 'fancymerge' from ? ? failed to import: " in line
    result = CliRunner().invoke(cli, ["list"])
    assert result.exit_code == 0
    assert "Warning: plugin 'fancymerge' from ? ? failed to import: ModuleNotFoundError" in (
        result.output
    )


def test_an_unknown_method_names_the_hook_that_dropped_it(register, fresh_plugin_state):
    class Broken:
        @hookimpl
        def register_methods(self, register):
            register(MergeMethod(name="fancymerge", merge=_double, data="none"))
            raise RuntimeError("boom")

    with register(Broken(), "broken"), pytest.raises(SpecError) as info:
        runner.plan("digits8", None, ["fancymerge"], [0])
    assert str(info.value).startswith(
        "unknown method 'fancymerge' (plugin 'broken' (test-broken 0.0 (broken)) failed in "
        "register_methods: RuntimeError: boom) (valid: "
    )


def test_a_clash_in_one_hook_drops_only_that_hooks_items(register, fresh_plugin_state):
    class Clash:
        @hookimpl
        def register_methods(self, register):
            register(MergeMethod(name="mine", merge=_double, data="none"))
            register(MergeMethod(name="ta", merge=_double, data="none"))

        @hookimpl
        def register_refiners(self, register):
            register(Refiner("mine_refiner", lambda req: RefineResult(req.start), data="none"))

    with register(Clash(), "clash"):
        assert "mine" not in atmbench.methods()  # the whole hook is dropped, not just 'ta'
        assert "mine_refiner" in atmbench.refiners()  # the plugin's other hooks stay
        with pytest.raises(SpecError, match=r"'mine' .*'ta' is already registered by atmbench"):
            runner.plan("digits8", None, ["mine"], [0])


def test_allow_list_skips_unlisted_third_party_entry_points(fresh_plugin_state, monkeypatch):
    real = plugins.entry_points
    monkeypatch.setattr(
        plugins,
        "entry_points",
        lambda group: [*real(group=group), EntryPoint("other", "no_such_mod", group)],
    )
    monkeypatch.setenv(plugins.ALLOW_ENV, "")
    plugins.load_plugins()
    assert plugins.errors() == []


@pytest.mark.parametrize("name", ["register_methods", "register_refiners", "register_suites"])
def test_every_hookspec_has_a_test(name):
    specs = {n for n, f in inspect.getmembers(hookspecs, inspect.isfunction)}
    assert name in specs
    tests = inspect.getsource(__import__(__name__))
    assert f"def test_{name}" in tests
    assert specs == {"register_methods", "register_refiners", "register_suites"}


def test_loading_the_plugins_imports_no_backbone_library():
    """``atmbench list`` and ``atmbench merge`` load every plugin: open_clip and torchvision
    (seconds to import) must wait until a backbone or its Grams are needed."""
    code = (
        "import sys, atmbench; atmbench.methods(); atmbench.refiners(); "
        "print(sorted({'open_clip', 'torchvision'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
