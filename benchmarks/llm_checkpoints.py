"""Random bf16 checkpoints shaped like Llama-3.2-1B (1.24 B parameters, tied embeddings):
a base and experts (base plus noise), written as sharded safetensors with an index and a
``config.json``, as the hub serves models. For the mergekit comparison
(``test_mergekit_llm.py``); the values are random, only shapes, dtypes and layout matter.

    python benchmarks/llm_checkpoints.py /work/bench-llm      # base + 4 experts, ~12 GB
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

LAYERS, HIDDEN, INTERMEDIATE, VOCAB, HEADS, KV_HEADS = 16, 2048, 8192, 128256, 32, 8
SHARD_BYTES = 1_000_000_000
EXPERTS = ("expert1", "expert2", "expert3", "expert4")
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": HIDDEN,
    "intermediate_size": INTERMEDIATE,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "head_dim": HIDDEN // HEADS,
    "vocab_size": VOCAB,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "hidden_act": "silu",
}


def shapes() -> dict[str, tuple[int, ...]]:
    """Llama-3.2-1B's tensor names and shapes (no lm_head: it is tied to the embeddings)."""
    kv = HIDDEN // HEADS * KV_HEADS
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out |= {
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
            p + "self_attn.k_proj.weight": (kv, HIDDEN),
            p + "self_attn.v_proj.weight": (kv, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
            p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
        }
    out["model.norm.weight"] = (HIDDEN,)
    return out


def _tensor(name: str, shape: tuple[int, ...], model: int) -> torch.Tensor:
    """The base's tensor (model 0), or an expert's: the base plus noise of its own seed.
    Regenerated from seeds, so no model is ever held whole."""
    base_seed = sum(map(ord, name)) * 7919
    generator = torch.Generator().manual_seed(base_seed)
    if len(shape) == 1:
        value = 1.0 + 0.05 * torch.randn(shape, generator=generator)
    else:
        value = 0.02 * torch.randn(shape, generator=generator)
    if model:
        generator.manual_seed(base_seed + model)
        value += 0.002 * model * torch.randn(shape, generator=generator)
    return value.to(torch.bfloat16)


def write(folder: Path, model: int) -> None:
    """Model ``model`` (0 = base) in shards of about 1 GB, with its index and config."""
    folder.mkdir(parents=True, exist_ok=True)
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes().items():
        nbytes = 2 * torch.Size(shape).numel()
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map, total = {}, 0
    for i, names in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {n: _tensor(n, shapes()[n], model) for n in names}
        total += sum(t.numel() * 2 for t in shard.values())
        save_file(shard, folder / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(names, file)
        del shard
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(CONFIG, indent=2))


def ensure(root: Path) -> dict[str, Path]:
    """The base and experts under ``root``, written once (a model is complete when its
    index exists: it is written last)."""
    folders = {"base": root / "base"} | {e: root / e for e in EXPERTS}
    for model, folder in enumerate(folders.values()):
        if not (folder / "model.safetensors.index.json").exists():
            write(folder, model)
    return folders


if __name__ == "__main__":
    for name, folder in ensure(Path(sys.argv[1])).items():
        print(name, folder)
