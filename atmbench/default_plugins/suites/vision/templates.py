"""Prompt templates per task: ``template.format(classname)`` is one prompt.

The task_vectors repository's per-dataset templates (``src/datasets/templates.py``) for
its 13 datasets, and the TALL-masks repository's for the tasks it added (Flowers102,
Oxford-IIIT Pet, PCAM, FER2013, Fashion-MNIST, Rendered SST-2, EMNIST, KMNIST). A zero-shot
head averages the normalized text embeddings of a class name under all of its task's
templates.
"""

from __future__ import annotations

PHOTO = ("a photo of a {}.", "a photo of the {}.")

CIFAR = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
)

NUMBER = ('a photo of the number: "{}".',)

CARS = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of my {}.",
    "i love my {}!",
    "a photo of my dirty {}.",
    "a photo of my clean {}.",
    "a photo of my new {}.",
    "a photo of my old {}.",
)

DTD = tuple(
    f"a photo of {article} {{}} {noun}."
    for article in ("a", "the")
    for noun in ("texture", "pattern", "thing", "object")
)

EUROSAT = (
    "a centered satellite photo of {}.",
    "a centered satellite photo of a {}.",
    "a centered satellite photo of the {}.",
)

GTSRB = tuple(
    f'a {view} photo of a "{{}}" traffic sign.' for view in ("zoomed in", "centered", "close up")
)

RESISC45 = tuple(
    f"{source} {kind} of {article}{{}}."
    for article in ("", "a ", "the ")
    for kind in ("imagery", "photo", "view")
    for source in ("satellite", "aerial")
)

FER2013 = (
    "a photo of a {} looking face.",
    "a photo of a face showing the emotion: {}.",
    "a photo of a face looking {}.",
    "a face that looks {}.",
    "they look {}.",
    "look at how {} they are.",
)

TEMPLATES: dict[str, tuple[str, ...]] = {
    "sun397": PHOTO,
    "cars": CARS,
    "resisc45": RESISC45,
    "eurosat": EUROSAT,
    "svhn": NUMBER,
    "gtsrb": GTSRB,
    "mnist": NUMBER,
    "dtd": DTD,
    "flowers102": ("a photo of a {}, a type of flower.",),
    "pcam": ("this is a photo of {}",),
    "fer2013": FER2013,
    "pets": ("a photo of a {}, a type of pet.",),
    "stl10": PHOTO,
    "cifar100": CIFAR,
    "cifar10": CIFAR,
    "food101": ("a photo of {}, a type of food.",),
    "fashion_mnist": PHOTO,
    "emnist": ('a photo of the digit character: "{}".',),
    "kmnist": ("a photo of the character {}.",),
    "rendered_sst2": ("a {} review of a movie.",),
}


def prompts(task: str, classname: str) -> list[str]:
    return [template.format(classname) for template in TEMPLATES[task]]
