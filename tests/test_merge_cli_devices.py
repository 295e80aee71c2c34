"""The merge engine off the CPU: tensors on another device go to the torch versions of the
kernels (:mod:`atmbench.torch_kernels`), never to Numba, and give the kernels' values.

CI has no GPU: the torch versions run here on CPU tensors against the kernels, and the
routing is checked by making every tensor look like it lives elsewhere. The same torch
versions serve CPU calls made while the kernels compile in the background."""

from __future__ import annotations

import threading

import pytest
import torch

import atmbench
from atmbench import kernels, torch_kernels
from atmbench.default_plugins.methods.masking import band_limits


def _tasks(shape=(37, 300), tasks=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tasks, *shape, generator=g) * torch.rand(tasks, 1, 1, generator=g)


@pytest.mark.parametrize(("seed", "offset"), [(0, 0), (12345, 777), (2**64 - 1, 10**9)])
def test_splitmix_stream_is_the_kernels(seed, offset):
    bits = torch_kernels.bits24(seed, offset, 5000)
    assert torch.equal(bits.float() * 2.0**-24, kernels.uniform(seed, offset, 5000))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dare_masks_and_values_are_the_kernels(p):
    tv = _tasks()
    seeds, offset = [3, 2**63 + 5, 99], 4096
    expected = kernels.dare(list(tv), seeds, offset, p)
    assert torch.equal(torch_kernels.dare(list(tv), seeds, offset, p), expected)


@pytest.mark.parametrize("mean", [True, False])
@pytest.mark.parametrize("majority", [1.0, -1.0])
@pytest.mark.parametrize(
    ("drop", "consensus"), [(None, None), (([5, 6, 7], 64, 0.9), None), (None, (0.4, 2))]
)
def test_ties_merge_is_the_kernels(mean, majority, drop, consensus):
    tv = _tasks()
    tv[:, 0, :10] = torch.tensor([1.0, -1.0, 0.0]).view(3, 1)  # ties of the elected sign
    thresholds = torch.tensor([0.05, 0.1, 0.02])
    ours = torch_kernels.ties_merge(list(tv), thresholds, majority, mean, None, drop, consensus)
    theirs = kernels.ties_merge(list(tv), thresholds, majority, mean, None, drop, consensus)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-6, atol=1e-7)
    assert ours[1:] == theirs[1:] and (theirs[2] > 0 or drop)


def test_consensus_is_the_kernels():
    tv = _tasks()
    merged = tv.sum(0)
    assert torch.equal(
        torch_kernels.consensus(list(tv), merged, 0.4, 2),
        kernels.consensus(list(tv), merged, 0.4, 2),
    )


def test_band_sum_is_the_kernels():
    tv = _tasks()
    tv[1, 5, :] = 0.25  # a row of repeated values: flagged for the position rule
    start, stop = band_limits(300, 0.15, 0.01)
    total, repeats = torch_kernels.band_sum(list(tv), start, stop)
    expected, expected_repeats = kernels.band_sum(list(tv), start, stop)
    assert torch.equal(repeats, expected_repeats) and bool(repeats[5])
    assert torch.equal(total[~repeats], expected[~expected_repeats])


@pytest.mark.parametrize("drop", [None, (17, 0.5)])
def test_bracket_counts_and_kth_smallest_are_the_kernels(drop):
    values = _tasks((4000,), tasks=1)[0]
    results = []
    for module in (torch_kernels, kernels):
        below = torch.zeros(4, dtype=torch.int64)
        kept = torch.zeros(4, 300 + kernels.CHUNK)
        filled = torch.zeros(4, dtype=torch.int64)
        module.bracket_counts(values, 0.3, 0.4, below, kept, filled, drop)
        firsts = [kept[i, : int(filled[i])].sort().values for i in range(4)]
        rank = torch.full((4,), 5)
        results.append((below, filled, firsts, module.kth_smallest(kept, filled, rank)))
    ours, theirs = results
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    assert all(torch.equal(a, b) for a, b in zip(ours[2], theirs[2], strict=True))
    assert torch.equal(ours[3], theirs[3])


@pytest.mark.parametrize("drop", [None, (17, 0.5)])
def test_radix_counts_are_the_kernels(drop):
    values = _tasks((50_001,), tasks=1).reshape(-1).bfloat16().float()  # repeated values
    values[::5] = -values[::5]
    values[:3] = torch.tensor([float("inf"), -0.0, 0.0])
    high = int(values[7].abs().view(torch.int32)) >> 16
    for prefix in (-1, high, 0x7F80, 0):
        counts = [torch.zeros(4, kernels.RADIX, dtype=torch.int64) for _ in range(2)]
        for module, into in zip((torch_kernels, kernels), counts, strict=True):
            for _ in range(2):  # the counts add up over calls
                module.radix_counts(values, prefix, into, drop)
        assert torch.equal(counts[0], counts[1]) and int(counts[0].sum()) > 0


SPECS = ["ta", "ties", "dare_ta:p=0.9", "dare_ties:p=0.9", "breadcrumbs", "consensus_ta",
         "consensus_ties", "average"]  # fmt: skip


@pytest.mark.parametrize("why", ["elsewhere", "compiling"])
@pytest.mark.parametrize("spec", SPECS)
def test_torch_forms_give_the_kernels_merge(monkeypatch, spec, why):
    """Every tensor made to look off the CPU, or the kernels made to look still compiling
    (a fresh install's first merge): the merge runs the torch versions only (the compiled
    kernels raise if called) and equals the kernels' merge."""
    torch.manual_seed(0)
    base = {"w": torch.randn(40, 700), "b": torch.randn(700), "e": torch.randn(3, 5, 9)}
    experts = {t: {k: v + 0.1 * torch.randn_like(v) for k, v in base.items()} for t in "xyz"}
    expected = atmbench.merge(spec, base, experts, seed=4)

    def no_numba(*args, **kwargs):
        raise AssertionError("a call routed to torch reached a compiled kernel")

    if why == "elsewhere":
        monkeypatch.setattr(torch_kernels, "elsewhere", lambda v: v is not None)
    else:  # not ready, and a compile under way (so no thread starts)
        monkeypatch.setattr(kernels, "_ready", threading.Event())
        monkeypatch.setattr(kernels, "_compiling", threading.Thread(target=lambda: None))
    for compiled in ("_addresses", "_bracket", "_kth_smallest", "_radix", "_uniforms"):
        monkeypatch.setattr(kernels, compiled, no_numba)
    merged = atmbench.merge(spec, base, experts, seed=4)
    for key, tensor in expected.items():
        torch.testing.assert_close(merged[key], tensor, rtol=1e-6, atol=1e-6)


def test_uniform_torch_form_is_the_kernels():
    assert torch.equal(torch_kernels.uniform(7, 99, 5000), kernels.uniform(7, 99, 5000))


def test_a_process_done_before_the_compile_waits_for_it(monkeypatch, capsys):
    """Ending the interpreter mid-compile can abort it: the exit hook joins the thread."""
    release = threading.Event()
    worker = threading.Thread(target=release.wait)
    worker.start()
    monkeypatch.setattr(kernels, "_compiling", worker)
    threading.Timer(0.2, release.set).start()
    kernels._finish_at_exit()
    assert not worker.is_alive()
    assert "finishing the one-time compile" in capsys.readouterr().err
    kernels._finish_at_exit()  # nothing left to wait for: silent
    assert capsys.readouterr().err == ""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("spec", SPECS)
def test_cuda_merge_equals_cpu_merge(spec):
    torch.manual_seed(0)
    base = {"w": torch.randn(300, 700), "b": torch.randn(700)}
    experts = {t: {k: v + 0.1 * torch.randn_like(v) for k, v in base.items()} for t in "xyz"}
    expected = atmbench.merge(spec, base, experts, seed=4)
    on_gpu = {t: {k: v.cuda() for k, v in e.items()} for t, e in experts.items()}
    merged = atmbench.merge(spec, {k: v.cuda() for k, v in base.items()}, on_gpu, seed=4)
    for key, tensor in expected.items():
        assert merged[key].device.type == "cuda"
        torch.testing.assert_close(merged[key].cpu(), tensor, rtol=1e-5, atol=1e-6)
