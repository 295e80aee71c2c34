"""The streaming loop's row blocks: same numbers as whole tensors, exact global thresholds."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from reference import (
    consensus_mask,
    dare_keep_masks,
    dare_rescale,
    disjoint_merge,
    elect_sign,
    official_middle_keep,
    partition_thresholds,
    tall_masks,
    trim,
)
from safetensors.torch import save_file

from atmbench import kernels, registry
from atmbench.default_plugins.methods import masking
from atmbench.default_plugins.methods.masking import (
    breadcrumbs_sum,
    dare,
    exact_thresholds,
    global_thresholds,
)
from atmbench.method import (
    FileTaskVectors,
    InMemoryTaskVectors,
    MergeInputError,
    MergeMethod,
    Scratch,
    TensorContext,
    combine,
    sum_tasks,
)
from atmbench.streaming import BLOCK, merged_task_vector, row_blocks

ROWWISE = ("average", "ta", "ties", "dare_ta", "dare_ties", "breadcrumbs", "consensus_ta")


def _model(seed: int = 0, tasks: int = 3) -> tuple[dict, dict]:
    """Parameters large enough to be cut into several row blocks, plus small ones."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"big": (300, 1000), "conv": (40, 3, 50, 20), "bias": (1000,), "scalar": ()}
    base = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    vectors = {
        f"t{i}": {k: torch.randn(s, generator=gen) for k, s in shapes.items()} for i in range(tasks)
    }
    return base, vectors


def test_row_blocks_cover_every_row_once():
    blocks = row_blocks(torch.Size((300, 1000)))
    assert len(blocks) > 1 and blocks[0] == slice(0, BLOCK // 1000)
    rows = [r for part in blocks for r in range(300)[part]]
    assert rows == list(range(300))
    assert row_blocks(torch.Size((1000,))) == [...] == row_blocks(torch.Size(()))
    assert row_blocks(torch.Size((2, BLOCK * 3))) == [slice(0, 1), slice(1, 2)]


@pytest.mark.parametrize("name", ROWWISE)
def test_rowwise_blocks_give_the_whole_tensor_result(name):
    """The same method, handed whole tensors instead of blocks, gives the same numbers."""
    method = registry.methods()[name]
    assert method.rowwise
    hparams = {h.name: h.default for h in method.hparams}
    base, vectors = _model()
    got = merged_task_vector(method, base, InMemoryTaskVectors(vectors), hparams, seed=5)
    whole = replace(method, rowwise=False)
    want = merged_task_vector(whole, base, InMemoryTaskVectors(vectors), hparams, seed=5)
    for key in base:
        assert torch.equal(got[key], want[key]), (name, key)


def test_blocks_read_bf16_files_and_results_never_alias_the_buffer(tmp_path):
    base, vectors = _model(tasks=2)
    files = {}
    for task, tv in vectors.items():
        files[task] = tmp_path / f"{task}.safetensors"
        save_file({k: v.bfloat16().contiguous() for k, v in tv.items()}, str(files[task]))
    first = MergeMethod("first", lambda b, tv, ctx: tv[0], data="none", rowwise=True)
    unstacked = replace(first, name="unstacked", stacked=False)
    for method in (first, unstacked):
        got = merged_task_vector(method, base, FileTaskVectors(files), {})
        for key in base:
            assert torch.equal(got[key], vectors["t0"][key].bfloat16().float())


def test_unstacked_methods_get_each_tasks_rows_and_match_the_stacked_merge():
    base, vectors = _model(tasks=3)
    seen = []

    def total(b, task_vectors, ctx):
        seen.append(type(task_vectors))
        assert len(task_vectors) == 3 and task_vectors[0].shape == b.shape
        assert all(tv.dtype == torch.float32 for tv in task_vectors)
        return sum_tasks(task_vectors, torch.empty(b.shape))

    stacked = MergeMethod("total", total, data="none", rowwise=True)
    unstacked = replace(stacked, stacked=False)
    got = merged_task_vector(unstacked, base, InMemoryTaskVectors(vectors), {})
    assert seen and all(kind is list for kind in seen)
    want = merged_task_vector(stacked, base, InMemoryTaskVectors(vectors), {})
    assert all(torch.equal(got[k], want[k]) for k in base)
    vectors["t1"]["big"][3, 7] = float("nan")  # unstacked blocks are checked too
    with pytest.raises(MergeInputError, match=r"'big' of task\(s\) \['t1'\]"):
        merged_task_vector(unstacked, base, InMemoryTaskVectors(vectors), {})


@pytest.mark.parametrize("name", ["ties", "dare_ties"])
def test_global_thresholds_read_bf16_files_task_by_task(tmp_path, name):
    """The counting pass reads each task's file directly (no stacked block): bf16 files give
    the numbers of the same values held in memory as float32."""
    base, vectors = _model(tasks=2)
    files, rounded = {}, {}
    for task, tv in vectors.items():
        files[task] = tmp_path / f"{task}.safetensors"
        save_file({k: v.bfloat16().contiguous() for k, v in tv.items()}, str(files[task]))
        rounded[task] = {k: v.bfloat16().float() for k, v in tv.items()}
    method = registry.methods()[name]
    hparams = {h.name: h.default for h in method.hparams}
    got = merged_task_vector(method, base, FileTaskVectors(files), hparams, seed=2)
    want = merged_task_vector(method, base, InMemoryTaskVectors(rounded), hparams, seed=2)
    for key in base:
        assert torch.equal(got[key], want[key]), key


def test_combine_consuming_the_delta_gives_the_same_model_and_keeps_the_base():
    base, vectors = _model(tasks=2)
    base["half"] = torch.randn(3, 4).bfloat16()
    base["step"] = torch.tensor(7)
    for task in vectors:
        vectors[task]["half"] = torch.randn(3, 4)
        vectors[task]["step"] = torch.tensor(0)
    kept = {k: v.clone() for k, v in base.items()}
    delta = merged_task_vector(registry.methods()["ta"], base, InMemoryTaskVectors(vectors), {})
    want = combine(base, delta, 0.3)
    got = combine(base, delta, 0.3, consume=True)
    for key in base:
        assert torch.equal(got[key], want[key]) and got[key].dtype == base[key].dtype, key
        assert torch.equal(base[key], kept[key]), key
    assert got["big"].data_ptr() == delta["big"].data_ptr()  # θ written into Δ: no new model


def test_a_whole_tensor_method_returning_its_base_gets_a_copy():
    """merged_task_vector's tensors are the caller's to overwrite (combine(consume=True))."""
    echo = MergeMethod("echo", lambda b, tv, ctx: b, data="none")
    base, vectors = _model(tasks=1)
    delta = merged_task_vector(echo, base, InMemoryTaskVectors(vectors), {})
    kept = {k: v.clone() for k, v in base.items()}
    combine(base, delta, 1.0, consume=True)
    for key in base:
        assert torch.equal(base[key], kept[key]), key


def test_scratch_buffers_are_reused_per_name_and_grow():
    scratch = Scratch()
    first = scratch.empty("a", (4, 5))
    assert first.shape == (4, 5) and first.dtype == torch.float32
    assert scratch.empty("a", (2, 3)).data_ptr() == first.data_ptr()  # the same memory
    assert scratch.empty("b", (2, 3)).data_ptr() != first.data_ptr()  # a name of its own
    assert scratch.empty("a", (10, 10)).numel() == 100  # grows when asked for more


def test_non_finite_values_in_a_later_block_are_named():
    base, vectors = _model(tasks=2)
    assert len(row_blocks(vectors["t1"]["big"].shape)) > 1
    vectors["t1"]["big"][-1, 3] = float("nan")  # in the last block
    with pytest.raises(MergeInputError, match=r"'big' of task\(s\) \['t1'\]"):
        merged_task_vector(registry.methods()["ta"], base, InMemoryTaskVectors(vectors), {})


def test_a_rowwise_method_returning_the_wrong_shape_is_named():
    bad = MergeMethod("bad", lambda b, tv, ctx: tv.sum(), data="none", rowwise=True)
    base, vectors = _model(tasks=1)
    with pytest.raises(MergeInputError, match="method 'bad' returned shape"):
        merged_task_vector(bad, base, InMemoryTaskVectors(vectors), {})


# ---------------------------------------------------------------- TIES thresholds


def _exact(vectors: dict, k: float) -> list[float]:
    out = []
    for tv in vectors.values():
        flat = torch.cat([v.abs().reshape(-1) for v in tv.values()])
        d = flat.numel()
        out.append(0.0 if k == 1.0 else float(flat.kthvalue(d - int(d * k)).values))
    return out


@pytest.mark.parametrize("k", [0.001, 0.2, 0.5, 0.97, 1.0])
def test_bracketed_thresholds_are_exact_over_many_parameters(k, monkeypatch):
    _, vectors = _model(seed=k.__hash__() % 100)
    monkeypatch.setattr(masking, "SAMPLE", 1000)  # a small sample: a narrow bracket
    got = global_thresholds(InMemoryTaskVectors(vectors), k)
    assert got.tolist() == _exact(vectors, k)
    assert torch.equal(exact_thresholds(InMemoryTaskVectors(vectors), k), got)


def test_both_threshold_selections_agree_on_a_transform():
    """DARE-TIES' thresholds: the drop is applied per task, with that task's stream."""
    _, vectors = _model(seed=4)

    def dropped(tv, ctx):
        return dare(tv, ctx, 0.5)

    got = global_thresholds(InMemoryTaskVectors(vectors), 0.2, 3, dropped)
    assert torch.equal(exact_thresholds(InMemoryTaskVectors(vectors), 0.2, 3, dropped), got)


def test_thresholds_over_a_transform_that_drops_parameters():
    """A transform may return fewer entries (atmbench-doge counts matrices only)."""
    _, vectors = _model(seed=6)

    def matrices(tv, ctx):
        return tv if tv.dim() > 2 else tv.new_zeros(len(tv), 0)

    got = global_thresholds(InMemoryTaskVectors(vectors), 0.2, 0, matrices)
    only = {t: {k: v for k, v in tv.items() if v.dim() > 1} for t, tv in vectors.items()}
    assert got.tolist() == _exact(only, 0.2)
    assert torch.equal(exact_thresholds(InMemoryTaskVectors(vectors), 0.2, 0, matrices), got)


def test_a_missed_bracket_falls_back_to_the_exact_selection(monkeypatch):
    _, vectors = _model(seed=9)
    calls = []

    def misleading(*_args):  # a sample far from the data: the bracket cannot hold the rank
        return torch.full((len(vectors), 100), 1e9)

    def spy(*args):
        calls.append(args)
        return exact_thresholds(*args)

    monkeypatch.setattr(masking, "_sample", misleading)
    monkeypatch.setattr(masking, "exact_thresholds", spy)
    got = global_thresholds(InMemoryTaskVectors(vectors), 0.2)
    assert calls and got.tolist() == _exact(vectors, 0.2)


def test_kept_parts_longer_than_one_part_are_joined_whole(monkeypatch):
    """Together the parts keep more values than one part's row holds."""
    gen = torch.Generator().manual_seed(8)
    vectors = {t: {"w": torch.randn(400, 1000, generator=gen)} for t in "ab"}
    monkeypatch.setattr(masking, "CAPACITY", 20_000)  # 5,000 per part, 4 parts
    monkeypatch.setattr(masking, "SAMPLE_STRIDE", 1)
    monkeypatch.setattr(masking, "SAMPLE", 100_000)  # a bracket holding ~10,000 values
    got = global_thresholds(InMemoryTaskVectors(vectors), 0.2)
    assert got.tolist() == _exact(vectors, 0.2)


def test_an_overflowing_bracket_falls_back_to_the_exact_selection(monkeypatch):
    _, vectors = _model(seed=5)
    monkeypatch.setattr(masking, "CAPACITY", 64)  # far fewer than the bracket holds
    got = global_thresholds(InMemoryTaskVectors(vectors), 0.2)
    assert got.tolist() == _exact(vectors, 0.2)


@pytest.mark.parametrize("size", [0, 3, 4, 4099, 50_001])
def test_bracket_counts_split_a_tensor_into_parts(size):
    values = torch.randn(size, generator=torch.Generator().manual_seed(size))
    values[::7] = 0.5  # values on the bracket's edges count as inside
    parts = 4
    below = torch.zeros(parts, dtype=torch.int64)
    kept = torch.full((parts, 20_000 + kernels.CHUNK), -1.0)
    filled = torch.zeros(parts, dtype=torch.int64)
    for _ in range(2):  # the accumulators add up over calls
        kernels.bracket_counts(values, 0.5, 1.0, below, kept, filled)
    magnitudes = values.abs()
    inside = magnitudes[(magnitudes >= 0.5) & (magnitudes <= 1.0)]
    assert int(below.sum()) == 2 * int((magnitudes < 0.5).sum())
    got = torch.cat([kept[i, : filled[i]] for i in range(parts)])
    assert torch.equal(got.sort().values, torch.cat([inside, inside]).sort().values)


@pytest.mark.parametrize("p", [0.3, 0.9])
def test_kernels_draw_the_dare_drop_themselves(p):
    """The fused drop (count and merge kernels) gives exactly what dare() writes out: the
    same draws and the same rescale (at p = 0.9, float32(1 − p) ≠ float32(1) − float32(p))."""
    gen = torch.Generator().manual_seed(11)
    tv = torch.randn(3, 7, 333, generator=gen)
    ctx = TensorContext("w", ("a", "b", "c"), seed=5, offset=1001)  # an odd offset
    dropped = dare(tv, ctx, p).clone()
    seeds = [ctx.task_seed(t) for t in range(3)]
    thresholds = torch.tensor([0.5, 0.8, 1.1])
    for majority in (-1.0, 1.0):
        want = kernels.ties_merge(dropped, thresholds, majority, True)
        got = kernels.ties_merge(tv, thresholds, majority, True, drop=(seeds, 1001, p))
        assert torch.equal(got[0], want[0]) and got[1:] == want[1:]
    whole = TensorContext("w", ("a",), seed=5)  # the count pass: one task, from entry 0
    counts = []
    for values, drop in ((dare(tv[:1], whole, p), None), (tv[0], (whole.task_seed(0), p))):
        below, filled = torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)
        kept = torch.zeros(2, 5000 + kernels.CHUNK)
        kernels.bracket_counts(values, 0.4, 0.9, below, kept, filled, drop)
        counts.append((below.tolist(), filled.tolist(), kept[:, :3000]))
    assert counts[0][:2] == counts[1][:2] and torch.equal(counts[0][2], counts[1][2])


def test_dare_denominator_is_one_minus_p_rounded_once():
    for p in (i / 1000 for i in range(1, 1000)):
        assert kernels.dare_denominator(p) == torch.tensor(1.0 - p, dtype=torch.float32).item()


def test_heavy_ties_give_the_exact_threshold():
    gen = torch.Generator().manual_seed(2)
    vectors = {
        t: {"w": torch.randint(-2, 3, (200, 700), generator=gen).float()} for t in ("a", "b")
    }
    for k in (0.1, 0.5, 0.9):
        assert global_thresholds(InMemoryTaskVectors(vectors), k).tolist() == _exact(vectors, k)


def test_the_exact_selection_by_hand_with_ties_at_the_threshold():
    """|τ| sorted: 0.25, 0.5, then six 1s (three of them -1), 2, 3; beside them 1 + 2⁻²³
    and 1 + 2⁻²², which share 1's high 16 bits (the second pass tells them apart).

    d = 10: k = 0.5 keeps n = 5, threshold the 5th smallest = 1 (the ties at it are kept:
    8 entries); k = 0.2 the 8th smallest, 1 again; k = 0.1 the 9th, 2. With the two near-1
    values (d = 12): k = 0.25 the 9th smallest, 1 + 2⁻²³; k = 0.2 (n = 2) the 10th, 1 + 2⁻²².
    """
    w = torch.tensor([0.5, -1, 1, 1, -1, 2, 3, -1, 1, 0.25])
    vectors = InMemoryTaskVectors({"a": {"w": w}, "b": {"w": -w}})
    for k, want in ((0.5, 1.0), (0.2, 1.0), (0.1, 2.0), (1.0, 0.0)):
        assert exact_thresholds(vectors, k).tolist() == [want, want]
    near = torch.tensor([1 + 2**-23, 1 + 2**-22])
    assert (near.view(torch.int32) >> 16).tolist() == [0x3F80, 0x3F80]
    vectors = InMemoryTaskVectors({"a": {"w": w, "v": near}})
    assert exact_thresholds(vectors, 0.25).tolist() == [1 + 2**-23]
    assert exact_thresholds(vectors, 0.2).tolist() == [1 + 2**-22]


def _bf16_experts(seed: int, tasks: int = 3) -> dict:
    """τ = θ_t − θ0 of bf16 weights, in float32: few distinct values, heavy ties."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"w": (300, 700), "b": (700,), "e": (50, 40, 3), "s": ()}
    base = {k: torch.randn(s, generator=gen).bfloat16() for k, s in shapes.items()}

    def expert(v):
        return (v.float() + 0.01 * torch.randn(v.shape, generator=gen)).bfloat16()

    return {
        f"t{t}": {k: expert(v).float() - v.float() for k, v in base.items()} for t in range(tasks)
    }


@pytest.mark.parametrize("k", [0.001, 0.2, 0.5, 0.97, 1.0])
def test_the_exact_selection_equals_a_partition_on_bf16_differences(k):
    vectors = InMemoryTaskVectors(_bf16_experts(seed=int(k * 1000)))
    want = partition_thresholds(vectors, k)
    assert torch.equal(exact_thresholds(vectors, k), want)
    for transform in (masking.Drop(0.5), lambda tv, ctx: dare(tv, ctx, 0.3)):
        want = partition_thresholds(vectors, k, 7, transform)
        assert torch.equal(exact_thresholds(vectors, k, 7, transform), want)


def test_an_overflow_of_ties_gives_the_partitions_threshold(monkeypatch):
    """The bracket holds the rank but far more tied values than it keeps (bf16 LLMs)."""
    vectors = InMemoryTaskVectors(_bf16_experts(seed=1))
    monkeypatch.setattr(masking, "CAPACITY", 4096)
    calls = []

    def spy(*args):
        calls.append(args)
        return exact_thresholds(*args)

    monkeypatch.setattr(masking, "exact_thresholds", spy)
    for k in (0.1, 0.2, 0.5):
        assert torch.equal(global_thresholds(vectors, k), partition_thresholds(vectors, k))
        dropped = global_thresholds(vectors, k, 3, masking.Drop(0.5))
        assert torch.equal(dropped, partition_thresholds(vectors, k, 3, masking.Drop(0.5)))
    assert len(calls) == 6


LAZY_SELECTION = r"""
import resource, sys, torch
from atmbench import kernels
from atmbench.default_plugins.methods import masking

class Lazy:  # task vectors made when asked for and held nowhere: what stays is the selection's
    unchecked = False

    def __init__(self, params):
        self.tasks, self.params = ("a", "b"), params

    def keys(self, task):
        return [f"p{i}" for i in range(self.params)]

    def get(self, task, key):
        gen = torch.Generator().manual_seed(self.tasks.index(task) * 1000 + int(key[1:]))
        return torch.randint(-50, 51, (1 << 20,), generator=gen).float() * 2**-10  # ties

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

kernels.compile_kernels()
masking.exact_thresholds(Lazy(2), 0.2, 0, sys.argv[1] == "drop" and masking.Drop(0.5))
before = peak()
got = masking.exact_thresholds(Lazy(64), 0.2, 0, sys.argv[1] == "drop" and masking.Drop(0.5))
print(peak() - before, *got.tolist())
"""


@pytest.mark.parametrize("drop", ["none", "drop"])
def test_the_exact_selection_holds_one_parameter_not_a_task_vector(drop):
    """Two tasks of 64 parameters of 2^20 tied values (256 MB of float32 each), made when
    asked for: the selection's peak RSS grows by far less than one task vector (gathering a
    task's magnitudes and partitioning them took twice its size)."""
    done = subprocess.run(
        [sys.executable, "-c", LAZY_SELECTION, drop], capture_output=True, text=True, check=True
    )
    grown, *thresholds = done.stdout.split()
    assert int(grown) < 48 * 2**20  # a task vector: 256 MiB
    # |τ| · 2^10 ≤ m for (2m + 1) / 101 of the entries: 80% is first reached at m = 40;
    # with half dropped (and the rest doubled), 1/2 + (2m + 1) / 202 first at m = 30
    want = 60.0 if drop == "drop" else 40.0
    assert [float(v) * 2**10 for v in thresholds] == [want, want]


@pytest.mark.parametrize("shift", [0.3, -0.3])
@pytest.mark.parametrize("name", ["ties", "consensus_ties"])
def test_ties_settles_tied_signs_by_the_whole_model_vote(name, shift):
    """Entries whose kept values cancel exactly take the sign of the model-wide vote, which
    is only complete after the last block: the early blocks' ties are settled at the end."""
    base, vectors = _model(tasks=4)
    for tv in vectors.values():
        for key in tv:
            tv[key] += shift  # the vote's sign
    for key, index in (("big", (0, slice(0, 6))), ("bias", (slice(0, 3),))):
        for task, value in zip(vectors, (5.0, -5.0, 5.0, -5.0), strict=True):
            vectors[task][key][index] = value
    method = registry.methods()[name]
    hparams = {h.name: h.default for h in method.hparams}
    got = merged_task_vector(method, base, InMemoryTaskVectors(vectors), hparams)
    thresholds = global_thresholds(InMemoryTaskVectors(vectors), hparams["k"])
    stacked = {k: torch.stack([tv[k] for tv in vectors.values()]) for k in base}
    trimmed = {k: trim(tv, thresholds) for k, tv in stacked.items()}
    majority = float(torch.sign(sum(torch.sign(t.sum(0)).sum() for t in trimmed.values())))
    assert majority == (1.0 if shift > 0 else -1.0)
    for key, t in trimmed.items():
        want = disjoint_merge(t, elect_sign(t, majority), hparams["merge"])
        if name == "consensus_ties":
            masks = tall_masks(stacked[key], want, hparams["mask_lam"])
            want = want * consensus_mask(masks, hparams["agree"])
        assert torch.allclose(got[key], want, rtol=1e-5, atol=1e-6), key
    tied = majority * (5.0 if hparams["merge"] == "mean" else 10.0)  # 2 of 4 tasks agree
    assert got["big"][0, 0] == tied and got["bias"][0] == tied


# ---------------------------------------------------------------- Breadcrumbs band


@pytest.mark.parametrize(
    ("keep", "outliers"), [(0.15, 0.006), (0.05, 0.001), (0.5, 0.2), (1.0, 0.0), (0.1, 0.95)]
)
def test_breadcrumbs_selects_as_the_official_code(keep, outliers):
    """Ties at the band's bounds broken as ``torch.topk`` breaks them, as the official code."""
    gen = torch.Generator().manual_seed(0)
    smooth = torch.randn(3, 50, 768, generator=gen)
    scaled = smooth * torch.logspace(-4, 2, 50).unsqueeze(1)  # rows of very different scales
    repeated = torch.randint(-3, 4, (3, 50, 300), generator=gen).float()  # ties at the bounds
    sparse = smooth * (torch.rand(3, 50, 768, generator=gen) < 0.1)  # zeros at the lower bound
    strided = smooth.clone()
    strided[..., ::8] *= 1000  # the sample sees only the large entries: its guess misses
    head = smooth[:, :, :8]  # too short to sample
    ordered = smooth.sort(-1).values
    shrinking = scaled.flip(1)  # each row's guess from the one before keeps too few
    cases = (smooth, scaled, shrinking, repeated, sparse, strided, head, smooth[:, 0], ordered)
    for tensor in cases:
        want = sum(official_middle_keep(tv, keep, outliers) for tv in tensor)  # task order
        assert torch.equal(breadcrumbs_sum(tensor, keep, outliers), want)
        assert torch.equal(breadcrumbs_sum(list(tensor), keep, outliers), want)


# ---------------------------------------------------------------- kernels


def test_kth_smallest_by_counting_equals_kthvalue():
    gen = torch.Generator().manual_seed(3)
    values = torch.cat(
        [
            torch.randn(1, 5000, generator=gen).abs(),
            torch.randint(0, 4, (1, 5000), generator=gen).float(),  # heavy ties, zeros
            torch.logspace(-30, 30, 5000).unsqueeze(0),  # sixty decades
        ]
    )
    counts = torch.tensor([5000, 4000, 1])
    for rank in (1, 2, 500, 999):
        ranks = torch.tensor([rank, rank, 1])
        rows = zip(values, counts, ranks, strict=True)
        want = [float(v[:c].kthvalue(int(r)).values) for v, c, r in rows]
        assert kernels.kth_smallest(values, counts, ranks).tolist() == want


def test_uniform_is_the_splitmix64_stream_and_counter_based():
    def splitmix(seed: int, count: int) -> list[float]:  # the textbook generator, in Python
        out, state, mask = [], seed, (1 << 64) - 1
        for _ in range(count):
            state = (state + 0x9E3779B97F4A7C15) & mask
            z = state
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
            out.append(((z ^ (z >> 31)) >> 40) / 2**24)
        return out

    draws = kernels.uniform(12345, 0, 10)
    assert draws.dtype == torch.float32 and draws.tolist() == splitmix(12345, 10)
    assert torch.equal(kernels.uniform(12345, 4, 6), draws[4:])
    many = kernels.uniform(7, 0, 200_000)
    assert abs(float(many.mean()) - 0.5) < 0.005 and float(many.min()) >= 0.0


@pytest.mark.parametrize("tasks", [1, 3, 8])
def test_fused_ties_kernel_matches_the_torch_definition(tasks):
    gen = torch.Generator().manual_seed(tasks)
    tv = torch.randn(tasks, 40, 97, generator=gen)
    tv[:, 0, :5] = 0.0  # all trimmed: the majority decides, nothing is picked
    if tasks > 1:
        tv[0, 1, :4] += torch.sign(tv[0, 1, :4])  # large enough to be kept
        tv[1, 1, :4] = -tv[0, 1, :4]  # exact cancellations: the majority decides
        tv[2:, 1, :4] = 0.0
    thresholds = torch.rand(tasks, generator=gen) * 0.5
    for majority in (1.0, -1.0, 0.0):
        for merge in ("mean", "sum"):
            trimmed = trim(tv, thresholds)
            want = disjoint_merge(trimmed, elect_sign(trimmed, majority), merge)
            got, votes, undecided = kernels.ties_merge(tv, thresholds, majority, merge == "mean")
            # Equal up to the rounding of the sums over tasks (sequential here; torch may
            # pair them up), which the test data keeps away from 0.
            assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)
            total = trimmed.sum(0)
            assert votes == int(torch.sign(total).sum())
            assert undecided == int(((total == 0) & (trimmed != 0).any(0)).sum())
            assert undecided == (4 if tasks > 1 else 0)


@pytest.mark.parametrize("agree", [0, 1, 2, 4])
def test_ties_kernel_masks_with_the_consensus_kernel(agree):
    """Consensus-TIES' fused mask equals the consensus kernel run on TIES' output."""
    tv = torch.randn(3, 5000, generator=torch.Generator().manual_seed(agree))
    thresholds = torch.tensor([0.3, 0.6, 0.9])
    for majority, mean, lam in ((-1.0, False, 0.6), (1.0, True, 0.2)):
        merged, votes, undecided = kernels.ties_merge(tv, thresholds, majority, mean)
        want = kernels.consensus(tv, merged, lam, agree)
        got = kernels.ties_merge(tv, thresholds, majority, mean, consensus=(lam, agree))
        assert torch.equal(got[0], want) and got[1:] == (votes, undecided)


def test_fused_dare_matches_masks_times_rescale():
    gen = torch.Generator().manual_seed(0)
    tv = torch.randn(3, 30, 11, generator=gen)
    ctx = TensorContext("w", ("a", "b", "c"), seed=4, offset=330)
    for p in (0.0, 0.1, 0.3, 0.5, 0.9):  # 0.5: u = p exactly is possible, and dropped
        want = dare_rescale(tv, dare_keep_masks(tv, ctx, p), p)
        assert torch.equal(dare(tv, ctx, p), want)


@pytest.mark.parametrize("agree", [0, 1, 2, 3])
def test_fused_consensus_matches_the_tall_mask_definition(agree):
    gen = torch.Generator().manual_seed(agree)
    tv = torch.randn(3, 40, 60, generator=gen)
    tv[0, 0, :3] = 0.0
    merged = tv.sum(0)
    for lam in (0.2, 0.6, 1.0):
        want = merged * consensus_mask(tall_masks(tv, merged, lam), agree)
        assert torch.equal(kernels.consensus(tv, merged, lam, agree), want)
