"""``atmbench download`` without a network: one line within seconds, no retries, and the
"fetch with" advice only where running that command would help."""

from __future__ import annotations

import importlib
import time
import urllib.error

import pytest
from click.testing import CliRunner

from atmbench import registry
from atmbench.cli import cli
from atmbench.default_plugins.suites.vision import data
from atmbench.suite import SuiteDataError

# the module (the package exports its function under the same name)
download = importlib.import_module("atmbench.default_plugins.suites.vision.download")

COMMAND = ["download", "--suite", "vision8", "--model", "ViT-B-32"]


@pytest.fixture
def no_fetching(monkeypatch):
    """Fail the test if a dataset download is even attempted."""

    def fetch(spec, home):
        raise AssertionError(f"tried to fetch {spec.path}")

    monkeypatch.setattr(data, "fetch", fetch)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    registry.get_suite("vision8")  # plugins loaded before the clock starts


def one_line_within_seconds(args):
    start = time.monotonic()
    result = CliRunner().invoke(cli, args)
    elapsed = time.monotonic() - start
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    assert elapsed < 30, f"took {elapsed:.0f} s"
    return lines[0]


def test_an_unreachable_hub_is_one_line_without_retries(home, no_fetching, monkeypatch):
    # a real probe, no patching: nothing listens on port 9 of this machine
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    line = one_line_within_seconds(COMMAND)
    assert line.startswith("Error: cannot reach the Hugging Face hub at http://127.0.0.1:9 (")
    assert f"and vision8 / ViT-B-32 is not all cached under {home}: run this again " in line
    assert "atmbench download" not in line  # the very command that failed is no advice


def test_a_failing_probe_as_without_a_network(home, no_fetching, monkeypatch):
    def urlopen(request, timeout):
        assert timeout <= 10
        raise urllib.error.URLError(OSError(-2, "Name or service not known"))

    monkeypatch.setattr(download.urllib.request, "urlopen", urlopen)
    line = one_line_within_seconds(COMMAND)
    assert "https://huggingface.co (Name or service not known)" in line


def test_hf_hub_offline_says_so(home, no_fetching, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = one_line_within_seconds(COMMAND)
    assert line == (
        f"Error: HF_HUB_OFFLINE is set and vision8 / ViT-B-32 is not all cached under {home}: "
        "unset it"
    )


def test_a_reachable_hub_that_fails_keeps_the_reason_but_not_the_advice(home, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(download, "hub_unreachable", lambda: None)

    def fetch(spec, home):
        raise ConnectionError(f"{spec.path}: 503 Service Unavailable")

    monkeypatch.setattr(data, "fetch", fetch)
    with pytest.raises(SuiteDataError) as info:
        download.download("vision8", "ViT-B-32", home)
    message = str(info.value)
    assert "sun397 (tanganke/sun397: ConnectionError: tanganke/sun397: 503" in message
    assert "fetch" not in message.split("503")[-1] and "atmbench download" not in message


def test_the_probe_counts_any_http_answer_as_reachable(monkeypatch):
    def urlopen(request, timeout):
        raise urllib.error.HTTPError(request.full_url, 404, "Not Found", {}, None)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(download.urllib.request, "urlopen", urlopen)
    assert download.hub_unreachable() is None
