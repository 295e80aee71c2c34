"""``atmbench merge``: tiny random Llama and Gemma checkpoints, sharded as the hub shards
them, merged on disk and compared with ``atmbench.merge`` on the same tensors."""

from __future__ import annotations

import json
import time
import weakref
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import atmbench
from atmbench import checkpoints
from atmbench.cli import cli
from atmbench.method import DifferenceTaskVectors

transformers = pytest.importorskip("transformers")

TASKS = ("math", "code", "chat")


def _config(family: str):
    common = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    if family == "llama":
        return transformers.LlamaConfig(**common, tie_word_embeddings=False)
    return transformers.GemmaConfig(**common, head_dim=8)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(63)} | {"<unk>": 63}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def _save(model, folder: Path) -> Path:
    model.save_pretrained(folder, max_shard_size="20KB")
    _tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["llama", "gemma"])
def models(request, tmp_path_factory):
    """A bf16 base and three experts (base plus noise of different scales), each saved
    in shards of 20 KB with a tokenizer."""
    root = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(_config(request.param))
    base = base.to(torch.bfloat16)
    paths = {"base": _save(base, root / "base")}
    for i, task in enumerate(TASKS):
        expert = transformers.AutoModelForCausalLM.from_config(_config(request.param))
        expert.load_state_dict(base.state_dict())
        expert = expert.to(torch.bfloat16)
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(torch.randn_like(p) * 0.02 * (i + 1))
        paths[task] = _save(expert, root / task)
    return paths


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _run(*args: str):
    return CliRunner().invoke(cli, ["merge", *args], catch_exceptions=False)


@pytest.mark.parametrize(
    "spec", ["ta:lam=0.4", "ties:k=0.3", "dare_ties:p=0.5,k=0.5", "breadcrumbs", "tsv"]
)
def test_merged_checkpoint_loads_and_equals_api_merge(models, tmp_path, spec):
    out = tmp_path / "merged"
    experts = ",".join(str(models[t]) for t in TASKS)
    result = _run(spec, "--base", str(models["base"]), "--experts", experts, "--out", str(out),
                  "--seed", "3", "--shard-size", "8KB")  # fmt: skip
    assert result.exit_code == 0, result.output
    files = sorted(out.glob("*.safetensors"))
    assert len(files) > 3  # sharded, at most 8 KB of tensors each (or one bigger tensor)
    index = json.loads((out / checkpoints.INDEX).read_text())
    assert set(index["weight_map"].values()) == {f.name for f in files}

    merged = _tensors(out)
    expected = atmbench.merge(
        spec, _tensors(models["base"]), {t: _tensors(models[t]) for t in TASKS}, seed=3
    )
    assert merged.keys() == expected.keys()
    for key, tensor in expected.items():
        assert merged[key].dtype == tensor.dtype == torch.bfloat16
        assert torch.equal(merged[key], tensor), key

    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    state = model.state_dict()
    for key, tensor in expected.items():
        assert torch.equal(state[key], tensor), key
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer("w1 w2")["input_ids"] == [1, 2]
    record = json.loads((out / "atmbench_merge.json").read_text())
    assert record["seed"] == 3 and list(record["experts"]) == list(TASKS)


def test_ties_tie_break_is_written_over_the_output(tmp_path):
    """A parameter whose experts cancel exactly (+x and -x) leaves its sign to the
    model-wide majority, known only after every parameter is written: the entries are
    rewritten in place, as ``atmbench.merge`` decides them."""
    base = {"a": torch.zeros(4, 8, dtype=torch.bfloat16), "b": torch.ones(16, 8)}
    up = torch.rand(4, 8).to(torch.bfloat16) + 0.5
    experts = {
        "x": {"a": up, "b": base["b"] + 1},
        "y": {"a": -up, "b": base["b"] + 2},
    }
    folders = {}
    for name, state in {"base": base, **experts}.items():
        folders[name] = tmp_path / name
        folders[name].mkdir()
        checkpoints_save(state, folders[name])
    out = tmp_path / "merged"
    result = _run("ties:k=1.0", "--base", str(folders["base"]),
                  "--experts", f"{folders['x']},{folders['y']}", "--out", str(out))  # fmt: skip
    assert result.exit_code == 0, result.output
    merged = _tensors(out)
    expected = atmbench.merge("ties:k=1.0", base, experts)
    # the majority is positive (b), so the tied entries of a take the positive expert
    assert torch.equal(expected["a"], up)
    assert all(torch.equal(merged[k], expected[k]) for k in expected)


def checkpoints_save(state: dict, folder: Path) -> None:
    from safetensors.torch import save_file

    save_file(state, folder / checkpoints.SINGLE, metadata={"format": "pt"})
    (folder / "config.json").write_text("{}")


def test_reader_reads_blocks_of_rows(models):
    reader = checkpoints.CheckpointReader(models["base"])
    whole = _tensors(models["base"])
    for key in reader:
        tensor = whole[key]
        assert torch.equal(reader[key], tensor)
        if tensor.dim() > 1:
            assert torch.equal(reader.rows(key, slice(3, 7)), tensor[3:7])
            assert torch.equal(reader.rows(key, slice(None, None, 5)), tensor[::5])
            assert torch.equal(reader.rows(key, slice(2, 9, 3)), tensor[2:9:3])
        assert reader.rows(key, None).shape == tensor.shape


def test_offline_hub_id_is_one_line(tmp_path, monkeypatch, models):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    started = time.monotonic()
    result = CliRunner().invoke(
        cli,
        [
            "merge",
            "ta",
            "--base",
            "no-such-org/tiny-llama",
            "--experts",
            str(models["math"]),
            "--out",
            str(tmp_path / "m"),
        ],  # fmt: skip
    )
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert "no-such-org/tiny-llama" in lines[0] and "local folder" in lines[0]
    assert time.monotonic() - started < 30
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fisher"], "needs data"),
        (["ties+atm"], "needs training or validation data"),
        (["ta", "--device", "tpu"], "device 'tpu'"),
        (["ta", "--shard-size", "big"], "shard size 'big'"),
        (["ta", "--base", "not a model"], "neither a model folder nor a hub id"),
    ],
)
def test_bad_input_is_one_line(models, tmp_path, args, message):
    base = ["--base", str(models["base"])] if "--base" not in args else []
    result = CliRunner().invoke(
        cli,
        [
            "merge",
            *args,
            *base,
            "--experts",
            str(models["math"]),
            "--out",
            str(tmp_path / "m"),
        ],  # fmt: skip
    )
    assert result.exit_code == 1
    assert message in result.output and len(result.output.strip().splitlines()) == 1


def test_existing_output_is_not_overwritten(models, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = _run("ta", "--base", str(models["base"]), "--experts", str(models["math"]),
                  "--out", str(out))  # fmt: skip
    assert result.exit_code == 1 and "not an empty folder" in result.output
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("spec", ["ta", "ties", "dare_ties", "tsv"])
def test_api_merge_holds_one_tensor_per_task(monkeypatch, spec):
    """``atmbench.merge`` computes task vectors per parameter: at any time the live ones
    are about one parameter per task, not T models."""
    torch.manual_seed(0)
    params = 24
    base = {f"p{i}": torch.randn(64, 32) for i in range(params)}
    experts = {t: {k: v + 0.1 * torch.randn_like(v) for k, v in base.items()} for t in "abc"}
    live: weakref.WeakSet = weakref.WeakSet()
    peak = [0]
    rows = DifferenceTaskVectors.rows

    def counted(self, task, key, which):
        tensor = rows(self, task, key, which)
        live.add(tensor)
        peak[0] = max(peak[0], sum(t.numel() for t in live))
        return tensor

    monkeypatch.setattr(DifferenceTaskVectors, "rows", counted)
    atmbench.merge(spec, base, experts)
    one_per_task = 3 * 64 * 32
    assert 0 < peak[0] <= 2 * one_per_task  # all task vectors would be 24x one_per_task


@pytest.mark.parametrize("spec", ["ta", "ties", "dare_ties"])
def test_checkpoints_are_never_held_whole(models, tmp_path, monkeypatch, spec):
    """What the readers hand out at any time is a few tensors per model, never a model:
    a model larger than memory merges."""
    live: weakref.WeakSet = weakref.WeakSet()
    peak = [0]
    rows = checkpoints.CheckpointReader.rows

    def counted(self, key, which):
        tensor = rows(self, key, which)
        if which is not None:
            live.add(tensor)
            peak[0] = max(peak[0], sum(t.nbytes for t in live))
        return tensor

    monkeypatch.setattr(checkpoints.CheckpointReader, "rows", counted)
    experts = [str(models[t]) for t in TASKS]
    atmbench.api.merge_checkpoints(spec, str(models["base"]), experts, tmp_path / "m")
    largest = max(t.nbytes for t in _tensors(models["base"]).values())
    model = sum(t.nbytes for t in _tensors(models["base"]).values())
    assert model > 8 * largest  # a model of many tensors
    assert 0 < peak[0] <= (len(TASKS) + 2) * largest
