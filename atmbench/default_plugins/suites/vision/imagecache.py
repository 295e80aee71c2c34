"""The decoded-image cache: every (task, split, resize) decoded and resized once, memory-mapped.

Decoding and resizing JPEGs on the CPU is what bounds the vision suites on a GPU (about 120
images/s per loader worker against the 15,000 images/s ViT-B-32's forward pass manages on
an H100). So each split of a task is decoded once, through open_clip's own resize and
centre crop, into one ``uint8`` array of ``N x 3 x S x S`` that every later cell, seed,
method and run memory-maps; normalisation and augmentation happen on the device
(:mod:`.batches`). The cache is keyed by the dataset's fingerprint, the geometric steps
(their ``repr``: size, interpolation, antialiasing) and Pillow's version, not by the
model: every open_clip model at 224 px reads the same arrays.

Layout: ``$ATMBENCH_HOME/image-cache/<task>/<split>-<key hash>/`` holding ``images.u8``
(raw bytes) and ``meta.json`` (key, shape, size and the SHA-256 of each ``CHUNK`` bytes).
An entry is built in a scratch directory next to it and renamed into place only once
complete (a build killed half-way leaves a scratch directory that is never read and is
removed by the next build), under a file lock, so concurrent runs build it once. An entry
whose bytes disagree with its meta is rebuilt with a warning; checksums are verified once
per process, in parallel threads (``hashlib`` releases the GIL).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

from atmbench.cache import CacheCorrupt, key_hash

log = logging.getLogger(__name__)

VERSION = 1
"""Bump when what is stored changes: it is part of every entry's key."""
IMAGES, META = "images.u8", "meta.json"
CHUNK = 1 << 26
"""Bytes per checksum (64 MiB): chunks are verified in parallel."""
BUILD_BATCH = 256
"""Images one decoding thread takes at a time while building."""
_verified: set[tuple[str, int, int]] = set()
"""(path, size, mtime) of image files verified by this process."""


@dataclass(frozen=True)
class Resize:
    """The geometric steps of an open_clip eval transform, applied to RGB images on the CPU."""

    size: int
    steps: tuple[Any, ...]
    """torchvision transforms (``Resize``, ``CenterCrop``) whose output is ``size x size``."""

    def __call__(self, image: Any) -> np.ndarray:
        for step in self.steps:
            image = step(image)
        array = np.asarray(image, dtype=np.uint8)
        if array.shape != (self.size, self.size, 3):
            raise ValueError(f"resize produced {array.shape}, expected {(self.size, self.size, 3)}")
        return array.transpose(2, 0, 1)

    def describe(self) -> list[str]:
        return [repr(step) for step in self.steps]


def decode(value: dict, feature: Any) -> Any:
    """One stored image (``{"bytes", "path"}``) to an RGB PIL image: the only decode."""
    return feature.decode_example(value).convert("RGB")


class _Decoded:
    """Rows of a hub dataset decoded and resized to ``uint8`` arrays, one at a time."""

    def __init__(self, rows: Any, resize: Resize):
        from datasets import Image

        self.feature = rows.features["image"]
        self.rows = rows.cast_column("image", Image(decode=False))
        self.resize = resize

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.resize(decode(self.rows[i]["image"], self.feature))


def _chunk_digests(path: Path, size: int) -> list[str]:
    def digest(start: int) -> str:
        with open(path, "rb") as f:
            f.seek(start)
            return hashlib.sha256(f.read(min(CHUNK, size - start))).hexdigest()

    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        return list(pool.map(digest, range(0, size, CHUNK)))


def _verify(directory: Path) -> dict | None:
    """The entry's meta if complete and intact, ``None`` if absent; else :class:`CacheCorrupt`."""
    meta_path, images = directory / META, directory / IMAGES
    if not directory.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise CacheCorrupt(f"{meta_path}: unreadable meta ({exc})") from None
    if not images.exists():
        raise CacheCorrupt(f"{images}: missing")
    stat = images.stat()
    stamp = (str(images), stat.st_size, stat.st_mtime_ns)
    if stamp in _verified:
        return meta
    if stat.st_size != meta.get("size") or _chunk_digests(images, stat.st_size) != meta.get(
        "sha256"
    ):
        raise CacheCorrupt(f"{images}: size or checksum does not match its {META}")
    _verified.add(stamp)
    return meta


@dataclass(frozen=True)
class Entry:
    """A verified cache entry: open it with :meth:`array`."""

    directory: Path
    shape: tuple[int, ...]

    def array(self) -> np.ndarray:
        """The images as a read-only memory map, ``N x 3 x S x S``."""
        if self.shape[0] == 0:
            return np.zeros(self.shape, dtype=np.uint8)
        return np.memmap(self.directory / IMAGES, dtype=np.uint8, mode="r", shape=self.shape)


def _fill(path: Path, rows: Any, resize: Resize, workers: int) -> tuple[int, ...]:
    shape = (len(rows), 3, resize.size, resize.size)
    if len(rows) == 0:
        path.touch()
        return shape
    out = np.memmap(path, dtype=np.uint8, mode="w+", shape=shape)
    decoded = _Decoded(rows, resize)

    def fill(start: int) -> None:
        for i in range(start, min(len(rows), start + BUILD_BATCH)):
            out[i] = decoded[i]

    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(fill, range(0, len(rows), BUILD_BATCH)))
    out.flush()
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return shape


def ensure(
    root: Path,
    task: str,
    split: str,
    rows: Any,
    resize: Resize,
    workers: int = 0,
    progress: Callable[[str], None] | None = None,
) -> Entry:
    """The cache entry of ``rows`` (one split of ``task``) under ``resize``, built if missing.

    ``workers`` threads decode side by side (Pillow releases the GIL while it decodes and
    resizes, and threads work inside a multi-gpu worker, which may not start processes).
    """
    from PIL import __version__ as pillow

    key = {
        "task": task,
        "split": split,
        "fingerprint": rows._fingerprint,
        "rows": len(rows),
        "resize": resize.describe(),
        "pillow": pillow,
        "version": VERSION,
    }
    final = Path(root) / task / f"{split}-{key_hash(key)}"
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        try:
            meta = _verify(final)
        except CacheCorrupt as exc:
            log.warning("corrupt image cache, rebuilding: %s", exc)
            shutil.rmtree(final, ignore_errors=True)
            meta = None
        if meta is not None:
            return Entry(final, tuple(meta["shape"]))
        for stale in final.parent.glob(f".{final.name}.*"):  # a killed build's leftovers
            shutil.rmtree(stale, ignore_errors=True)
        if progress:
            progress(f"decoding {task} {split} ({len(rows)} images) into {final}")
        scratch = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
        try:
            shape = _fill(scratch / IMAGES, rows, resize, workers)
            size = (scratch / IMAGES).stat().st_size
            meta = {
                "key": key,
                "shape": list(shape),
                "size": size,
                "chunk": CHUNK,
                "sha256": _chunk_digests(scratch / IMAGES, size),
            }
            (scratch / META).write_text(json.dumps(meta, indent=1))
            os.replace(scratch, final)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        _verify(final)
        return Entry(final, shape)
