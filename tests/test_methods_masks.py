"""TIES, DARE, Model Breadcrumbs and Consensus: hand-worked values, invariants, bad hparams.

The matches against the official implementations' outputs are in ``test_golden_masks.py``.
"""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from reference import dare_keep_masks, dare_rescale, disjoint_merge, elect_sign
from safetensors.torch import save_file

import atmbench
from atmbench import registry
from atmbench.cli import cli
from atmbench.default_plugins.methods.masking import dare, global_thresholds, middle_band
from atmbench.finetune import task_vector
from atmbench.method import FileTaskVectors, InMemoryTaskVectors, TensorContext
from atmbench.spec import SpecError, parse_spec
from atmbench.streaming import merged_task_vector

METHODS = ("ties", "dare_ta", "dare_ties", "breadcrumbs", "consensus_ta", "consensus_ties")

# ---------------------------------------------------------------- TIES


def test_ties_hand_worked_global_trim_elect_and_disjoint_mean():
    base = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}
    experts = {
        "a": {"w": torch.tensor([[4.0, -1.0], [0.5, 2.0]]), "b": torch.tensor([3.0, -0.2])},
        "b": {"w": torch.tensor([[-2.0, 3.0], [1.0, 1.5]]), "b": torch.tensor([-1.0, 0.1])},
    }
    # d = 6 entries per task over w AND b (global), k = 0.5: n = 3, threshold = 3rd smallest |τ|.
    # a: |τ| sorted 0.2 0.5 1 2 3 4 -> threshold 1 -> keeps 4,-1,2 | 3   (n + 1 = 4 entries)
    # b: |τ| sorted 0.1 1 1 1.5 2 3 -> threshold 1 -> keeps -2,3,1,1.5 | -1 (tied 1s both kept)
    # Σ trimmed: w [[2,2],[1,3.5]], b [2,0] -> γ = + everywhere; b[1] sums to 0 -> majority (+).
    # disjoint mean: w [[4, 3], [1, (2+1.5)/2]], b [3, 0]; disjoint sum: w[1,1] = 3.5.
    merged = atmbench.merge("ties:k=0.5", base, experts, lam=1.0)
    assert torch.equal(merged["w"], torch.tensor([[4.0, 3.0], [1.0, 1.75]]))
    assert torch.equal(merged["b"], torch.tensor([3.0, 0.0]))
    merged = atmbench.merge("ties:k=0.5,merge=sum,lam=0.5", base, experts)
    assert torch.equal(merged["w"], torch.tensor([[2.0, 1.5], [0.5, 1.75]]))


@pytest.mark.parametrize(("majority", "first"), [(1.0, 2.0), (0.0, -2.0), (-1.0, -2.0)])
def test_ties_zero_sum_sign_rule(majority, first):
    # entry 0: +2 and -2 sum to 0 -> γ = majority; a 0 vote keeps the negative entry (official).
    trimmed = torch.tensor([[2.0, 1.0, -3.0], [-2.0, 0.0, 0.0]])
    merged = disjoint_merge(trimmed, elect_sign(trimmed, majority), "mean")
    assert torch.equal(merged, torch.tensor([first, 1.0, -3.0]))


@pytest.mark.parametrize("k", [0.01, 0.2, 0.5, 0.9, 1.0])
def test_streaming_threshold_is_the_exact_kthvalue(k):
    gen = torch.Generator().manual_seed(1)
    vectors = {
        t: {
            "w": torch.randn(7, 5, generator=gen),
            "b": torch.randint(-3, 4, (9,), generator=gen).float(),  # many ties and zeros
        }
        for t in ("x", "y")
    }
    got = global_thresholds(InMemoryTaskVectors(vectors), k)
    for i, tv in enumerate(vectors.values()):
        flat = torch.cat([v.abs().reshape(-1) for v in tv.values()])
        d = flat.numel()
        expected = 0.0 if k == 1.0 else float(flat.kthvalue(d - int(d * k)).values)
        assert float(got[i]) == expected


@pytest.mark.parametrize("p", [0.5, 0.9])
def test_dare_ties_is_ties_on_the_dropped_vectors(monkeypatch, p):
    """Row blocks at odd offsets: the kernels draw the same drop as dare() writes out, and
    rescale it by the same 1 − p (at p = 0.9, float32(1 − p) ≠ float32(1) − float32(p))."""
    gen = torch.Generator().manual_seed(12)
    shapes = {"w": (40, 333), "b": (333,)}
    base = {k: torch.zeros(s) for k, s in shapes.items()}
    vectors = {t: {k: torch.randn(s, generator=gen) for k, s in shapes.items()} for t in "abc"}
    stacked = {k: torch.stack([vectors[t][k] for t in "abc"]) for k in shapes}
    drops = {k: dare(tv, TensorContext(k, ("a", "b", "c")), p) for k, tv in stacked.items()}
    dropped = {t: {k: drops[k][i].clone() for k in shapes} for i, t in enumerate("abc")}
    monkeypatch.setattr("atmbench.streaming.BLOCK", 1000)  # three rows of 333 per block
    methods = registry.methods()
    hp = {"k": 0.2, "merge": "mean"}
    got = merged_task_vector(
        methods["dare_ties"], base, InMemoryTaskVectors(vectors), dict(hp, p=p)
    )
    want = merged_task_vector(methods["ties"], base, InMemoryTaskVectors(dropped), hp)
    assert all(torch.equal(got[k], want[k]) for k in shapes)


def test_prepare_streams_from_safetensors_files(tmp_path):
    base, experts = _random_model(seed=3)
    vectors = {t: {k: v - base[k] for k, v in s.items()} for t, s in experts.items()}
    files = {}
    for task, tv in vectors.items():
        files[task] = tmp_path / f"{task}.safetensors"
        save_file(tv, str(files[task]))
    for name in ("ties", "dare_ties", "consensus_ties"):
        method = registry.methods()[name]
        hp = {h.name: h.default for h in method.hparams}
        got = merged_task_vector(method, base, FileTaskVectors(files), hp)
        want = merged_task_vector(method, base, InMemoryTaskVectors(vectors), hp)
        assert all(torch.equal(got[k], want[k]) for k in base), name


# ---------------------------------------------------------------- DARE


def test_dare_rescale_hand_worked():
    tv = torch.tensor([[[2.0, 4.0], [-6.0, 8.0]]])
    keep = torch.tensor([[[True, False], [False, True]]])
    # survivors / (1 - 0.5): 2 -> 4, 8 -> 16; dropped entries are 0
    assert torch.equal(dare_rescale(tv, keep, 0.5), torch.tensor([[[4.0, 0.0], [0.0, 16.0]]]))


def test_dare_sampling_rate_determinism_and_order_invariance():
    tv = torch.ones(2, 200, 100)
    ctx = TensorContext("w", ("a", "b"), seed=7)
    keep = dare_keep_masks(tv, ctx, 0.3)
    assert keep.shape == tv.shape and keep.dtype == torch.bool
    assert abs(keep[0].float().mean().item() - 0.7) < 0.01
    assert abs(keep[1].float().mean().item() - 0.7) < 0.01
    assert not torch.equal(keep[0], keep[1])  # each task draws its own mask
    assert torch.equal(keep, dare_keep_masks(tv, ctx, 0.3))  # same seed, same masks
    swapped = dare_keep_masks(tv, TensorContext("w", ("b", "a"), seed=7), 0.3)
    assert torch.equal(swapped, keep.flip(0))  # a task's mask ignores the order
    assert not torch.equal(dare_keep_masks(tv, TensorContext("w", ("a", "b"), seed=8), 0.3), keep)
    assert not torch.equal(dare_keep_masks(tv, TensorContext("v", ("a", "b"), seed=7), 0.3), keep)


def test_dare_masks_do_not_depend_on_the_row_blocks():
    """A block draws its entries' places in the parameter's streams: split or whole, the
    same masks."""
    tv = torch.ones(2, 10, 7)
    whole = dare_keep_masks(tv, TensorContext("w", ("a", "b"), seed=3), 0.5)
    parts = [
        dare_keep_masks(
            tv[:, rows], TensorContext("w", ("a", "b"), seed=3, offset=rows.start * 7), 0.5
        )
        for rows in (slice(0, 3), slice(3, 10))
    ]
    assert torch.equal(torch.cat(parts, 1), whole)


def test_dare_seed_changes_the_merge_and_p_zero_is_task_arithmetic():
    base, experts = _random_model(seed=4)
    first = atmbench.merge("dare_ta:lam=1", base, experts, seed=0)
    assert torch.equal(first["w"], atmbench.merge("dare_ta:lam=1", base, experts, seed=0)["w"])
    assert not torch.equal(first["w"], atmbench.merge("dare_ta:lam=1", base, experts, seed=1)["w"])
    plain = atmbench.merge("ta:lam=1", base, experts)
    assert torch.equal(atmbench.merge("dare_ta:p=0,lam=1", base, experts)["w"], plain["w"])


# ---------------------------------------------------------------- Breadcrumbs


def test_breadcrumbs_middle_band_per_row():
    rows = torch.tensor([[5.0, -1.0, 3.0, 0.5, -4.0, 2.0], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    # 6 columns, outliers 0.2: int(1.2) = 1 largest dropped; keep 0.5: int(3.0) = 3 kept next.
    # row 0 by |τ|: 5 | -4 3 2 | -1 0.5 ; row 1: 0.6 | 0.5 0.4 0.3 | 0.2 0.1 (per row, not global)
    mask = middle_band(rows, keep=0.5, outliers=0.2)
    assert mask.tolist() == [
        [False, False, True, False, True, True],
        [False, False, True, True, True, False],
    ]
    base = {"w": torch.zeros(2, 6), "b": torch.zeros(6)}
    experts = {"a": {"w": rows, "b": rows[0]}, "b": {"w": -rows, "b": torch.zeros(6)}}
    merged = atmbench.merge("breadcrumbs:keep=0.5,outliers=0.2,lam=0.5", base, experts)
    assert torch.equal(merged["w"], torch.zeros(2, 6))  # τ_a and -τ_a have the same band
    assert torch.equal(merged["b"], torch.tensor([0.0, 0.0, 1.5, 0.0, -2.0, 1.0]))


# ---------------------------------------------------------------- Consensus


def test_consensus_ta_hand_worked():
    base = {"w": torch.zeros(4)}
    experts = {
        "a": {"w": torch.tensor([1.0, 0.125, 2.0, -1.0])},
        "b": {"w": torch.tensor([1.0, 2.0, -2.0, 1.0])},
        "c": {"w": torch.tensor([0.0, 0.125, 1.0, 1.0])},
    }
    # τ_MTL = Σ = [2, 2.25, 1, 1]; m_t = |τ_t| > 0.5 |Σ - τ_t|:
    # a: [1>0.5, 0.125>1.0625, 2>0.5, 1>1 (strict: no)] = [1, 0, 1, 0]
    # b: [1>0.5, 2>0.125, 2>1.5, 1>0] = [1, 1, 1, 1]
    # c: [0>1, 0.125>1.0625, 1>0, 1>0] = [0, 0, 1, 1]
    # agreeing masks: [2, 1, 3, 2] >= 2 -> keep [1, 0, 1, 1] -> [2, 0, 1, 1]
    merged = atmbench.merge("consensus_ta:mask_lam=0.5,lam=1", base, experts)
    assert torch.equal(merged["w"], torch.tensor([2.0, 0.0, 1.0, 1.0]))
    merged = atmbench.merge("consensus_ta:mask_lam=0.5,agree=3,lam=1", base, experts)
    assert torch.equal(merged["w"], torch.tensor([0.0, 0.0, 1.0, 0.0]))


def test_consensus_bounds_reduce_to_the_base_method_or_the_base():
    base, experts = _random_model(seed=5)
    for name, plain in (("consensus_ta", "ta"), ("consensus_ties", "ties:merge=sum")):
        everything = atmbench.merge(f"{name}:agree=0,lam=1", base, experts)
        reference = atmbench.merge(plain, base, experts, lam=1.0)
        assert all(torch.equal(everything[k], reference[k]) for k in base), name
        nothing = atmbench.merge(f"{name}:agree=4,lam=1", base, experts)
        assert all(torch.equal(nothing[k], base[k]) for k in base), name


# ---------------------------------------------------------------- invariants of all six


def _noisy(value: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return value.float() + 0.1 * torch.randn(value.shape, generator=gen)


def _random_model(seed: int, tasks=("a", "b", "c"), dtype=torch.float32):
    """Random base and experts; rows of 20 so Breadcrumbs' default band is not empty."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"w": (6, 20), "b": (6,), "ln": (20,)}
    base = {k: torch.randn(s, generator=gen).to(dtype) for k, s in shapes.items()}
    experts = {t: {k: _noisy(v, gen).to(dtype) for k, v in base.items()} for t in tasks}
    return base, experts


IDENTITY_SPECS = {
    "ties": "ties:k=1",
    "dare_ta": "dare_ta:p=0",
    "dare_ties": "dare_ties:p=0,k=1",
    "breadcrumbs": "breadcrumbs:keep=1,outliers=0",
    "consensus_ta": "consensus_ta:agree=1",
    "consensus_ties": "consensus_ties:agree=1,k=1",
}


@pytest.mark.parametrize("name", METHODS)
def test_no_tasks_gives_the_base(name):
    base, _ = _random_model(seed=6)
    merged = atmbench.merge(name, base, {})
    assert all(torch.equal(merged[k], base[k]) for k in base)


@pytest.mark.parametrize("name", METHODS)
def test_one_task_at_lambda_one_gives_the_expert_back(name):
    # where the method promises it: nothing trimmed, dropped or outvoted.
    base, experts = _random_model(seed=7, tasks=("a",))
    merged = atmbench.merge(IDENTITY_SPECS[name], base, experts, lam=1.0)
    assert all(torch.allclose(merged[k], experts["a"][k], atol=1e-6) for k in base)


@pytest.mark.parametrize("name", METHODS)
def test_task_order_does_not_matter(name):
    base, experts = _random_model(seed=8)
    forward = atmbench.merge(name, base, experts, seed=3)
    backward = atmbench.merge(name, base, dict(reversed(experts.items())), seed=3)
    assert all(torch.allclose(forward[k], backward[k], atol=1e-6) for k in base)


@pytest.mark.parametrize("name", METHODS)
def test_inputs_are_not_mutated_and_dtype_shape_are_kept(name):
    base, experts = _random_model(seed=9, dtype=torch.bfloat16)
    before = {t: {k: v.clone() for k, v in s.items()} for t, s in experts.items()}
    base_before = {k: v.clone() for k, v in base.items()}
    merged = atmbench.merge(name, base, experts)
    assert all(torch.equal(experts[t][k], before[t][k]) for t in before for k in before[t])
    assert all(torch.equal(base[k], base_before[k]) for k in base)
    for key, value in merged.items():
        assert value.dtype == torch.bfloat16 and value.shape == base[key].shape
    assert any(not torch.equal(merged[k], base[k]) for k in base)  # it did merge something


BAD = [
    ("ties:k=1.7", "k=1.7 is invalid: expected a float in (0.0, 1.0]"),
    ("ties:k=0", "k=0 is invalid"),
    ("ties:merge=max", "merge=max is invalid: expected one of mean, sum"),
    ("dare_ta:p=-0.1", "p=-0.1 is invalid: expected a float in [0.0, 1.0)"),
    ("dare:p=-0.1", "p=-0.1 is invalid: expected a float in [0.0, 1.0)"),
    ("dare_ties:p=1", "p=1 is invalid"),
    ("breadcrumbs:keep=2", "keep=2 is invalid: expected a float in [0.0, 1.0]"),
    ("consensus_ta:agree=-1", "agree=-1 is invalid: expected a int in [0, inf]"),
    ("consensus_ties:mask_lam=x", "mask_lam=x is invalid"),
]


@pytest.mark.parametrize(("spec", "message"), BAD)
def test_bad_hparams_are_rejected_by_the_spec_parser(spec, message):
    with pytest.raises(SpecError) as info:
        parse_spec(spec, registry.methods(), registry.refiners())
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(("alias", "name"), [("consensus", "consensus_ta"), ("dare", "dare_ta")])
def test_aliases_name_the_paper_variant(alias, name):
    parsed = parse_spec(f"{alias}:lam=0.5", registry.methods(), registry.refiners())
    assert parsed.method.name == name and parsed.label == f"{name}:lam=0.5"


def test_the_issue_catalogue_command_plans_every_method(home):
    """The catalogue's own command line (aliases included) plans without an error."""
    names = "average,ta,ties,dare_ties,breadcrumbs,consensus,tsv,iso_c,iso_cts,fisher,regmean"
    result = CliRunner().invoke(cli, ["run", "--suite", "digits8", "--methods", names, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "consensus_ta" in result.output and "regmean" in result.output


@pytest.mark.parametrize(("spec", "message"), BAD[:1] + BAD[4:5])
def test_bad_hparams_are_one_line_cli_errors(spec, message, home):
    result = CliRunner().invoke(cli, ["run", "--model", "vit-micro", "--methods", spec])
    assert result.exit_code == 2 or result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (home / "experts").exists()


DATA_FREE = sorted(n for n, m in registry.methods().items() if m.data == "none" and not m.needs)


@pytest.mark.parametrize("name", DATA_FREE)
def test_integer_buffers_are_neither_merged_nor_counted(name):
    """Position ids and batch counters keep the base's values, and a counter far larger than
    any weight does not move TIES' (or any global view's) thresholds: the floating-point
    parameters merge exactly as without the buffers."""
    base, experts = _random_model(seed=10)
    buffers = {"ids": torch.arange(1200).reshape(4, 300), "tracked": torch.tensor(5)}
    with_buffers = {k: dict(s) for k, s in experts.items()}
    for t, state in enumerate(with_buffers.values()):
        state.update(ids=buffers["ids"] + 1000 * (t + 1), tracked=torch.tensor(90 + t))
    if registry.methods()[name].per_task:  # a model per task: check each one
        want = atmbench.merge_per_task(name, base, experts, seed=1)
        got = atmbench.merge_per_task(name, {**base, **buffers}, with_buffers, seed=1)
        pairs = [(got[t], want[t]) for t in experts]
    else:
        want = atmbench.merge(name, base, experts, seed=1)
        pairs = [(atmbench.merge(name, {**base, **buffers}, with_buffers, seed=1), want)]
    for got_model, want_model in pairs:
        assert all(torch.equal(got_model[k], want_model[k]) for k in base), name
        for key, value in buffers.items():
            assert got_model[key].dtype == torch.int64 and torch.equal(got_model[key], value)


def test_task_vectors_of_integer_buffers_stay_integers():
    base = {"w": torch.ones(2), "ids": torch.arange(3)}
    vector = task_vector({"w": torch.full((2,), 3.0), "ids": torch.arange(3) + 7}, base)
    assert torch.equal(vector["w"], torch.full((2,), 2.0))
    assert vector["ids"].dtype == torch.int64 and torch.equal(vector["ids"], torch.arange(3) + 7)
