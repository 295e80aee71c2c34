"""A real third-party plugin: plugins/atmbench-doge installed with pip, used by the CLI.

The package is installed once per session with ``pip install --target`` into a private
directory (setuptools builds it, the entry point lands in its ``.dist-info``), and the CLI
runs in subprocesses that see it through PYTHONPATH, so this venv is left untouched. Two
broken plugins sit beside it: one whose module fails to import, one that registers an
invalid method. Each must give one warning line naming it while everything else works.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PLUGIN = ROOT / "plugins" / "atmbench-doge"
DOGE_VERSION = "0.1.0"

BROKEN = {
    "broken_import": ("broken-import", "import atmbench_no_such_dependency_xyz\n"),
    "bad_registration": (
        "bad-registration",
        "from atmbench.hookspecs import hookimpl\n"
        "from atmbench.method import MergeMethod\n\n\n"
        "@hookimpl\n"
        "def register_methods(register):\n"
        "    register(MergeMethod(name='Bad-Name', merge=print, data='none'))\n",
    ),
}


def _write_dist(site: Path, module: str, dist: str, source: str) -> None:
    """A minimal installed distribution: a module and a .dist-info with its entry point."""
    (site / f"{module}.py").write_text(source)
    info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[atmbench]\n{module} = {module}\n")


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory) -> Path:
    """plugins/atmbench-doge installed by pip (from a copy, so no build files land in the repo)."""
    work = tmp_path_factory.mktemp("plugin")
    source = work / "atmbench-doge"
    ignore = shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".pytest_cache")
    shutil.copytree(PLUGIN, source, ignore=ignore)
    site = work / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        + ["--no-deps", "--no-build-isolation", "--target", str(site), str(source)],
        check=True,
        capture_output=True,
        text=True,
    )
    return site


@pytest.fixture(scope="session")
def broken_site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("broken-site")
    for module, (dist, source) in BROKEN.items():
        _write_dist(site, module, dist, source)
    return site


def atmbench_cli(
    *args: str, path: list[Path], home: Path, timeout: int = 120
) -> subprocess.CompletedProcess:
    """The installed ``atmbench`` command, seeing the plugin directories through PYTHONPATH."""
    script = Path(sys.executable).with_name("atmbench")
    command = (
        [str(script)]
        if script.exists()
        else [sys.executable, "-c", "from atmbench.cli import cli; cli()"]
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(map(str, path)), ATMBENCH_HOME=str(home))
    env.pop("ATMBENCH_PLUGINS", None)
    return subprocess.run(
        command + list(args), capture_output=True, text=True, env=env, timeout=timeout
    )


def test_pip_installs_the_plugin_with_its_entry_point(plugin_site):
    info = plugin_site / f"atmbench_doge-{DOGE_VERSION}.dist-info"
    assert "[atmbench]\ndoge = atmbench_doge" in (info / "entry_points.txt").read_text()
    assert (plugin_site / "atmbench_doge" / "doge.py").exists()


def test_list_shows_doge_and_one_warning_per_broken_plugin(plugin_site, broken_site, tmp_path):
    result = atmbench_cli("list", path=[plugin_site, broken_site], home=tmp_path)
    assert result.returncode == 0, result.stderr
    (line,) = [row for row in result.stdout.splitlines() if row.strip().startswith("doge ")]
    assert f"atmbench-doge {DOGE_VERSION} (doge)" in line and "[data: none]" in line
    listed = {row.split()[0] for row in result.stdout.splitlines() if row.startswith("  ")}
    assert {"ta", "average", "doge", "digits8"} <= listed
    warnings = [row for row in result.stderr.splitlines() if row.startswith("Warning")]
    assert len(warnings) == 2, result.stderr
    by_plugin = {name: [w for w in warnings if f"plugin {name!r}" in w] for name in BROKEN}
    (imported,) = by_plugin["broken_import"]
    assert "broken-import 0.1 failed to import: ModuleNotFoundError" in imported
    (registered,) = by_plugin["bad_registration"]
    assert "failed in register_methods: method name 'Bad-Name' must match" in registered
    assert "Traceback" not in result.stderr


def test_run_doge_on_digits8(plugin_site, shared_home, tmp_path):
    """A tiny DOGE (2 Adam steps, fixed c) end to end. It shares the session's backbone and
    expert cache and reference rows (made by the CLI tests before it; alone, it makes them)
    but writes to its own copy of the result store."""
    store = tmp_path / "results.sqlite"
    if (shared_home / "results.sqlite").exists():  # reuse the reference rows, add to a copy
        shutil.copy(shared_home / "results.sqlite", store)
    spec = "doge:lam=0.07,steps=2"
    result = atmbench_cli(
        *("run", "--suite", "digits8", "--model", "vit-micro", "--quiet"),
        *("--methods", spec, "--store", str(store)),
        path=[plugin_site],
        home=shared_home,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr
    assert f"| {spec}" in result.stdout and "| experts" in result.stdout
    with sqlite3.connect(store) as con:
        (config,) = con.execute("SELECT config FROM cells WHERE method = ?", (spec,)).fetchone()
        accuracies = [
            a
            for (a,) in con.execute(
                "SELECT accuracy FROM rows WHERE method = ? AND split = 'test'", (spec,)
            )
        ]
    assert json.loads(config)["merge"]["hparams"]["steps"] == 2
    assert len(accuracies) == 8 and all(0.0 <= a <= 100.0 for a in accuracies)


def test_the_plugins_own_tests_pass(plugin_site):
    """What the plugin's CI runs: its test suite against the installed package."""
    env = dict(os.environ, PYTHONPATH=str(plugin_site))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(PLUGIN / "tests")],
        capture_output=True,
        text=True,
        env=env,
        cwd=PLUGIN,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:]
