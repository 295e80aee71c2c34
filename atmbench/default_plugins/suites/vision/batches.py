"""Batches of cached images on the device: gather, copy, normalise and augment there.

A split's images come from the decoded-image cache (:mod:`.imagecache`) as ``uint8``; a
batch is gathered from the memory map by a background thread into (on CUDA) pinned
memory, copied without blocking, and turned into the model's input on the device, the
whole batch at once: ``/255``, then open_clip's mean and standard deviation (the same
operations, in the same order, as ``ToTensor`` and ``Normalize``, so evaluation inputs are
bit-identical to the per-image path on the CPU). The train split's random resized crop
(open_clip's ``RandomResizedCrop``: 90-100% of the area, aspect 3/4 to 4/3) is drawn per
image per epoch from the training seed's generator and applied to the cached, already
resized and centre-cropped image with one bilinear ``grid_sample`` for the batch: unlike
the per-image path, which crops the full image with a bicubic filter, it never sees what
the centre crop cut off.

Evaluation splits can stay on the device (:class:`Resident`, least recently used out,
within a byte budget): the validation searches (λ for TA, α for TSV and Iso, every ATM
round) then read their inputs from device memory instead of copying them again.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import Dataset

from atmbench.default_plugins.suites.vision.imagecache import Resize

PREFETCH = 2
"""Batches gathered ahead of the one the device works on."""
RESIDENT_FRACTION = 0.25
"""Share of a GPU's memory that evaluation splits may occupy (none on the CPU: the page
cache already holds the memory map)."""


@dataclass(frozen=True)
class Preprocess:
    """What happens to a cached batch on the device: an optional random crop, normalisation."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: tuple[float, float] | None = None
    """``RandomResizedCrop`` area range; ``None``: no augmentation (evaluation)."""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``uint8 [B, 3, S, S]`` on the device -> normalised float32 input of the model."""
        x = images.to(torch.float32).div(255)
        if self.scale is not None:
            boxes = crop_boxes(len(x), x.shape[-2], x.shape[-1], self.scale, self.ratio, generator)
            x = resized_crop(x, boxes.to(x.device))
        mean = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return x.sub_(mean).div_(std)


def plan(eval_tf, train_tf) -> tuple[Resize, Preprocess, Preprocess] | None:
    """Split open_clip's transforms into the cached resize and the device-side steps.

    Recognises ``Resize, CenterCrop, [RGB], ToTensor, Normalize`` for evaluation and
    ``RandomResizedCrop, [RGB], ToTensor, Normalize`` for training at the same size;
    ``None`` for anything else (the suite then preprocesses image by image, as before).
    """
    from torchvision import transforms as T

    def parts(tf) -> tuple[list, T.Normalize] | None:
        steps = list(getattr(tf, "transforms", ()))
        tensor = [i for i, s in enumerate(steps) if isinstance(s, T.ToTensor)]
        if len(tensor) != 1 or tensor[0] != len(steps) - 2:
            return None
        if not isinstance(steps[-1], T.Normalize):
            return None
        geometric = [s for s in steps[: tensor[0]] if not _is_rgb(s)]
        return geometric, steps[-1]

    found_eval, found_train = parts(eval_tf), parts(train_tf)
    if found_eval is None or found_train is None:
        return None
    (resize, crop), normalize = found_eval[0], found_eval[1]
    if not (isinstance(resize, T.Resize) and isinstance(crop, T.CenterCrop)):
        return None
    size = crop.size[0]
    if tuple(crop.size) != (size, size) or not isinstance(resize.size, int):
        return None
    (random_crop,), train_norm = found_train
    if not isinstance(random_crop, T.RandomResizedCrop) or tuple(random_crop.size) != (size, size):
        return None
    mean, std = tuple(normalize.mean), tuple(normalize.std)
    if (tuple(train_norm.mean), tuple(train_norm.std)) != (mean, std):
        return None
    return (
        Resize(size, (resize, crop)),
        Preprocess(mean, std),
        Preprocess(mean, std, tuple(random_crop.scale), tuple(random_crop.ratio)),
    )


def _is_rgb(step) -> bool:
    """open_clip's RGB conversion steps (a no-op here: images are converted when decoded)."""
    return type(step).__name__ == "MaybeConvertMode" or (
        getattr(step, "__name__", "") == "_convert_to_rgb"
    )


def crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None,
) -> Tensor:
    """``[n, 4]`` (top, left, height, width) as torchvision's ``RandomResizedCrop`` draws them.

    Ten tries per image, vectorised (the first that fits wins); an image none fits gets
    the centre crop clamped to ``ratio``, as torchvision falls back.
    """
    area = height * width
    tries = 10
    target = torch.empty(n, tries).uniform_(scale[0], scale[1], generator=generator) * area
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(torch.empty(n, tries).uniform_(*log_ratio, generator=generator))
    w = torch.sqrt(target * aspect).round()
    h = torch.sqrt(target / aspect).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.int8).argmax(1)
    rows = torch.arange(n)
    w, h = w[rows, first], h[rows, first]
    aspect_in = width / height
    if aspect_in < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif aspect_in > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    found = fits.any(1)
    w = torch.where(found, w, torch.tensor(float(fw)))
    h = torch.where(found, h, torch.tensor(float(fh)))
    u = torch.rand(n, 2, generator=generator)
    top = torch.where(found, u[:, 0] * (height - h + 1), (height - h) / 2).floor()
    left = torch.where(found, u[:, 1] * (width - w + 1), (width - w) / 2).floor()
    return torch.stack([top, left, h, w], 1)


def resized_crop(images: Tensor, boxes: Tensor) -> Tensor:
    """Each image's box resampled (bilinear) to the images' own size, in one kernel."""
    n, _, height, width = images.shape
    top, left, h, w = boxes.to(images.dtype).unbind(1)
    theta = images.new_zeros(n, 2, 3)
    theta[:, 0, 0] = w / width
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta, [n, 3, height, width], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


class Resident:
    """Evaluation splits held on the device, least recently used out, within ``budget`` bytes."""

    def __init__(self, budget: int):
        self.budget = budget
        self._held: OrderedDict[object, Tensor] = OrderedDict()

    def get(self, key: object, nbytes: int, load: Callable[[], Tensor]) -> Tensor | None:
        """The held tensor for ``key``, loaded now if it fits; ``None`` if it never could."""
        if key in self._held:
            self._held.move_to_end(key)
            return self._held[key]
        if nbytes > self.budget:
            return None
        while self._held and sum(t.nbytes for t in self._held.values()) + nbytes > self.budget:
            self._held.popitem(last=False)
        self._held[key] = load()
        return self._held[key]


class CachedImages(Dataset):
    """(image, label) items of rows ``indices`` of one cached split.

    ``device_batches`` is the fast path :func:`atmbench.evaluate.evaluate` and
    :func:`atmbench.finetune.train` take; indexing one item (the statistics' and the
    multi-task model's loaders) preprocesses it the same way on the CPU, with torch's
    global generator for the crop.
    """

    def __init__(
        self,
        images: Callable[[], np.ndarray],
        labels: Tensor,
        indices: Tensor | None,
        preprocess: Preprocess,
        resident: Resident | None = None,
        key: object = None,
    ):
        """``images`` opens the split's memory map; ``resident`` may hold this dataset's
        images on the device under ``key`` (which names the split: task, split name)."""
        self._open, self.labels, self.preprocess = images, labels, preprocess
        self.indices = torch.arange(len(labels)) if indices is None else indices
        self.resident, self.key = resident, key
        self._images: np.ndarray | None = None

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            self._images = self._open()
        return self._images

    def __getstate__(self) -> dict:  # loader workers reopen the memory map
        return dict(self.__dict__, _images=None)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        row = int(self.indices[i])
        image = torch.from_numpy(np.array(self.images[row : row + 1]))
        return self.preprocess(image)[0], self.labels[row]

    def _gather(self, rows: Tensor, pin: bool) -> Tensor:
        out = torch.empty((len(rows), *self.images.shape[1:]), dtype=torch.uint8, pin_memory=pin)
        np.take(self.images, rows.numpy(), axis=0, out=out.numpy())
        return out

    def _on_device(self, device: torch.device) -> Tensor | None:
        if self.resident is None or len(self) == 0:
            return None
        shape = (len(self), *self.images.shape[1:])

        def load() -> Tensor:
            held = torch.empty(shape, dtype=torch.uint8, device=device)
            pin = device.type == "cuda"
            step = 1024
            for start in range(0, len(self), step):
                part = self._gather(self.indices[start : start + step], pin)
                held[start : start + len(part)].copy_(part, non_blocking=pin)
            return held

        return self.resident.get((self.key, str(device)), math.prod(shape), load)

    def device_batches(
        self,
        batch_size: int,
        device: torch.device,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[list[Tensor]]:
        """One pass as ``[inputs, labels]`` on ``device``; shuffled when ``generator`` is given.

        The generator draws the order, then each batch's crops, so a seed fixes both.
        """
        n = len(self)
        positions = torch.randperm(n, generator=generator) if generator is not None else None
        positions = torch.arange(n) if positions is None else positions
        end = n - n % batch_size if drop_last else n
        chosen = [positions[s : s + batch_size] for s in range(0, end, batch_size)]
        held = self._on_device(device)
        if held is not None:
            for pos in chosen:
                labels = self.labels[self.indices[pos]].to(device, non_blocking=True)
                yield [self.preprocess(held[pos.to(device)], generator), labels]
            return
        pin = device.type == "cuda"
        with ThreadPoolExecutor(1) as pool:
            pending = [pool.submit(self._gather, self.indices[p], pin) for p in chosen[:PREFETCH]]
            for i, pos in enumerate(chosen):
                if i + PREFETCH < len(chosen):
                    rows = self.indices[chosen[i + PREFETCH]]
                    pending.append(pool.submit(self._gather, rows, pin))
                images = pending.pop(0).result().to(device, non_blocking=pin)
                labels = self.labels[self.indices[pos]].to(device, non_blocking=pin)
                yield [self.preprocess(images, generator), labels]
