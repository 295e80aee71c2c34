"""pytest-benchmark suite: ``pytest benchmarks --benchmark-enable`` (or ``tox -e bench``)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def _compiled_kernels():
    """Time the compiled kernels, not their torch forms, which serve merges made while the
    kernels compile (or load from the cache) in the background."""
    from atmbench import kernels

    kernels.compile_kernels()


def pytest_terminal_summary(terminalreporter):
    import sys

    module = sys.modules.get("test_merge_speed") or sys.modules.get("benchmarks.test_merge_speed")
    if module is not None and module.RESULTS:
        terminalreporter.section("merge speed and memory (ratios measured in this run)")
        for line in module.pytest_terminal_summary_lines():
            terminalreporter.write_line(line)
