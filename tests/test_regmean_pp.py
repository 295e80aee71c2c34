"""RegMean++: the Grams follow the merged stream; FusionBench's own run as a golden."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from open_clip.transformer import QuickGELU, VisionTransformer
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from atmbench import registry
from atmbench.adapt import AdaptRequest
from atmbench.default_plugins.methods import regmean_pp
from atmbench.default_plugins.suites.vision.convert import hf_to_open_clip
from atmbench.method import FloatingOnly, InMemoryTaskVectors
from atmbench.streaming import merged_task_vector
from atmbench.suite import blocks_of, residual_blocks
from atmbench.testing.refiners import ToyBenchmark

GOLDEN = Path(__file__).parent / "data" / "golden"
TASKS = ("t0", "t1", "t2")
VIT_BLOCKS = ("transformer.resblocks.0", "transformer.resblocks.1")


def _vit(model, x):
    model(x)


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
    grams = regmean_pp.layerwise_grams(model, VIT_BLOCKS, base, experts, batches, _vit, alpha)
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
    grams = regmean_pp.layerwise_grams(model, VIT_BLOCKS, base, experts, batches, _vit, 0.5)
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
    gram = grams["transformer.resblocks.1.mlp.c_fc.weight"]["gram"][0]
    assert torch.allclose(gram, expected, atol=1e-6)


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
    with pytest.raises(ValueError, match="suite 'toy2' does not name its model's residual"):
        method.adapt(request, alpha=0.5)


# -- language models: the blocks get what the model passes them (masks, positions, ...) -------


def _llama():
    config = transformers.LlamaConfig(
        vocab_size=23,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config), ("model.layers",), _causal_lm


def _t5():
    config = transformers.T5Config(
        vocab_size=23,
        d_model=16,
        d_kv=8,
        d_ff=24,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
    )
    return (
        transformers.T5ForConditionalGeneration(config),
        ("encoder.block", "decoder.block"),
        _t5_run,
    )


def _roberta():
    config = transformers.RobertaConfig(
        vocab_size=23,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=24,
        pad_token_id=1,
    )
    return transformers.RobertaModel(config, add_pooling_layer=False), ("encoder.layer",), _padded


def _gpt2():
    config = transformers.GPT2Config(
        vocab_size=23, n_embd=16, n_layer=2, n_head=2, n_positions=16, n_inner=24
    )
    return transformers.GPT2Model(config), ("h",), _padded


def _causal_lm(model, ids):
    model(input_ids=ids)


def _t5_run(model, ids):
    model(input_ids=ids, decoder_input_ids=ids[:, :4])


def _padded(model, ids):
    """Right-padded inputs under an attention mask that the layers must receive."""
    mask = torch.ones_like(ids)
    mask[::2, -3:] = 0
    model(input_ids=ids.masked_fill(mask == 0, 1), attention_mask=mask)


def _linear_grams(model: nn.Module, prefix: str, batches, run) -> dict[str, Tensor]:
    """X^T X / rows of every ``nn.Linear`` (``gram``) and GPT-2 ``Conv1D`` (``gram_rows``)
    under ``prefix``, from plain forward hooks: {(key, kind): Gram}."""
    sums, rows, handles = {}, {}, []
    kinds = {nn.Linear: "gram", Conv1D: "gram_rows"}
    for name, module in model.named_modules():
        kind = kinds.get(type(module))
        if name.startswith(prefix) and kind is not None:

            def hook(_m, args, key=(f"{name}.weight", kind)):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sums[key] = sums.get(key, 0) + x.T @ x
                rows[key] = rows.get(key, 0) + len(x)

            handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for batch in batches:
            run(model, batch)
    for handle in handles:
        handle.remove()
    return {k: (v / rows[k]).float() for k, v in sums.items()}


@pytest.mark.parametrize(
    "family", [_llama, _t5, _roberta, _gpt2], ids=["llama", "t5", "roberta", "gpt2"]
)
def test_language_model_blocks_see_the_merged_model_below_them(family):
    """Block i's Grams for task t, by hand: the experts' mean outside the blocks, the merged
    blocks below i, task t's block i, run as one whole model, so that the block gets the
    model's own rotary positions and causal mask (Llama), relative position bias and
    encoder output (T5), padding mask (RoBERTa, GPT-2); GPT-2's Conv1D maps get ``gram_rows``."""
    torch.manual_seed(0)
    model, lists, run = family()
    model.eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    experts = [
        {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        for _ in range(2)
    ]
    mean = {k: (experts[0][k] + experts[1][k]) / 2 for k in base}
    batches = [[torch.randint(2, 23, (4, 7), generator=gen) for _ in range(2)] for _ in experts]
    blocks = blocks_of(model, *lists)
    model.load_state_dict(mean)
    grams = regmean_pp.layerwise_grams(model, blocks, base, experts, batches, run, 0.5)

    merged = {}
    for name in blocks:
        prefix = f"{name}."
        for task, expert in enumerate(experts):
            own = {k: v for k, v in expert.items() if k.startswith(prefix)}
            reference, _, _ = family()
            reference.load_state_dict({**mean, **merged, **own})
            reference.eval()
            expected = _linear_grams(reference, prefix, batches[task], run)
            ours = {(k, kind) for k, s in grams.items() if k.startswith(prefix) for kind in s}
            assert expected and set(expected) == ours
            for (key, kind), gram in expected.items():
                assert torch.allclose(grams[key][kind][task], gram, atol=1e-5, rtol=1e-4), key
        merged.update(regmean_pp.merged_block(prefix, base, experts, grams, 0.5))
    # the last block saw the merged model, not task 0's expert (RegMean's Grams)
    last = f"{blocks[-1]}."
    expert_model, _, _ = family()
    expert_model.load_state_dict(experts[0])
    plain = _linear_grams(expert_model.eval(), last, batches[0], run)
    key, kind = next(k for k in plain if "q" in k[0].split(".")[-2] or "c_attn" in k[0])
    assert not torch.allclose(grams[key][kind][0], plain[key, kind], atol=1e-4)


def test_residual_blocks_come_from_the_suite_and_are_checked():
    llama, lists, _ = _llama()
    assert blocks_of(llama, *lists) == ["model.layers.0", "model.layers.1", "model.layers.2"]
    t5, lists, _ = _t5()
    assert blocks_of(t5, *lists) == [
        "encoder.block.0",
        "encoder.block.1",
        "decoder.block.0",
        "decoder.block.1",
    ]

    class Named(ToyBenchmark):
        def residual_blocks(self, backbone):
            return ["0", "layers.7"]

    bench = Named()
    with pytest.raises(
        ValueError, match=r"names residual blocks \['layers.7'\] that its Sequential"
    ):
        residual_blocks(bench, bench.backbone())
