"""transformers CLIP vision checkpoints -> open_clip names: same network, same features."""

from __future__ import annotations

import pytest
import torch
from open_clip.transformer import QuickGELU, VisionTransformer

from atmbench.default_plugins.suites.vision.convert import (
    ConversionError,
    complete_from_base,
    hf_to_open_clip,
)

transformers = pytest.importorskip("transformers")

WIDTH, LAYERS, HEADS, PATCH, SIZE, DIM = 32, 2, 4, 8, 32, 16


def _hf_model(with_projection: bool):
    config = transformers.CLIPVisionConfig(
        hidden_size=WIDTH,
        intermediate_size=4 * WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        image_size=SIZE,
        patch_size=PATCH,
        projection_dim=DIM,
        hidden_act="quick_gelu",
    )
    torch.manual_seed(0)
    cls = (
        transformers.CLIPVisionModelWithProjection
        if with_projection
        else transformers.CLIPVisionModel
    )
    model = cls(config).eval()
    with torch.no_grad():  # random init leaves biases and LN at 0/1: perturb every tensor
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _open_clip_model() -> VisionTransformer:
    return VisionTransformer(
        image_size=SIZE,
        patch_size=PATCH,
        width=WIDTH,
        layers=LAYERS,
        heads=HEADS,
        mlp_ratio=4.0,
        output_dim=DIM,
        act_layer=QuickGELU,
    ).eval()


def test_names_and_layouts_tensor_by_tensor():
    hf = _hf_model(with_projection=True)
    hf_sd = hf.state_dict()
    out = hf_to_open_clip(hf_sd)
    target = _open_clip_model().state_dict()
    assert set(out) == set(target)
    for key, value in out.items():
        assert value.shape == target[key].shape, key
    layer = "vision_model.encoder.layers.1.self_attn"
    packed = out["transformer.resblocks.1.attn.in_proj_weight"]
    assert torch.equal(packed[:WIDTH], hf_sd[f"{layer}.q_proj.weight"])
    assert torch.equal(packed[WIDTH : 2 * WIDTH], hf_sd[f"{layer}.k_proj.weight"])
    assert torch.equal(packed[2 * WIDTH :], hf_sd[f"{layer}.v_proj.weight"])
    bias = out["transformer.resblocks.1.attn.in_proj_bias"]
    assert torch.equal(bias[2 * WIDTH :], hf_sd[f"{layer}.v_proj.bias"])
    assert torch.equal(out["proj"], hf_sd["visual_projection.weight"].T)
    assert torch.equal(out["ln_pre.weight"], hf_sd["vision_model.pre_layrnorm.weight"])
    assert torch.equal(
        out["transformer.resblocks.0.mlp.c_proj.weight"],
        hf_sd["vision_model.encoder.layers.0.mlp.fc2.weight"],
    )


def test_identical_image_features_with_projection():
    hf = _hf_model(with_projection=True)
    ours = _open_clip_model()
    ours.load_state_dict(hf_to_open_clip(hf.state_dict()))
    images = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(pixel_values=images).image_embeds
        got = ours(images)
    assert got.shape == (3, DIM)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_vision_model_without_projection_keeps_base_proj():
    hf = _hf_model(with_projection=False)  # transformers 5 layout: keys without a prefix
    base = _open_clip_model().state_dict()
    base["proj"] = torch.eye(WIDTH, DIM)  # identity projection: features = pooled output
    state = complete_from_base(hf_to_open_clip(hf.state_dict()), base)
    assert torch.equal(state["proj"], base["proj"])
    ours = _open_clip_model()
    ours.load_state_dict(state)
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(pixel_values=images).pooler_output[:, :DIM]
        got = ours(images)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_transformers4_prefixed_checkpoint_converts_the_same():
    """Hub checkpoints saved by transformers 4.x carry ``vision_model.`` on every key."""
    hf_sd = _hf_model(with_projection=False).state_dict()
    old = {f"vision_model.{k}": v for k, v in hf_sd.items()}
    old["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    new, converted = hf_to_open_clip(hf_sd), hf_to_open_clip(old)
    assert set(new) == set(converted) and "proj" not in new
    assert all(torch.equal(new[k], converted[k]) for k in new)


def test_errors_name_the_problem():
    with pytest.raises(ConversionError, match="no CLIP vision tensors"):
        hf_to_open_clip({"text_model.x": torch.zeros(1)})
    hf_sd = _hf_model(with_projection=False).state_dict()
    wrong = _open_clip_model().state_dict()
    wrong["conv1.weight"] = torch.zeros(WIDTH, 3, 4, 4)
    with pytest.raises(ConversionError, match="conv1.weight: shape"):
        complete_from_base(hf_to_open_clip(hf_sd), wrong)


def test_load_experts_from_folder_and_hub(tmp_path, monkeypatch):
    import huggingface_hub

    from atmbench.default_plugins.suites.vision import experts

    hf = _hf_model(with_projection=False)
    hf.save_pretrained(tmp_path / "local" / "stanford-cars")  # FusionBench suffix, safetensors
    torch.save(hf.state_dict(), tmp_path / "local" / "eurosat.bin")  # read weights_only
    base = _open_clip_model().state_dict()
    loaded = experts.load_experts(str(tmp_path / "local"), ["cars", "eurosat"], base)
    for task in ("cars", "eurosat"):
        assert torch.equal(loaded[task]["proj"], base["proj"])
        assert torch.equal(
            loaded[task]["transformer.resblocks.0.mlp.c_fc.weight"],
            hf.state_dict()["encoder.layers.0.mlp.fc1.weight"],
        )
    asked = []

    def snapshot_download(repo, allow_patterns, cache_dir):
        asked.append(repo)
        return str(tmp_path / "local" / "stanford-cars")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    from_hub = experts.load_experts("hub:tanganke/clip-vit-base-patch32", ["cars"], base)
    assert asked == ["tanganke/clip-vit-base-patch32_stanford-cars"]
    assert all(torch.equal(from_hub["cars"][k], loaded["cars"][k]) for k in base)
    with pytest.raises(experts.SuiteDataError, match="no checkpoint for task 'dtd'"):
        experts.load_experts(str(tmp_path / "local"), ["dtd"], base)


def test_imported_experts_must_share_the_backbones_activation(tmp_path):
    from atmbench.default_plugins.suites.vision import experts

    hf = _hf_model(with_projection=False)
    hf.save_pretrained(tmp_path / "cars")  # config.json says hidden_act="quick_gelu"
    base = _open_clip_model().state_dict()
    loaded = experts.load_experts(str(tmp_path), ["cars"], base, activation="QuickGELU")
    assert set(loaded["cars"]) == set(base)
    with pytest.raises(experts.SuiteDataError, match="hidden_act='quick_gelu'.*runs GELU"):
        experts.load_experts(str(tmp_path), ["cars"], base, activation="GELU")


def test_no_published_expert_for_emnist(tmp_path):
    from atmbench.default_plugins.suites.vision import experts

    with pytest.raises(experts.SuiteDataError, match="no published expert.*emnist.*10 digits"):
        experts.checkpoint_paths("hub:tanganke/clip-vit-base-patch32", ["mnist", "emnist"])
    hf = _hf_model(with_projection=False)
    hf.save_pretrained(tmp_path / "emnist")  # a folder may still hold one
    assert experts.checkpoint_paths(str(tmp_path), ["emnist"]) == {
        "emnist": tmp_path / "emnist" / "model.safetensors"
    }
