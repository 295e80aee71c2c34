"""Content-checked, atomically written tensor files: the expert and backbone caches.

Every cached entry is a directory holding ``tensors.safetensors`` and ``meta.json``; the
meta records the data file's SHA-256 and size, and is written last, so an entry without a
matching meta is incomplete or corrupt and is recomputed rather than used. Writers hold a
file lock per entry, so concurrent runs compute each entry once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

log = logging.getLogger(__name__)

DATA = "tensors.safetensors"
META = "meta.json"


class CacheCorrupt(RuntimeError):
    """A cache entry exists but its bytes do not match what was written."""


def key_hash(fields: Mapping[str, Any]) -> str:
    """A short stable hash of JSON-able key fields."""
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_entry(directory: Path, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
    """Write tensors then meta, each atomically; the meta's checksum seals the entry."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{DATA}.")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        record = dict(meta, sha256=_sha256(Path(tmp)), size=os.path.getsize(tmp))
        os.replace(tmp, directory / DATA)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _atomic_write_bytes(directory / META, json.dumps(record, indent=1, default=str).encode())


def verify_entry(directory: Path) -> dict[str, Any] | None:
    """The entry's meta if it is complete and intact, ``None`` if absent.

    Raises :class:`CacheCorrupt` when files exist but disagree with the recorded checksum.
    """
    data, meta_path = directory / DATA, directory / META
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise CacheCorrupt(f"{meta_path}: unreadable meta ({exc})") from None
    if not data.exists():
        raise CacheCorrupt(f"{data}: missing")
    if os.path.getsize(data) != meta.get("size") or _sha256(data) != meta.get("sha256"):
        raise CacheCorrupt(f"{data}: size or checksum does not match its meta.json")
    return meta


def load_entry(directory: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(directory / DATA))
    except (SafetensorError, OSError) as exc:
        raise CacheCorrupt(f"{directory / DATA}: {exc}") from None


class EntryCache:
    """A directory of entries keyed by hashed fields, computed at most once each."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def directory(self, fields: Mapping[str, Any]) -> Path:
        parts = [str(fields[k]).replace("/", "_") for k in ("suite", "model") if k in fields]
        return self.root.joinpath(*parts, key_hash(fields))

    def lookup(self, fields: Mapping[str, Any]) -> tuple[Path, dict] | None:
        """(directory, meta) of an intact entry; a corrupt one is removed and reported."""
        directory = self.directory(fields)
        try:
            meta = verify_entry(directory)
        except CacheCorrupt as exc:
            log.warning("corrupt cache entry, recomputing: %s", exc)
            shutil.rmtree(directory, ignore_errors=True)
            return None
        return None if meta is None else (directory, meta)

    def get_or_create(
        self,
        fields: Mapping[str, Any],
        compute: Callable[[], tuple[Mapping[str, Tensor], Mapping[str, Any]]],
    ) -> tuple[Path, dict, bool]:
        """(directory, meta, created): compute and write the entry unless an intact one exists."""
        directory = self.directory(fields)
        directory.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(directory) + ".lock"):
            found = self.lookup(fields)
            if found is not None:
                return (*found, False)
            tensors, meta = compute()
            write_entry(directory, tensors, dict(meta, key=dict(fields)))
            return directory, verify_entry(directory), True
