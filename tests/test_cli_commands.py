"""`atmbench download`, `atmbench analyze` and `run --experts`."""

from __future__ import annotations

from click.testing import CliRunner

from atmbench.cli import cli
from atmbench.hookspecs import hookimpl
from atmbench.store import CellRecord, ResultStore
from atmbench.suite import Suite


def test_download_of_the_embedded_suite_is_a_no_op(home):
    result = CliRunner().invoke(cli, ["download", "--suite", "digits8"])
    assert result.exit_code == 0
    assert "digits8 is embedded in atmbench: nothing to download." in result.output


def test_download_calls_the_suites_downloader_with_model_and_home(home, register):
    calls = []

    class Downloadable:
        @hookimpl
        def register_suites(self, register):
            def fetch(model, where):
                calls.append((model, where))
                return ["a", "b"]

            register(Suite("remote", ("a", "b"), ("m1",), load=None, download=fetch))

    with register(Downloadable(), "remote"):
        result = CliRunner().invoke(cli, ["download", "--suite", "remote"])
        bad = CliRunner().invoke(cli, ["download", "--suite", "remote", "--model", "zz"])
    assert result.exit_code == 0, result.output
    assert calls == [("m1", home)]
    assert "remote / m1: 2 task(s) ready" in result.output
    assert bad.exit_code != 0 and "unknown model 'zz' for suite 'remote' (valid: m1)" in bad.output


def test_analyze_draws_the_stored_atm_trace(tmp_path):
    trace = [
        {
            "iteration": 0,
            "accuracy": {"val": {"a": 50.0, "b": 60.0}, "test": {"a": 40.0, "b": 50.0}},
        },
        {
            "iteration": 1,
            "accuracy": {"val": {"a": 70.0, "b": 80.0}, "test": {"a": 60.0, "b": 70.0}},
            "tasks": ["a", "b"],
            "norms": {"a": 1.0, "b": 3.0},
            "cosine": [[1.0, 0.25], [0.25, 1.0]],
        },
    ]
    store = ResultStore(tmp_path / "r.sqlite")
    store.write(CellRecord("k", "s", "m", "atm", 0, {}, {("a", "test"): 60.0}, trace=trace))
    result = CliRunner().invoke(
        cli, ["analyze", "--store", str(tmp_path / "r.sqlite"), "--out", str(tmp_path / "fig")]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "fig" / "s-m-atm-seed0-accuracy.png").stat().st_size > 1000
    assert (tmp_path / "fig" / "s-m-atm-seed0-cosines.png").stat().st_size > 1000
    # iteration 1: mean val (70+80)/2 = 75, mean test 65, mean norm 2, off-diagonal cosine 0.25
    assert "|           1 | 75.000 | 65.000 |   2.000 |    0.250 |" in result.output


def test_analyze_without_atm_cells_is_a_clear_error(tmp_path):
    ResultStore(tmp_path / "r.sqlite")
    result = CliRunner().invoke(cli, ["analyze", "--store", str(tmp_path / "r.sqlite")])
    assert result.exit_code != 0 and "no ATM cells stored" in result.output


def test_importing_experts_into_a_suite_that_cannot_is_a_clear_error(home):
    result = CliRunner().invoke(
        cli,
        [
            "run",
            "--model",
            "vit-micro",
            "--quiet",
            "--methods",
            "average",
            "--experts",
            "hub:org/prefix",
        ],
    )
    assert result.exit_code == 1
    assert "suite 'digits8' cannot import experts from 'hub:org/prefix'" in result.output
