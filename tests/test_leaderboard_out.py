"""``atmbench leaderboard --out``: the whole set of files, and published files never replaced
silently (the README's command run beside the published ``leaderboards/`` leaves them as they
are)."""

from __future__ import annotations

import shlex
import shutil
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_leaderboard_formats import write_fixture

from atmbench.cli import cli

REPO = Path(__file__).resolve().parents[1]
SET = ["s-m.md", "s-m.csv", "s-m.json", "s-m.tex", "s-m-atm.png", "s-m.png"]


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def drop_method(store: Path, method: str) -> None:
    with sqlite3.connect(store) as con:
        keys = [k for (k,) in con.execute("SELECT cell_key FROM cells WHERE method = ?", (method,))]
        con.executemany("DELETE FROM results WHERE cell_key = ?", [(k,) for k in keys])
        con.execute("DELETE FROM cells WHERE method = ?", (method,))


@pytest.fixture
def stores(tmp_path, monkeypatch):
    """Two stores of the same (suite, model): ``a`` with ta+atm's trace, ``b`` without ta+atm."""
    monkeypatch.chdir(tmp_path)
    a, b = tmp_path / "a.sqlite", tmp_path / "b.sqlite"
    write_fixture(a, monkeypatch)
    write_fixture(b, monkeypatch)
    drop_method(b, "ta+atm")
    return a, b


def readme_leaderboard_command() -> list[str]:
    """The README's ``atmbench leaderboard --out ...`` line, as a user would type it."""
    for line in (REPO / "README.md").read_text().splitlines():
        if line.strip().startswith("atmbench leaderboard --out"):
            return shlex.split(line.split("#")[0])[1:]
    raise AssertionError("the README shows no 'atmbench leaderboard --out' command")


def test_the_readme_command_leaves_the_published_leaderboards_byte_identical(tmp_path, monkeypatch):
    published = tmp_path / "clone" / "leaderboards"
    shutil.copytree(REPO / "leaderboards", published)
    before = snapshot(published)
    home = tmp_path / "home"
    monkeypatch.setenv("ATMBENCH_HOME", str(home))
    # a store of the published (suite, model) with other numbers, as after 'atmbench run'
    write_fixture(home / "results.sqlite", monkeypatch, suite="digits8", model="vit-tiny")
    monkeypatch.chdir(tmp_path / "clone")
    result = run(*readme_leaderboard_command())
    assert result.exit_code == 0, result.output
    assert snapshot(published) == before
    # the same command aimed at the published folder refuses, in one line, naming the files
    result = run("leaderboard", "--out", "leaderboards/")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: leaderboards: digits8-vit-tiny.md, ")
    for name in ("md", "csv", "json", "tex", "png"):
        assert f" digits8-vit-tiny.{name}" in lines[0]
    assert " digits8-vit-tiny-atm.png" in lines[0]  # no trace here: it would go
    assert "pass --overwrite" in lines[0]
    assert snapshot(published) == before


def test_out_writes_the_whole_set_and_a_rerun_changes_nothing(stores):
    a, _ = stores
    first = run("leaderboard", "--store", str(a), "--out", "boards")
    assert first.exit_code == 0
    assert sorted(p.name for p in Path("boards").iterdir()) == sorted(SET)
    files = snapshot(Path("boards"))
    again = run("leaderboard", "--store", str(a), "--out", "boards")
    assert again.exit_code == 0, again.output
    assert "wrote" not in again.output and "6 file(s) in boards already up to date" in again.output
    assert snapshot(Path("boards")) == files


def test_differing_files_are_kept_unless_overwrite_and_then_the_set_is_replaced(stores):
    a, b = stores
    assert run("leaderboard", "--store", str(a), "--out", "boards").exit_code == 0
    files = snapshot(Path("boards"))
    refused = run("leaderboard", "--store", str(b), "--out", "boards")
    assert refused.exit_code == 1
    # every file differs (other rows, other chart); the ATM chart would be stale
    assert refused.output.startswith("Error: boards: ")
    for name in SET:
        assert f" {name}" in refused.output
    assert snapshot(Path("boards")) == files
    replaced = run("leaderboard", "--store", str(b), "--out", "boards", "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert "removed boards/s-m-atm.png (stale: not in this set)" in replaced.output
    assert sorted(p.name for p in Path("boards").iterdir()) == sorted(set(SET) - {"s-m-atm.png"})
    fresh = run("leaderboard", "--store", str(b), "--out", "fresh")
    assert fresh.exit_code == 0
    fresh_files = {
        k: v.replace(b"--out fresh", b"--out boards") for k, v in snapshot(Path("fresh")).items()
    }
    assert snapshot(Path("boards")) == fresh_files  # one consistent set


def test_format_and_overwrite_are_rejected_where_they_mean_nothing(stores):
    a, _ = stores
    both = run("leaderboard", "--store", str(a), "--out", "boards", "--format", "csv")
    assert both.exit_code == 2 and "--out writes every format" in both.output
    assert not Path("boards").exists()
    alone = run("leaderboard", "--store", str(a), "--overwrite")
    assert alone.exit_code == 2 and "--overwrite applies to the files of --out" in alone.output
