"""RegMean++: the Grams follow the merged stream; FusionBench's own run as a golden."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from open_clip.transformer import QuickGELU, VisionTransformer
from safetensors.torch import load_file

from atmbench import registry
from atmbench.adapt import AdaptRequest
from atmbench.default_plugins.methods import regmean_pp
from atmbench.default_plugins.suites.vision.convert import hf_to_open_clip
from atmbench.method import FloatingOnly, InMemoryTaskVectors
from atmbench.streaming import merged_task_vector
from atmbench.testing.refiners import ToyBenchmark

GOLDEN = Path(__file__).parent / "data" / "golden"
TASKS = ("t0", "t1", "t2")


def _tower() -> VisionTransformer:
    torch.manual_seed(3)
    return VisionTransformer(
        image_size=8,
        patch_size=4,
        width=8,
        layers=2,
        heads=2,
        mlp_ratio=4.0,
        output_dim=4,
        act_layer=QuickGELU,
    ).eval()


def _golden_setup():
    raw = load_file(GOLDEN / "regmean_pp_inputs.safetensors")
    hf_base = {k[5:]: v for k, v in raw.items() if k.startswith("base.")}
    proj = _tower().state_dict()["proj"]
    base = {**hf_to_open_clip(hf_base), "proj": proj}
    vectors = {
        t: {
            **hf_to_open_clip({k: raw[f"tv.{t}.{k}"] for k in hf_base}),
            "proj": torch.zeros_like(proj),
        }
        for t in TASKS
    }
    batches = [[raw[f"x.{t}.{b}"] for b in range(2)] for t in TASKS]
    return base, vectors, batches


def _ours(alpha: float):
    base, vectors, batches = _golden_setup()
    experts = [{k: base[k] + vectors[t][k] for k in base} for t in TASKS]
    model = _tower()
    model.load_state_dict({k: torch.stack([e[k] for e in experts]).mean(0) for k in base})
    grams = regmean_pp.layerwise_grams(model, base, experts, batches, lambda m, x: m(x), alpha)
    method = registry.methods()["regmean_pp"]
    tvs = InMemoryTaskVectors(vectors)
    return base, vectors, merged_task_vector(method, base, tvs, {"alpha": alpha}, 0, None, grams)


@pytest.mark.parametrize(("alpha", "tag"), [(0.5, "a05"), (0.95, "a095")])
def test_matches_fusionbench_regmean_plusplus(alpha, tag):
    """FusionBench's RegMeanAlgorithmForCLIPPlusPlus.run on a tiny CLIP tower (RECIPE.md)."""
    base, vectors, ours = _ours(alpha)
    raw = load_file(GOLDEN / "regmean_pp.safetensors")
    golden = hf_to_open_clip(
        {k[len(tag) + 1 :]: v for k, v in raw.items() if k.startswith(tag + ".")}
    )
    assert set(golden) == set(base) - {"proj"}
    mean = {k: torch.stack([vectors[t][k] for t in TASKS]).mean(0) for k in base}
    for key, expected in golden.items():
        if key.startswith("ln_post."):
            # FusionBench never writes post_layernorm (θ0); atmbench averages it
            assert torch.equal(expected, torch.zeros_like(expected))
            assert torch.allclose(ours[key], mean[key], atol=1e-7)
            continue
        error = (ours[key] - expected).abs().max().item()
        assert error < 2e-5 * max(1.0, expected.abs().max().item()), (key, error)
    # the linear weights are not the mean (RegMean did something), biases and LN are
    for key in (
        "transformer.resblocks.1.mlp.c_fc.weight",
        "transformer.resblocks.0.attn.in_proj_weight",
    ):
        assert (golden[key] - mean[key]).abs().max() > 1e-3
    assert torch.allclose(
        ours["transformer.resblocks.1.ln_2.bias"],
        mean["transformer.resblocks.1.ln_2.bias"],
        atol=1e-7,
    )


def test_second_blocks_grams_see_the_merged_first_block_not_the_experts():
    base, vectors, batches = _golden_setup()
    experts = [{k: base[k] + vectors[t][k] for k in base} for t in TASKS]
    model = _tower()
    model.load_state_dict({k: torch.stack([e[k] for e in experts]).mean(0) for k in base})
    grams = regmean_pp.layerwise_grams(model, base, experts, batches, lambda m, x: m(x), 0.5)
    assert set(grams) == {
        f"transformer.resblocks.{i}.{k}"
        for i in range(2)
        for k in (
            "attn.in_proj_weight",
            "attn.out_proj.weight",
            "mlp.c_fc.weight",
            "mlp.c_proj.weight",
        )
    }
    # by hand for task 0, block 1's c_fc: the experts' mean embeddings, the *merged* block 0,
    # then task 0's own block 1 (ln_1, attention, ln_2); RegMean (plain) would run task 0's
    # whole expert instead
    merged0 = regmean_pp.merged_block("transformer.resblocks.0.", base, experts, grams, 0.5)
    mean = {k: torch.stack([e[k] for e in experts]).mean(0) for k in base}
    block1 = {k: v for k, v in experts[0].items() if k.startswith("transformer.resblocks.1.")}
    tower = _tower()
    tower.load_state_dict({**mean, **merged0, **block1})
    inputs = []
    hook = tower.transformer.resblocks[1].mlp.c_fc.register_forward_pre_hook(
        lambda m, a: inputs.append(a[0])
    )
    with torch.no_grad():
        for x in batches[0]:
            tower(x)
    hook.remove()
    x = torch.cat([i.reshape(-1, i.shape[-1]) for i in inputs])
    expected = x.T @ x / len(x)
    assert torch.allclose(grams["transformer.resblocks.1.mlp.c_fc.weight"][0], expected, atol=1e-6)


def test_needs_a_blocks_list_and_registers_as_a_train_data_method():
    method = registry.methods()["regmean_pp"]
    assert method.data == "train" and method.adapt is not None
    assert [(h.name, h.default) for h in method.hparams] == [("alpha", 0.95)]
    bench = ToyBenchmark()
    base = bench.base_state()
    vectors = InMemoryTaskVectors(
        {t: {k: torch.ones_like(v) for k, v in base.items()} for t in bench.tasks}
    )
    request = AdaptRequest(bench, base, FloatingOnly(vectors, base), seed=0)
    with pytest.raises(ValueError, match="needs a backbone with a 'transformer.resblocks' list"):
        method.adapt(request, alpha=0.5)
