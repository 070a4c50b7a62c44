"""The blind baseline: the same questions asked with the image withheld.

A LLaVA that answers by habit (the most common answer of a question type, a prior learnt from the
text) scores well above zero without looking. Its accuracy only says the model *sees* when it
drops once the image is withheld, so every held-out evaluation is scored twice: with each
question's own image, and blind.

Two ways to withhold the image (``BLIND_MODES``):

- ``shuffle`` (the default): each question gets *another* question's image, a derangement of the
  distinct images of the set (no question keeps its own image; questions that share an image all
  get the same foreign one). The model still sees an in-distribution image with the usual token
  statistics, so a drop measures "does it use THIS image", not "is it confused by an input it never
  saw in training". This is the stronger control, and the one the reports use.
- ``blank``: each image replaced by one of the same size filled with the image processor's mean
  colour (what ``pad`` pads with; a zero input after normalisation). Simpler to read, but an
  out-of-distribution input: a drop may come from the unusual input rather than from the lost
  content, so it overstates how much the model looks.

The derangement is seeded: the same set and seed give the same blind answers.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Sequence
from typing import Literal, TypeVar

BlindMode = Literal["shuffle", "blank", "off"]
BLIND_MODES: tuple[str, ...] = ("shuffle", "blank", "off")

K = TypeVar("K", bound=Hashable)


def derangement(keys: Sequence[K], seed: int = 0) -> dict[K, K] | None:
    """A map from each distinct key to a *different* distinct key (a seeded derangement).

    The distinct keys are shuffled and each is sent to the next one in that order (one cycle over
    all of them), so no key maps to itself. ``None`` when there are fewer than two distinct keys:
    no question can then be given a foreign image.
    """
    distinct = list(dict.fromkeys(keys))
    if len(distinct) < 2:
        return None
    random.Random(seed).shuffle(distinct)
    return {k: distinct[(i + 1) % len(distinct)] for i, k in enumerate(distinct)}


def blank_like(image, colour: tuple[int, int, int]):  # PIL.Image -> PIL.Image
    """An image of ``image``'s size and mode filled with ``colour`` (the processor's mean)."""
    from PIL import Image

    return Image.new("RGB", image.size, colour)


__all__ = ["BLIND_MODES", "BlindMode", "blank_like", "derangement"]
