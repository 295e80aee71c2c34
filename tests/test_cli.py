"""The command line, end to end on the tiny ``vit-micro`` config of digits8."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from atmbench.cli import cli

TINY = ["--model", "vit-micro", "--quiet"]


def invoke(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_help_lists_the_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("run", "list", "leaderboard"):
        assert command in result.output


def test_list_shows_sources():
    result = invoke("list")
    assert result.exit_code == 0
    assert "ta " in result.output and "atmbench 0.1.0 (ta)" in result.output
    assert "digits8" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "nope"], "unknown method 'nope' (valid: "),
        (["--suite", "nope"], "unknown suite 'nope' (valid: digits8"),
        (["--model", "vit-huge"], "unknown model 'vit-huge' for suite 'digits8' (valid: vit-tiny"),
        (["--methods", "ta:lam=-1"], "lam=-1 is invalid: expected a float in [0.0, inf]"),
        (["--methods", "ta:alpha=1"], "ta has no hyperparameter 'alpha' (valid: lam)"),
        (["--seeds", "a"], "'a' is not a valid seed (valid: comma-separated integers from 0 to"),
        (["--seeds", "0,-1"], "'-1' is not a valid seed (valid: comma-separated integers from 0"),
        (["--seeds", "1.5"], "'1.5' is not a valid seed"),
        (["--seeds", ","], "'' is not a valid seed"),
    ],
)
def test_bad_input_is_one_line_error(args, message, home):
    result = CliRunner().invoke(cli, ["run", *args])
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (home / "experts").exists()


@pytest.mark.parametrize("command", [["run"], ["run", "--dry-run"], ["leaderboard"]])
@pytest.mark.parametrize("kind", ["file", "under a file", "uncreatable"])
def test_an_unusable_home_is_one_line_naming_it(command, kind, tmp_path, monkeypatch):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    # /proc takes no new folders, not even from root
    home = {"file": blocker, "under a file": blocker / "home", "uncreatable": None}[kind]
    home = home or Path("/proc/atmbench-test/home")
    monkeypatch.setenv("ATMBENCH_HOME", str(home))
    result = CliRunner().invoke(cli, [*command, *(TINY if command[0] == "run" else [])])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    if kind == "uncreatable" and command == ["leaderboard"]:  # reading creates nothing
        assert lines[0].startswith("Error: no results stored yet (no store at /proc/atmbench")
        return
    assert lines[0].startswith(f"Error: ATMBENCH_HOME={home} ")
    what = {"file": "(it is a file)", "under a file": f"({blocker} is a file)"}
    assert what.get(kind, "cannot be created (") in lines[0]
    assert blocker.read_text() == "not a directory"


def test_leaderboard_on_a_missing_home_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("ATMBENCH_HOME", str(tmp_path / "nowhere"))
    result = CliRunner().invoke(cli, ["leaderboard"])
    assert result.exit_code == 1
    assert result.output == (
        f"Error: no results stored yet (no store at {tmp_path / 'nowhere' / 'results.sqlite'}): "
        "run 'atmbench run' first\n"
    )
    assert not (tmp_path / "nowhere").exists()


def test_dry_run_prints_the_grid(home):
    result = invoke("run", *TINY, "--methods", "ta,average", "--seeds", "0,1", "--dry-run")
    assert result.exit_code == 0
    lines = [line for line in result.output.splitlines() if "digits8" in line]
    assert len(lines) == 10  # (pretrained, experts, mtl, ta, average) x 2 seeds
    assert all("to run" in line for line in lines)
    assert not (home / "experts").exists()


def test_no_mtl_leaves_out_only_the_mtl_row(home):
    result = invoke("run", *TINY, "--methods", "ta", "--seeds", "0,1", "--no-mtl", "--dry-run")
    lines = [line.split() for line in result.output.splitlines()]
    methods = sorted(words[3] for words in lines if words[0] == "digits8")
    assert methods == ["experts", "experts", "pretrained", "pretrained", "ta", "ta"]


def test_run_then_rerun_reuses_everything(use_shared_home):
    first = CliRunner().invoke(cli, ["run", *TINY, "--methods", "average,ta:lam=0.3"])
    assert first.exit_code == 0, first.output
    table = first.stdout
    assert "| pretrained" in table and "| experts" in table and "| ta:lam=0.3" in table
    assert "norm. avg" in table
    # after the table: where the results are and what to run next (no ATM cell: no analyze)
    assert first.stderr.splitlines()[-2:] == [
        f"Results are stored in {use_shared_home / 'results.sqlite'} "
        "(a re-run skips the cells already there).",
        "Next: atmbench leaderboard --out my-leaderboard  "
        "(Markdown, CSV, JSON, LaTeX and charts of everything stored)",
    ]
    second = invoke("run", *TINY, "--methods", "average,ta:lam=0.3")
    assert second.exit_code == 0
    assert "0 cell(s) run, 5 reused from the store" in second.output
    with sqlite3.connect(use_shared_home / "results.sqlite") as con:
        rows = con.execute(
            "SELECT COUNT(*) FROM rows WHERE method = 'ta:lam=0.3' AND split = 'test'"
        ).fetchone()[0]
    assert rows == 8  # one per task


def test_leaderboard_writes_markdown(use_shared_home, tmp_path):
    assert invoke("run", *TINY, "--methods", "average").exit_code == 0
    result = invoke("leaderboard", "--out", str(tmp_path / "lb"))
    assert result.exit_code == 0
    text = (tmp_path / "lb" / "digits8-vit-micro.md").read_text()
    assert text.startswith(
        "Produced by: `atmbench run --suite digits8 --model vit-micro --methods "
    )
    assert "\n## digits8 / vit-micro  (test accuracy, %)\n" in text
    assert "| average" in text


def test_leaderboard_without_results_is_a_clear_error(home):
    result = CliRunner().invoke(cli, ["leaderboard"])
    assert result.exit_code != 0
    assert "no results stored yet" in result.output


def test_python_dash_m_runs_the_cli():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "atmbench", "--help"], capture_output=True, text=True, check=True
    )
    assert "Benchmark model-merging methods" in out.stdout
