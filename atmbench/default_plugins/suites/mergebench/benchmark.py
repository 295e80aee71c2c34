"""``mergebench5`` loaded for one base model: θ0 in bf16, the domains' data, lm-eval scores."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from atmbench.cache import key_hash
from atmbench.default_plugins.suites.glue.data import GlueItems, PadCollate
from atmbench.default_plugins.suites.glue.models import load_canonical
from atmbench.default_plugins.suites.mergebench import lmeval
from atmbench.default_plugins.suites.mergebench.domains import DOMAINS, Domain, prompt, recipe
from atmbench.default_plugins.suites.vision.data import validation_split
from atmbench.evaluate import score
from atmbench.finetune import Recipe, state_on_cpu
from atmbench.generative import GenerativeTask
from atmbench.metrics import ACCURACY, Metric
from atmbench.suite import IGNORE, Batch, SuiteDataError, blocks_of

SUITE = "mergebench5"
VERSION = "1"
"""Bump when data handling, prompts, evaluation tasks or recipes change."""
BASES = ("Llama-3.2-3B", "Llama-3.1-8B", "gemma-2-2b", "gemma-2-9b")
MODELS: dict[str, str] = {
    **{f"{b}{s}": f"meta-llama/{b}{s}" for b in BASES[:2] for s in ("", "-Instruct")},
    **{f"{b}{s}": f"google/{b}{s}" for b in BASES[2:] for s in ("", "-it")},
}
"""MergeBench's eight base models (``merging/main.py``), name -> hub id."""
MAX_LENGTH = 2048
"""Tokens of an example kept for training and validation (MergeBench's ``max_length``)."""
EVAL_BATCH = 8
"""lm-eval's batch size (MergeBench's ``scripts/evaluate.sh`` uses 16 or 8)."""
TOKEN_ACCURACY = Metric("token_accuracy", ACCURACY.fn)


def fetch_command(suite: str, model: str) -> str:
    return f"atmbench download --suite {suite} --model {model}"


def source(model: str) -> str:
    """Hub id of a known model, or a local ``transformers`` checkpoint folder."""
    if model in MODELS:
        return MODELS[model]
    if (Path(model) / "config.json").is_file():
        return model
    raise ValueError(
        f"unknown model {model!r} for {SUITE} (valid: {', '.join(MODELS)}, or a folder "
        "holding a transformers causal-LM checkpoint)"
    )


class InstructionTask(GenerativeTask):
    """A domain's causal-LM task: trained on the response tokens; validated by teacher-forced
    next-token accuracy on them (the test score comes from lm-eval, not from here)."""

    @torch.no_grad()
    def predict(self, batch: Batch) -> tuple[Tensor, Tensor]:
        logits, labels = self(batch)
        scored = labels != IGNORE
        return logits.argmax(-1)[scored], labels[scored]


class MergeBenchmark:
    """MergeBench's domains for one base model on one device.

    ``domains``, ``evals`` (domain -> lm-eval tasks and result keys), ``include_path``
    (a folder of lm-eval task YAMLs), ``data`` (a folder of ``<domain>.jsonl`` files in
    the hub datasets' columns), ``recipes``, ``max_length``, ``limit`` (examples per
    lm-eval task) and ``batch_size`` (lm-eval's; validation runs one example at a time,
    since a batch of 2,048-token examples' logits over a 256k vocabulary is gigabytes)
    exist for tests and smaller studies.
    """

    def __init__(
        self,
        model: str,
        home: Path,
        device: torch.device,
        *,
        suite: str = SUITE,
        domains: Sequence[str] | None = None,
        evals: Mapping[str, Sequence[tuple[str, str | None]]] | None = None,
        include_path: Path | None = None,
        data: Path | None = None,
        recipes: Mapping[str, Recipe] | None = None,
        max_length: int = MAX_LENGTH,
        limit: int | None = None,
        batch_size: int = EVAL_BATCH,
        dtype: torch.dtype = torch.bfloat16,
    ):
        self.suite, self.model, self.device, self.home = suite, model, device, Path(home)
        self.num_workers = 0
        self.source = source(model)
        self.tasks = tuple(domains or DOMAINS)
        unknown = [t for t in self.tasks if t not in DOMAINS]
        if unknown:
            raise ValueError(f"unknown MergeBench domains {unknown} (valid: {', '.join(DOMAINS)})")
        lmeval.check_installed()
        self.evals = {t: tuple(DOMAINS[t].evals) for t in self.tasks} | dict(evals or {})
        self.include_path, self.limit, self.batch_size = include_path, limit, batch_size
        self.max_length, self.dtype = max_length, dtype
        self._recipes = {t: recipe(DOMAINS[t]) for t in self.tasks} | dict(recipes or {})
        self.command = fetch_command(suite, model)
        self.tokenizer, self._config, self._base = self._pretrained()
        self._rows = {t: self._data(DOMAINS[t], data) for t in self.tasks}
        self._split = {t: validation_split(len(self._rows[t])) for t in self.tasks}
        pad = self.tokenizer.pad_token_id
        self._collate = PadCollate((self.tokenizer.eos_token_id if pad is None else pad, IGNORE))
        identity = {"source": self.source, "data": str(data), "max_length": max_length}
        self.fingerprint = f"{suite}-v{VERSION}-{key_hash(identity)}"

    # -- loading --------------------------------------------------------------------------

    def _pretrained(self) -> tuple[Any, Any, dict[str, Tensor]]:
        import transformers

        cache = str(self.home / "hf")
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(self.source, cache_dir=cache)
            model = transformers.AutoModelForCausalLM.from_pretrained(
                self.source, cache_dir=cache, dtype=self.dtype
            )
        except (OSError, ValueError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise SuiteDataError(
                f"{self.source} is not in {cache} and could not be downloaded "
                f"({type(exc).__name__}: {first}); fetch it with: {self.command} (gated "
                "models need a hub token: hf auth login)"
            ) from None
        return tokenizer, model.config, state_on_cpu(model)

    def _data(self, domain: Domain, folder: Path | None) -> Any:
        from datasets import load_dataset

        try:
            if folder is not None:
                path = str(Path(folder) / f"{domain.name}.jsonl")
                return load_dataset("json", data_files=path, split="train")
            cache = str(self.home / "datasets" / "mergebench")
            return load_dataset(domain.data, split="train", cache_dir=cache)
        except (OSError, ValueError, ConnectionError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else ""
            where = folder or domain.data
            raise SuiteDataError(
                f"{SUITE}: the {domain.name} data ({where}) could not be loaded "
                f"({type(exc).__name__}: {first}); fetch it with: {self.command}"
            ) from None

    # -- the suite contract ---------------------------------------------------------------

    def base_state(self) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in self._base.items()}

    def backbone(self, state: dict[str, Tensor] | None = None) -> nn.Module:
        """The causal LM holding ``state`` in the state's dtype; θ0 in float32 when ``None``.

        Merged models are bf16 like θ0 and are evaluated so. Training starts from a float32
        copy: fine-tuning our own experts and the multi-task model (``backbone()``), and ATM
        (which hands over a float32 state), train float32 master weights under the
        trainer's bf16 autocast, since AdamW steps of 1e-5 on bf16 weights mostly round
        away. Gradient checkpointing is on (it acts in training mode only).
        """
        import transformers

        dtype = torch.float32 if state is None else None
        state = self._base if state is None else state
        floats = [v.dtype for v in state.values() if v.is_floating_point()]
        dtype = dtype or (floats[0] if floats else self.dtype)
        with torch.device(self.device):
            module = transformers.AutoModelForCausalLM.from_config(self._config, dtype=dtype)
        load_canonical(module, state)
        checkpointing = getattr(module, "activation_checkpointing_enable", None)
        (checkpointing or module.gradient_checkpointing_enable)()  # renamed in transformers 5
        return module.eval()

    def task_model(
        self, task: str, backbone: nn.Module, private: dict[str, Tensor] | None = None
    ) -> InstructionTask:
        return InstructionTask(backbone, self.tokenizer.decode, 0, self.tokenizer.eos_token_id)

    def dataset(self, task: str, split: str) -> GlueItems:
        """Train and validation: the domain's instruction data, 10% held out to validate.

        The test split is scored by lm-eval (:meth:`score`); there are no test items.
        """
        if split not in ("train", "val"):
            raise ValueError(
                f"{SUITE} has no {split!r} items: its test score comes from lm-evaluation-"
                "harness, and methods that read test inputs (adamerging) do not apply"
            )
        train, val = self._split[task]
        return GlueItems(
            self._rows[task], train if split == "train" else val, self._encoder(task), self._collate
        )

    def recipe(self, task: str) -> Recipe:
        return self._recipes.get(task, recipe(DOMAINS["instruction"]))

    def metrics(self, task: str) -> tuple[Metric, ...]:
        return (TOKEN_ACCURACY,)

    def residual_blocks(self, backbone: nn.Module) -> list[str]:
        """The decoder layers (``model.layers`` in Llama, Gemma, Qwen and Mistral)."""
        return blocks_of(backbone, f"{backbone.base_model_prefix}.layers")

    def score(self, task: str, split: str, model: GenerativeTask) -> dict[str, float]:
        """``score`` (stored and ranked) first, then each lm-eval task's score on test.

        Validation: token accuracy on held-out domain data; test: the mean of the domain's
        lm-eval task scores on ``model``'s causal LM, as it is in memory.
        """
        if split != "test":
            data = self.dataset(task, split)
            return {"score": score(model, data, self.metrics(task), batch_size=1)}
        scores = lmeval.evaluate(
            model.backbone,
            self.tokenizer,
            self.evals[task],
            self.command,
            self.include_path,
            batch_size=self.batch_size,
            limit=self.limit,
        )
        return {"score": sum(scores.values()) / len(scores), **scores}

    def import_experts(self, source: str) -> Mapping[str, dict[str, Tensor]]:
        """MergeBench's published experts (see :mod:`.experts`), one loaded at a time."""
        from atmbench.default_plugins.suites.mergebench.experts import Published

        return Published(source, self.source, self.tasks, self._base, self.home / "hub")

    # -- encoding -------------------------------------------------------------------------

    def _encoder(self, task: str):
        domain, tokenizer, limit = DOMAINS[task], self.tokenizer, self.max_length
        eos = tokenizer.eos_token_id

        def encode(row: dict) -> tuple[Tensor, Tensor]:
            context = tokenizer(prompt(domain, row))["input_ids"]
            answer = tokenizer(str(row[domain.response]), add_special_tokens=False)["input_ids"]
            ids = [*context, *answer, eos][:limit]
            labels = ([IGNORE] * len(context) + [*answer, eos])[:limit]
            return torch.tensor(ids), torch.tensor(labels)

        return encode
