"""Causal language models as task models: teacher-forced loss, greedy generation, exact match.

What the embedded language suite and the LLM suites share. A task's dataset items are four
fixed-length token tensors, so that batches of different tasks stack (``mtl``):

* ``input_ids``: prompt, answer and end-of-sequence token, right-padded;
* ``labels``: the answer's tokens where they are predicted, ``IGNORE`` elsewhere;
* ``prompt``: the prompt alone, left-padded, as generation wants it;
* ``answer``: the reference answer's tokens, right-padded.

Training reads the first two (cross-entropy on the answer tokens only); evaluation
generates greedily from ``prompt`` and compares the decoded text with ``answer``'s.
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
