"""The out-of-core merge's pipeline: task vectors read ahead in a thread, merged parameters
written behind in another; the same numbers as the serial loop, errors raised in the caller."""

from __future__ import annotations

import threading

import pytest
import torch

from atmbench import registry
from atmbench.method import DifferenceTaskVectors
from atmbench.streaming import ReadAhead, block_order, merged_parameters, prepare, row_blocks


def _models(tasks: int = 3):
    gen = torch.Generator().manual_seed(0)
    shapes = {"big": (600, 1000), "bias": (1000,), "steps": ()}
    base = {k: torch.randn(s, generator=gen).bfloat16() for k, s in shapes.items()}
    base["steps"] = torch.tensor(7)  # an integer buffer: never merged, never read ahead
    experts = {
        f"t{i}": {
            k: (v + 0.01 * torch.randn(v.shape, generator=gen)).to(v.dtype) for k, v in base.items()
        }
        for i in range(tasks)
    }
    return base, experts


@pytest.mark.parametrize("name", ["ta", "ties", "dare_ties", "tsv"])
def test_read_ahead_gives_the_serial_merge(name):
    method = registry.methods()[name]
    base, experts = _models()
    hparams = {"ta": {}, "ties": {"k": 0.2, "merge": "mean"}, "tsv": {}}.get(name, {})
    if name == "dare_ties":
        hparams = {"p": 0.5, "k": 1.0, "merge": "sum"}
    vectors = DifferenceTaskVectors(base, experts)
    state = prepare(method, base, vectors, hparams, 3)
    serial = dict(merged_parameters(method, base, vectors, hparams, state, 3))
    order = list(block_order(method, base, vectors))
    assert ("steps", ...) not in order
    if method.rowwise:
        assert order[:3] == [("big", r) for r in row_blocks(torch.Size((600, 1000)))][:3]
    with ReadAhead(DifferenceTaskVectors(base, experts), iter(order)) as ahead:
        piped = dict(merged_parameters(method, base, ahead, hparams, state, 3))
    assert serial.keys() == piped.keys()
    for key in serial:
        torch.testing.assert_close(piped[key], serial[key], rtol=0, atol=0)


def test_a_request_out_of_order_is_computed_on_the_spot():
    base, experts = _models()
    vectors = DifferenceTaskVectors(base, experts)
    wanted = (experts["t1"]["big"].float() - base["big"].float())[5:9]
    with ReadAhead(DifferenceTaskVectors(base, experts), [("bias", ...)]) as ahead:
        assert torch.equal(ahead.rows("t1", "big", slice(5, 9)), wanted)
        assert torch.equal(ahead.get("t0", "bias"), vectors.get("t0", "bias"))
        assert torch.equal(ahead.stacked("bias"), vectors.stacked("bias"))


def test_an_error_while_reading_ahead_is_raised_in_the_caller():
    class Broken(dict):
        def rows(self, key, rows):
            raise OSError(f"disk gone while reading {key}")

    base, experts = _models(1)
    experts["t0"] = Broken(experts["t0"])
    with ReadAhead(DifferenceTaskVectors(base, experts), [("bias", ...)]) as ahead:
        with pytest.raises(OSError, match="disk gone while reading bias"):
            ahead.get("t0", "bias")


def test_leaving_early_stops_the_thread():
    base, experts = _models()
    before = threading.active_count()
    order = [("big", slice(i, i + 1)) for i in range(600)]
    with ReadAhead(DifferenceTaskVectors(base, experts), order, depth=1) as ahead:
        ahead.rows("t0", "big", slice(0, 1))
    assert threading.active_count() == before


def test_an_error_while_writing_behind_is_raised_by_the_merge(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from atmbench import checkpoints
    from atmbench.api import merge_checkpoints

    base, experts = _models(2)
    for name, state in {"base": base, **experts}.items():
        (tmp_path / name).mkdir()
        save_file(state, tmp_path / name / "model.safetensors")
    written = []

    def write(self, name, tensor):
        if name == "bias":
            raise OSError("disk full")
        written.append(name)

    monkeypatch.setattr(checkpoints.CheckpointWriter, "write", write)
    with pytest.raises(OSError, match="disk full"):
        merge_checkpoints(
            "ta", str(tmp_path / "base"), [str(tmp_path / e) for e in experts], tmp_path / "out"
        )
    assert "big" in written or "steps" in written
