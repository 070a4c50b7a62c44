"""Stage 2's optional train augmentation: the reference's RandomResizedCrop, without torchvision.

The reference trains with ``RandomResizedCrop(image_size, scale=(0.9, 1.0),
interpolation=BICUBIC)`` in place of resize + centre crop (microsoft/LLM2CLIP
``llm2clip/eva_clip/transform.py:81-86``). torchvision does not import with the CPU torch here, so
the crop box is drawn by the same algorithm as torchvision's ``RandomResizedCrop.get_params``
(pytorch/vision ``torchvision/transforms/transforms.py``: ten tries of an area share in ``scale``
and a log-uniform aspect ratio in ``ratio``, else the centre crop), from a ``torch.Generator``
seeded per (seed, epoch, image), so the crop does not depend on worker, process count or resume
point; the crop is resized to a square with PIL's bicubic filter. The backbone's own processor
then normalises it (its resize and centre crop leave a square of its size unchanged).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

RATIO = (3.0 / 4.0, 4.0 / 3.0)  # torchvision's default, which the reference keeps


def crop_box(
    width: int,
    height: int,
    scale: Sequence[float],
    generator: torch.Generator,
    ratio: Sequence[float] = RATIO,
) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of a random crop, as torchvision's ``get_params`` draws it."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect_ratio = torch.exp(
            torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)
        ).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            j = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return i, j, h, w
    in_ratio = float(width) / float(height)  # fallback: the centre crop
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(image: Any, size: int, scale: Sequence[float], seed: Sequence[int]) -> Any:
    """A PIL image cropped at a random box (see :func:`crop_box`) and resized to ``size`` x ``size``."""
    from PIL import Image

    generator = torch.Generator().manual_seed(_seed(seed))
    top, left, h, w = crop_box(image.width, image.height, scale, generator)
    return image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))


def _seed(parts: Sequence[int]) -> int:
    """One 63-bit seed from several integers (stable across processes and Python versions)."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF
