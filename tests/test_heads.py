"""The frozen cosine head: logits in float32 whatever autocast the encoder runs under."""

from __future__ import annotations

import torch

from atmbench.heads import Classifier, CosineHead


def _head_and_features():
    torch.manual_seed(0)
    # 397 classes whose embeddings lie close together: top-2 logits a few 0.01 apart.
    centre = torch.randn(64)
    head = CosineHead(centre + 0.05 * torch.randn(397, 64), scale=100.0)
    features = centre + 0.05 * torch.randn(256, 64)
    return head, features


def test_logits_are_float32_under_bf16_autocast():
    head, features = _head_and_features()
    expected = 100.0 * torch.nn.functional.normalize(features, dim=-1) @ head.weight.T
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(features.bfloat16())
        # What the head computed before: the same matmul left to autocast gives bf16.
        bf16 = head.scale * torch.nn.functional.normalize(features, dim=-1) @ head.weight.T
    assert logits.dtype == torch.float32
    exact = head(features.bfloat16().float())  # the same bf16 features, outside autocast
    assert torch.equal(logits, exact)
    torch.testing.assert_close(logits, expected, atol=0.05, rtol=0)  # only the input rounding
    assert bf16.dtype == torch.bfloat16
    assert (bf16.float().argmax(-1) != expected.argmax(-1)).any()  # what fp32 logits avoid


def test_classifier_under_autocast_gives_float32_logits():
    head, features = _head_and_features()
    encoder = torch.nn.Linear(64, 64)
    model = Classifier(encoder, head)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model([features, torch.zeros(len(features), dtype=torch.long)])
        encoded = encoder(features)
    assert encoded.dtype == torch.bfloat16 and logits.dtype == torch.float32
    assert torch.equal(logits, head(encoded))  # the head itself ran as outside autocast
