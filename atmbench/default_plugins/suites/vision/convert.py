"""Hugging Face ``transformers`` CLIP vision weights to open_clip ``VisionTransformer`` names.

Published experts (FusionBench's ``tanganke/clip-vit-base-patch32_<task>``) are
``CLIPVisionModel`` checkpoints; the suites fine-tune and merge open_clip's image tower, so
an imported expert must land on the same parameter names and layouts as θ0. The two
architectures are the same network; only names and two layouts differ:

* q/k/v are three ``Linear`` layers in transformers and one packed ``in_proj`` in
  ``nn.MultiheadAttention`` (rows stacked q, k, v);
* the visual projection is ``Linear(width, dim).weight`` (dim x width) in transformers and
  the matrix ``proj`` (width x dim) that open_clip right-multiplies.

Pure: state dict in, state dict out; no files, no models.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor

_PREFIXES = ("vision_model.", "model.vision_model.")
"""transformers 4.x saves ``CLIPVisionModel`` under ``vision_model.``; 5.x without a prefix."""
_ROOTS = ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")
_TOP = {
    "embeddings.class_embedding": "class_embedding",
    "embeddings.patch_embedding.weight": "conv1.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "pre_layrnorm.weight": "ln_pre.weight",
    "pre_layrnorm.bias": "ln_pre.bias",
    "post_layernorm.weight": "ln_post.weight",
    "post_layernorm.bias": "ln_post.bias",
}
_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_LAYER_KEY = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
_QKV = re.compile(r"self_attn\.([qkv])_proj")
_IGNORED = ("embeddings.position_ids",)


class ConversionError(ValueError):
    """A checkpoint that is not a transformers CLIP vision model."""


def _vision_part(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], Tensor | None]:
    """The vision tower's tensors without their prefix, and the projection if present."""
    vision: dict[str, Tensor] = {}
    projection = None
    for key, value in state.items():
        if key in ("visual_projection.weight", "model.visual_projection.weight"):
            projection = value
            continue
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                vision[key[len(prefix) :]] = value
                break
        else:
            if key.startswith(_ROOTS):
                vision[key] = value
    if not vision:
        raise ConversionError(
            "no CLIP vision tensors ('vision_model.*', 'embeddings.*', ...) found: not a "
            "transformers CLIP(Vision)Model checkpoint "
            f"(first keys: {', '.join(list(state)[:3])})"
        )
    return vision, projection


def hf_to_open_clip(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename and re-layout a ``CLIPVisionModel`` / ``CLIPModel`` state dict for open_clip.

    ``proj`` is produced only when the checkpoint has ``visual_projection.weight``
    (``CLIPModel``, ``CLIPVisionModelWithProjection``); a bare ``CLIPVisionModel`` has no
    projection, so the caller keeps θ0's (FusionBench's experts never train it).
    """
    vision, projection = _vision_part(state)
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, Tensor]] = {}
    for key, value in vision.items():
        if key in _IGNORED:
            continue
        if key in _TOP:
            out[_TOP[key]] = value
            continue
        match = _LAYER_KEY.fullmatch(key)
        if match is None:
            raise ConversionError(f"unexpected tensor {key!r} in a CLIP vision checkpoint")
        layer, module, kind = int(match[1]), match[2], match[3]
        qkv_match = _QKV.fullmatch(module)
        if qkv_match:
            qkv.setdefault((layer, kind), {})[qkv_match[1]] = value
        elif module in _LAYER:
            out[f"transformer.resblocks.{layer}.{_LAYER[module]}.{kind}"] = value
        else:
            raise ConversionError(f"unexpected tensor {key!r} in a CLIP vision checkpoint")
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ConversionError(f"layer {layer}: {kind} of q/k/v incomplete ({sorted(parts)})")
        name = "in_proj_weight" if kind == "weight" else "in_proj_bias"
        out[f"transformer.resblocks.{layer}.attn.{name}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]]
        )
    if projection is not None:
        out["proj"] = projection.T.contiguous()
    return out


def complete_from_base(
    converted: Mapping[str, Tensor], base: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """θ0's tensors for what the checkpoint lacks (``proj``), after checking names and shapes."""
    extra = sorted(set(converted) - set(base))
    missing = sorted(set(base) - set(converted) - {"proj"})
    if extra or missing:
        raise ConversionError(
            f"converted checkpoint does not match the backbone: missing {missing[:5]}, "
            f"unexpected {extra[:5]}"
        )
    for key, value in converted.items():
        if value.shape != base[key].shape:
            raise ConversionError(
                f"{key}: shape {tuple(value.shape)} in the checkpoint, "
                f"{tuple(base[key].shape)} in the backbone (wrong model?)"
            )
    return {k: converted[k].to(base[k].dtype) if k in converted else v for k, v in base.items()}
