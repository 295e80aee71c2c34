"""Localize-and-Stitch golden from the official code: ``python localize_stitch_golden.py PATH``.

PATH is a checkout of uiuctml/Localize-and-Stitch at 109d206 (RECIPE.md); ``tox -e
goldens-localize-stitch -- PATH`` installs what it needs. Only ``localize_utils.py`` runs
(``Localizer`` with ``model_type="vit"``, ``train_graft``, ``interpolate_model``, ``Stitcher``):
the modules it imports for datasets, heads and evaluation are replaced by small stand-ins
that do what the originals do to a batch (a dict of images and labels, encoder then head).

Inputs, made here and written to ``localize_stitch_inputs.safetensors`` (seed 0): an MLP
encoder Linear(6, 8), Tanh, Linear(8, 5) θ0 (``base.*``, 0.5·N(0, 1)), three tasks' task
vectors (``tv.<t>.*``, 0.3·N(0, 1)), fixed heads [3, 5] (``head.<t>``) and per task three
batches of 8 inputs ``x.<t>.<b>`` [8, 6] with labels ``y.<t>.<b>`` (a random teacher's
argmax). The batches come in the same order every epoch.
"""

from __future__ import annotations

import sys
import types

import torch
from common import GOLDEN
from safetensors.torch import save_file
from torch import nn

TASKS = ("t0", "t1", "t2")
CONFIGS = {"ls_s01": (0.1, 1e3, 1.0, 5), "ls_s03_dataless": (0.3, 1e3, 1.0, 0)}
"""name -> (sparsity, learning_rate, l1_strength, num_train_epochs); sigmoid_bias 5."""


def make_inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shapes = {"0.weight": (8, 6), "0.bias": (8,), "2.weight": (5, 8), "2.bias": (5,)}
    raw = {f"base.{k}": 0.5 * torch.randn(s, generator=gen) for k, s in shapes.items()}
    for t in TASKS:
        raw |= {f"tv.{t}.{k}": 0.3 * torch.randn(s, generator=gen) for k, s in shapes.items()}
        raw[f"head.{t}"] = torch.randn(3, 5, generator=gen)
        teacher = torch.randn(6, 3, generator=gen)
        for b in range(3):
            x = torch.randn(8, 6, generator=gen)
            raw[f"x.{t}.{b}"], raw[f"y.{t}.{b}"] = x, (x @ teacher).argmax(-1)
    return raw


def encoder(state: dict[str, torch.Tensor]) -> nn.Module:
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5))
    model.load_state_dict(state)
    return model


def head(weight: torch.Tensor) -> nn.Module:
    module = nn.Linear(5, 3, bias=False)
    module.weight.data = weight.clone()
    return module


def stand_ins(heads: dict[str, nn.Module]) -> None:
    """The vision modules localize_utils imports, as small working stand-ins."""
    modules = {
        "vision.src.vision_datasets.common": {
            "maybe_dictionarize": lambda data: {"images": data[0], "labels": data[1]}
        },
        "vision.src.eval": {"eval_single_dataset": None},
        "vision.src.modeling": {"ImageClassifier": lambda enc, hd: nn.Sequential(enc, hd)},
        "vision.src.heads": {"get_classification_head": lambda args, name: heads[name]},
        "vision.src.utils": {"get_logits": lambda x, model: model(x)},
        "evaluate": {},
    }
    for name, attributes in modules.items():
        module = types.ModuleType(name)
        module.__dict__.update(attributes)
        sys.modules[name] = module


def main(repo: str) -> None:
    raw = make_inputs()
    save_file(raw, GOLDEN / "localize_stitch_inputs.safetensors")
    heads = {t: head(raw[f"head.{t}"]) for t in TASKS}
    stand_ins(heads)
    sys.path.insert(0, repo)
    from localize_utils import Localizer, Stitcher

    base = {k[5:]: v for k, v in raw.items() if k.startswith("base.")}
    out = {}
    for name, (sparsity, lr, l1, epochs) in CONFIGS.items():
        graft_args = types.SimpleNamespace(
            sparsity=sparsity,
            sigmoid_bias=5,
            learning_rate=lr,
            l1_strength=l1,
            num_train_epochs=epochs,
        )
        pretrained = encoder(base)
        trainable = dict(pretrained.state_dict())
        masks, finetuned = [], []
        for t in TASKS:
            tuned = encoder({k: v + raw[f"tv.{t}.{k}"] for k, v in base.items()})
            data = [(raw[f"x.{t}.{b}"], raw[f"y.{t}.{b}"]) for b in range(3)]
            localizer = Localizer(
                trainable, encoder(base), pretrained, tuned, t, None, graft_args, model_type="vit"
            )
            if epochs:
                mask, _, _ = localizer.train_graft(data, t)
            else:  # the dataless script: the initial patch, rounded
                mask, _ = localizer.interpolate_model(round_=True, return_mask=True)
            masks.append(mask)
            finetuned.append(tuned)
            for key, m in zip(trainable, mask, strict=True):
                out[f"{name}.mask.{t}.{key}"] = m.float().contiguous()
        stitched = Stitcher(
            trainable, encoder(base), pretrained, finetuned, masks
        ).interpolate_models()
        for key, value in stitched.state_dict().items():
            out[f"{name}.delta.{key}"] = (value - base[key]).detach().float().contiguous()
    save_file(out, GOLDEN / "localize_stitch.safetensors")
    print(f"wrote localize_stitch_inputs.safetensors and localize_stitch.safetensors ({len(out)})")


if __name__ == "__main__":
    main(sys.argv[1])
