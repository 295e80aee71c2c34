"""What bf16 logits would cost: digits8 test accuracy with the head's matmul in bf16 vs fp32.

On a GPU the encoder runs under bf16 autocast. Before vision suite version 2 the head's
matmul ran under it too (CLIP's logit scale 100 applied first, so logits were spaced 0.125
to 0.25 apart); now :class:`atmbench.heads.CosineHead` computes them in float32. This
script takes the same bf16-autocast features (CPU autocast, so it runs anywhere) and scores
them both ways, for the pretrained encoder, each expert on its own task and a Task
Arithmetic merge (λ = 0.3), and prints the accuracy difference and how many test
predictions change. digits8 itself runs in fp32 on the CPU, so its published numbers are
untouched either way.

    ATMBENCH_HOME=/tmp/h python scripts/logit_precision.py [--seed 0]

Experts come from the cache of ``atmbench run --suite digits8`` (trained if absent).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from atmbench import config, registry, runner


@torch.no_grad()
def predictions(bench, state, task: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fp32-logit predictions, bf16-logit predictions, labels) on the test split."""
    encoder, head = bench.encoder(state).eval(), bench.head(task)
    fp32, bf16, labels = [], [], []
    for images, y in DataLoader(bench.dataset(task, "test"), batch_size=512):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = encoder(images)
            fp32.append(head(features).argmax(-1))  # the head leaves autocast: float32
            # The previous head: the same arithmetic, its matmul left to autocast (bf16).
            normed = nn.functional.normalize(features.float(), dim=-1)
            bf16.append((head.scale * normed @ head.weight.T).argmax(-1))
        labels.append(y)
    return torch.cat(fp32), torch.cat(bf16), torch.cat(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    suite = registry.get_suite("digits8")
    ws = runner.Workspace(Path(config.home()), torch.device("cpu"), progress=False)
    bench = ws.benchmark(suite.name, suite.models[0])
    experts, base = ws.experts(bench, args.seed), bench.base_state()
    vectors = experts.vectors()
    merged = {k: v + 0.3 * vectors.stacked(k).sum(0) for k, v in base.items()}
    models = {"pretrained": lambda t: base, "expert": lambda t: experts.state(t, base)}
    models["ta (λ=0.3)"] = lambda t: merged
    print(f"digits8 / {bench.model}, seed {args.seed}, test split, bf16-autocast encoder (CPU)")
    print("| model | task | n | acc fp32 logits | acc bf16 logits | Δ (pp) | changed |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, state_of in models.items():
        total = [0, 0, 0, 0]
        for task in bench.tasks:
            fp32, bf16, labels = predictions(bench, state_of(task), task)
            n, a32, a16 = len(labels), (fp32 == labels).sum(), (bf16 == labels).sum()
            changed = int((fp32 != bf16).sum())
            total = [total[0] + n, total[1] + int(a32), total[2] + int(a16), total[3] + changed]
            print(
                f"| {name} | {task} | {n} | {100 * a32 / n:.2f} | {100 * a16 / n:.2f} "
                f"| {100 * (a16 - a32) / n:+.2f} | {changed} |"
            )
        n, a32, a16, changed = total
        print(
            f"| {name} | all | {n} | {100 * a32 / n:.2f} | {100 * a16 / n:.2f} "
            f"| {100 * (a16 - a32) / n:+.2f} | {changed} |"
        )


if __name__ == "__main__":
    main()
