"""The content-checked cache: hit, miss, corruption, truncation, and the expert cache on top."""

from __future__ import annotations

import torch

from atmbench.cache import DATA, META, EntryCache, load_entry


def _compute(calls):
    def compute():
        calls.append(1)
        return {"w": torch.arange(6.0).reshape(2, 3)}, {"note": "x"}

    return compute


def test_miss_then_hit(tmp_path):
    cache, calls = EntryCache(tmp_path), []
    directory, meta, created = cache.get_or_create({"suite": "s", "k": 1}, _compute(calls))
    assert created and meta["note"] == "x" and meta["key"] == {"suite": "s", "k": 1}
    again, _, created_again = cache.get_or_create({"suite": "s", "k": 1}, _compute(calls))
    assert again == directory and not created_again and len(calls) == 1
    assert torch.equal(load_entry(directory)["w"], torch.arange(6.0).reshape(2, 3))
    _, _, other = cache.get_or_create({"suite": "s", "k": 2}, _compute(calls))
    assert other and len(calls) == 2


def test_flipped_byte_is_detected_and_recomputed(tmp_path, caplog):
    cache, calls = EntryCache(tmp_path), []
    directory, _, _ = cache.get_or_create({"k": 1}, _compute(calls))
    data = bytearray((directory / DATA).read_bytes())
    data[-1] ^= 0xFF
    (directory / DATA).write_bytes(bytes(data))
    _, _, created = cache.get_or_create({"k": 1}, _compute(calls))
    assert created and len(calls) == 2
    assert "corrupt cache entry" in caplog.text
    assert torch.equal(load_entry(directory)["w"], torch.arange(6.0).reshape(2, 3))


def test_truncated_file_and_missing_meta_are_recomputed(tmp_path):
    cache, calls = EntryCache(tmp_path), []
    directory, _, _ = cache.get_or_create({"k": 1}, _compute(calls))
    (directory / DATA).write_bytes((directory / DATA).read_bytes()[:20])
    cache.get_or_create({"k": 1}, _compute(calls))
    (directory / META).unlink()  # a writer killed before sealing the entry
    cache.get_or_create({"k": 1}, _compute(calls))
    assert len(calls) == 3


def test_experts_are_cached_per_key(use_shared_home):
    from atmbench.config import pick_device
    from atmbench.default_plugins.suites.digits8 import DigitsBenchmark
    from atmbench.experts import cached_expert, ensure_experts

    bench = DigitsBenchmark("vit-micro", use_shared_home, pick_device("cpu"))
    first = ensure_experts(use_shared_home, bench, seed=0, progress=False)
    second = ensure_experts(use_shared_home, bench, seed=0, progress=False)
    assert second.trained == [] and second.files == first.files
    assert all(cached_expert(use_shared_home, bench, t, 0) for t in bench.tasks)
    assert not cached_expert(use_shared_home, bench, bench.tasks[0], 99)
    assert second.total().steps == sum(s.steps for s in first.stats.values()) > 0


def test_an_expert_with_nan_weights_is_refused_before_it_is_cached():
    import pytest

    from atmbench.experts import finite
    from atmbench.method import MergeInputError

    good = {"w": torch.ones(2), "steps": torch.tensor([3])}
    assert finite(good, "a") is good
    with pytest.raises(
        MergeInputError, match=r"expert for task 'a' has NaN or inf weights in \['w'\]"
    ):
        finite({"w": torch.tensor([1.0, float("nan")])}, "a")
