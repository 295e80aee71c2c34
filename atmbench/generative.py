"""Causal language models as task models: teacher-forced loss, greedy generation, exact match.

What the embedded language suite and the LLM suites share. A task's dataset items are four
fixed-length token tensors, so that batches of different tasks stack (``mtl``):

* ``input_ids``: prompt, answer and end-of-sequence token, right-padded;
* ``labels``: the answer's tokens where they are predicted, ``IGNORE`` elsewhere;
* ``prompt``: the prompt alone, left-padded, as generation wants it;
* ``answer``: the reference answer's tokens, right-padded.

Training reads the first two (cross-entropy on the answer tokens only); evaluation
generates greedily from ``prompt`` and compares the decoded text with ``answer``'s; a
method that must not see the answers (test-time adaptation) gets ``prompt`` alone
(:data:`INPUTS`).
Right padding needs no attention mask in a causal model (padding only follows the scored
tokens), which keeps the forward pass a pure function of the tokens: ``torch.func``
differentiates it per example for the Fisher statistic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from atmbench.suite import IGNORE, Batch, TaskModel

Decode = Callable[[Sequence[int]], str]
"""Token ids (without padding and end token) -> text."""
INPUTS = (2,)
"""Positions in an item of the tensors that hold no part of the answer (``prompt``): a
dataset's ``inputs`` attribute, read by :func:`atmbench.adapt.without_labels`."""


def encode_example(
    prompt: Sequence[int],
    answer: Sequence[int],
    lengths: tuple[int, int],
    pad: int,
    eos: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(input_ids, labels, prompt, answer) of one example; ``lengths``: (prompt, answer)."""
    prompt_len, answer_len = lengths
    if len(prompt) > prompt_len or len(answer) + 1 > answer_len:
        raise ValueError(
            f"example of {len(prompt)} prompt and {len(answer)} answer tokens exceeds the "
            f"lengths {lengths} (the answer needs one more for the end token)"
        )
    sequence = [*prompt, *answer, eos]
    total = prompt_len + answer_len
    input_ids = torch.full((total,), pad, dtype=torch.long)
    input_ids[: len(sequence)] = torch.tensor(sequence)
    labels = torch.full((total,), IGNORE, dtype=torch.long)
    labels[len(prompt) : len(sequence)] = torch.tensor([*answer, eos])
    left = torch.full((prompt_len,), pad, dtype=torch.long)
    left[prompt_len - len(prompt) :] = torch.tensor(prompt)
    reference = torch.full((answer_len,), pad, dtype=torch.long)
    reference[: len(answer)] = torch.tensor(answer)
    return input_ids, labels, left, reference


class GenerativeTask(TaskModel):
    """A task answered by a causal LM (``transformers`` ``*ForCausalLM``) with nothing private."""

    def __init__(self, backbone: nn.Module, decode: Decode, pad: int, eos: int):
        super().__init__(backbone)
        self.decode, self.pad, self.eos = decode, pad, eos

    def features(self, batch: Batch) -> Tensor:
        return self.backbone(input_ids=batch[0]).logits

    def logits(self, features: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        """Position i predicts token i + 1."""
        return features[:, :-1].float(), batch[1][:, 1:]

    def unlabeled_features(self, batch: Batch) -> Tensor:
        """Next-token logits [examples, vocabulary] after the prompt, computed as the first
        step of greedy generation (``predict``) computes them: the left-padded prompt under
        its attention mask, positions counted from its first real token."""
        prompt = batch[2]
        mask = (prompt != self.pad).long()
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        out = self.backbone(input_ids=prompt, attention_mask=mask, position_ids=positions)
        return out.logits[:, -1]

    def prediction_logits(self, features: Tensor, batch: Batch) -> Tensor:
        """The first answer token's distribution, from the prompt alone.

        A generated answer is a sequence, and its entropy has no closed form; its first
        token is the one prediction the prompt alone determines, the one every later token
        conditions on, and costs one forward pass of the prompt. FusionBench's AdaMerging
        for Flan-T5 reads the same position (the decoder's first step). Later positions
        would need the model's own greedy answer, regenerated under every new merge.
        """
        return features.float()

    def _text(self, ids: Tensor) -> str:
        tokens = []
        for token in ids.tolist():
            if token in (self.eos, self.pad):
                break
            tokens.append(token)
        return self.decode(tokens)

    @torch.no_grad()
    def predict(self, batch: Batch) -> tuple[list[str], list[str]]:
        """Greedy generation from the left-padded prompts, cut at the end token."""
        prompt, answer = batch[2], batch[3]
        out = self.backbone.generate(
            input_ids=prompt,
            attention_mask=(prompt != self.pad).long(),
            max_new_tokens=answer.shape[1],
            do_sample=False,
            pad_token_id=self.pad,
            eos_token_id=self.eos,
        )
        generated = out[:, prompt.shape[1] :]
        return [self._text(g) for g in generated], [self._text(a) for a in answer]
