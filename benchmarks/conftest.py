"""pytest-benchmark suite: ``pytest benchmarks --benchmark-enable`` (or ``tox -e bench``)."""
