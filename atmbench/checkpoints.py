"""Hugging Face checkpoints on disk, read and written one tensor (or block of rows) at a time.

Why not ``safetensors.safe_open``: it maps each file into memory, and every page a merge
touches then counts in the process's resident memory until the file is closed, so merging
five 2.5 GB models showed 12 GB resident although the merge held a few hundred MB. Here a
tensor (or a block of its leading rows, which are contiguous bytes in the file) is read
with ``preadv`` into memory of its own, freed when the caller drops it; the page cache
still serves repeated reads. The output is laid out ahead (every shard's header is known
from the base's shapes and dtypes), so each merged tensor is written at its place as soon
as it is computed: memory stays at one tensor whatever the shard size.

The format is safetensors' documented one: an 8-byte little-endian header length, a JSON
header mapping names to ``dtype``, ``shape`` and ``data_offsets`` (relative to the data,
which follows the header), then the raw little-endian bytes; files written here load with
``safetensors`` and ``transformers``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
"""Files that hold weights: not copied from the base next to the merged ones."""
NOT_COPIED = ("README.md", ".gitattributes")

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_CHUNK = 1 << 30
"""Bytes per read or write call (Linux moves at most ~2 GiB per call)."""
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+(@[\w./-]+)?$")


class CheckpointError(ValueError):
    """A model folder or hub id that cannot be read, or an output that cannot be written."""


@dataclass(frozen=True)
class Entry:
    """Where one tensor lies: its file, dtype, shape and absolute byte range."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    stop: int


def read_header(path: Path) -> dict[str, Entry]:
    """The tensors of one safetensors file, in the order of their bytes."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except (OSError, struct.error, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    header.pop("__metadata__", None)
    entries = {}
    for name, info in header.items():
        if info["dtype"] not in _DTYPES:
            raise CheckpointError(
                f"{path}: tensor {name!r} has dtype {info['dtype']!r} "
                f"(readable: {', '.join(_DTYPES)})"
            )
        begin, end = info["data_offsets"]
        dtype, shape = _DTYPES[info["dtype"]], tuple(info["shape"])
        entries[name] = Entry(path, dtype, shape, 8 + length + begin, 8 + length + end)
    return dict(sorted(entries.items(), key=lambda item: item[1].start))


def _read_into(path: Path, offset: int, out: Tensor, stride: int = 0) -> None:
    """Fill ``out`` from the file's bytes at ``offset``; with a ``stride`` (bytes), row i
    of ``out`` from ``offset + i * stride`` (strided rows: one read per row)."""
    view = memoryview(out.view(-1).view(torch.uint8).numpy())
    pieces = [(0, len(view))]
    if stride and out.shape[0]:
        size = len(view) // out.shape[0]
        pieces = [(i * size, size) for i in range(out.shape[0])]
    fd = os.open(path, os.O_RDONLY)
    try:
        for i, (begin, size) in enumerate(pieces):
            at = offset + (i * stride if stride else 0)
            done = 0
            while done < size:
                part = view[begin + done : begin + min(size, done + _CHUNK)]
                count = os.preadv(fd, [part], at + done)
                if count <= 0:
                    raise CheckpointError(f"{path}: truncated at byte {at + done}")
                done += count
    finally:
        os.close(fd)


class CheckpointReader(Mapping[str, Tensor]):
    """A model folder's tensors by name, each read from disk when asked (never all at once).

    ``reader[key]`` reads a whole tensor (the last one is kept: a merge asks for the base's
    parameter more than once), ``reader.rows(key, rows)`` only a block of leading rows.
    Tensors are moved to ``device`` after reading.
    """

    def __init__(self, folder: Path, device: torch.device | str = "cpu"):
        self.folder = Path(folder)
        self.device = torch.device(device)
        self.entries = _entries(self.folder)
        self._last: tuple[str, Tensor] | None = None

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: object) -> bool:
        return key in self.entries  # Mapping's default would read the tensor

    def __getitem__(self, key: str) -> Tensor:
        last = self._last  # one read of the cache: a read-ahead thread may replace it
        if last is None or last[0] != key:
            self._last = None  # the previous tensor is freed before the next is read
            last = self._last = (key, self.rows(key, ...))
        return last[1]

    def rows(self, key: str, rows: Any) -> Tensor:
        """Rows ``rows`` (a slice of leading rows, ``...`` for all, ``None`` for a ``meta``
        tensor with just the shape and dtype) of tensor ``key``."""
        entry = self.entries[key]
        if rows is None:
            return torch.empty(entry.shape, dtype=entry.dtype, device="meta")
        shape, start, stride = entry.shape, entry.start, 0
        if isinstance(rows, slice) and shape:
            first, last, step = rows.indices(shape[0])
            if step < 1:
                raise ValueError(f"rows {rows!r}: only increasing slices are read")
            row_bytes = (entry.stop - entry.start) // max(1, shape[0])
            start += first * row_bytes
            shape = (len(range(first, last, step)), *shape[1:])
            stride = row_bytes * step if step > 1 else 0  # a sample of rows: only those
        elif rows is not ...:
            raise TypeError(f"rows must be a slice, ... or None, not {rows!r}")
        tensor = torch.empty(shape, dtype=entry.dtype)
        if tensor.numel():
            _read_into(entry.path, start, tensor, stride)
        return tensor.to(self.device)


def _entries(folder: Path) -> dict[str, Entry]:
    index, single = folder / INDEX, folder / SINGLE
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{index}: not a safetensors index ({exc})") from None
        entries: dict[str, Entry] = {}
        for name in files:
            entries.update(read_header(folder / name))
        return entries
    if single.is_file():
        return read_header(single)
    raise CheckpointError(
        f"{folder}: no {SINGLE} or {INDEX} (only safetensors checkpoints are read)"
    )


def resolve(model: str, cache_dir: Path | None = None) -> Path:
    """A local model folder, or a hub id (``ORG/NAME[@REVISION]``) downloaded through
    ``huggingface_hub.snapshot_download`` (weights as safetensors, configs, tokenizer)."""
    if Path(model).is_dir():
        return Path(model)
    if not _HUB_ID.match(model):
        raise CheckpointError(f"{model!r} is neither a model folder nor a hub id (ORG/NAME)")
    from huggingface_hub import snapshot_download

    repo, _, revision = model.partition("@")
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
    try:
        return Path(
            snapshot_download(
                repo, revision=revision or None, allow_patterns=patterns, cache_dir=cache_dir
            )
        )
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, auth: one line each
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(
            f"model {model!r}: not in the local hub cache and not downloadable "
            f"({type(exc).__name__}: {reason[:200]}); pass a local folder, or run once "
            "with network access to cache it"
        ) from None


def _shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _write_from(fd: int, offset: int, tensor: Tensor) -> None:
    view = memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(view):
        done += os.pwritev(fd, [view[done : done + _CHUNK]], offset + done)


class CheckpointWriter:
    """Sharded safetensors output laid out ahead from ``layout`` (name -> (dtype, shape),
    in writing order): shards of at most ``shard_bytes`` of tensor data (a bigger tensor
    gets a shard of its own), headers written first, each tensor at its place when
    :meth:`write` gets it, the index (for several shards) at :meth:`close`."""

    def __init__(
        self,
        folder: Path,
        layout: Mapping[str, tuple[torch.dtype, Sequence[int]]],
        shard_bytes: int,
        metadata: Mapping[str, str] | None = None,
    ):
        self.folder = Path(folder)
        groups: list[list[str]] = [[]]
        size = 0
        for name, (dtype, shape) in layout.items():
            nbytes = math.prod(shape) * dtype.itemsize
            if groups[-1] and size + nbytes > shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(name)
            size += nbytes
        self.layout = {name: (dtype, tuple(shape)) for name, (dtype, shape) in layout.items()}
        self.files = [self.folder / name for name in _shard_names(len(groups))]
        self.places: dict[str, tuple[int, int]] = {}  # name -> (shard, absolute offset)
        self._fds: list[int] = []
        self.total = 0
        self.folder.mkdir(parents=True, exist_ok=True)
        for shard, (names, path) in enumerate(zip(groups, self.files, strict=True)):
            header: dict[str, Any] = {"__metadata__": dict(metadata or {}, format="pt")}
            begin = 0
            for name in names:
                dtype, shape = self.layout[name]
                end = begin + math.prod(shape) * dtype.itemsize
                header[name] = {
                    "dtype": _NAMES[dtype],
                    "shape": list(shape),
                    "data_offsets": [begin, end],
                }
                begin = end
            text = json.dumps(header, separators=(",", ":")).encode()
            text += b" " * (-len(text) % 8)  # 8-byte aligned data, as safetensors writes it
            data = 8 + len(text)
            for name in names:
                self.places[name] = (shard, data + header[name]["data_offsets"][0])
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            os.pwrite(fd, struct.pack("<Q", len(text)) + text, 0)
            os.ftruncate(fd, data + begin)
            self.total += begin
        self._written: set[str] = set()

    def write(self, name: str, tensor: Tensor) -> None:
        """Write tensor ``name`` (dtype and shape as laid out) at its place."""
        dtype, shape = self.layout[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise CheckpointError(
                f"tensor {name!r}: got {tensor.dtype} {tuple(tensor.shape)}, the layout "
                f"has {dtype} {shape}"
            )
        shard, offset = self.places[name]
        _write_from(self._fds[shard], offset, tensor.detach().cpu())
        self._written.add(name)

    def read(self, name: str) -> Tensor:
        """Tensor ``name`` as written (to edit a few entries and write it again)."""
        dtype, shape = self.layout[name]
        shard, offset = self.places[name]
        tensor = torch.empty(shape, dtype=dtype)
        if tensor.numel():
            _read_into(self.files[shard], offset, tensor)
        return tensor

    def abort(self) -> None:
        """Close the shards of a merge that failed (they stay, incomplete)."""
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def close(self) -> list[Path]:
        """Check every tensor was written, close the shards, write the index; the files."""
        missing = sorted(set(self.layout) - self._written)
        self.abort()
        if missing:
            raise CheckpointError(f"{len(missing)} tensor(s) never written, e.g. {missing[:3]}")
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": self.total},
                "weight_map": {n: self.files[s].name for n, (s, _) in self.places.items()},
            }
            (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return list(self.files)


def copy_extras(source: Path, target: Path) -> list[str]:
    """Copy a model folder's other top-level files (config, tokenizer, generation config)
    next to merged weights; weights, their indexes, READMEs and hidden files stay."""
    copied = []
    for path in sorted(Path(source).iterdir()):
        name = path.name
        weights = name.endswith(WEIGHTS) or name.endswith(".index.json")
        if path.is_file() and not weights and name not in NOT_COPIED and name[0] != ".":
            shutil.copyfile(path, Path(target) / name)
            copied.append(name)
    return copied


def parse_size(text: str) -> int:
    """``"2GB"``, ``"500MB"``, ``"1.5G"``, ``"4096"`` -> bytes (decimal units, as mergekit
    and transformers read them)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)[bB]?\s*", text)
    if not match:
        raise CheckpointError(f"shard size {text!r} is not a size such as 2GB, 500MB or 4096")
    number, unit = float(match.group(1)), match.group(2).upper()
    size = int(number * 1000 ** " KMGT".index(unit or " "))
    if size <= 0:
        raise CheckpointError(f"shard size {text!r} must be positive")
    return size
