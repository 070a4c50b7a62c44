"""Stage 2's RandomResizedCrop (the reference's train transform, llm2clip/eva_clip/transform.py:83)
draws its box exactly as torchvision's ``RandomResizedCrop.get_params`` (a copy below), without
torchvision, and deterministically per (seed, epoch, image)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from llm2clip_vlm.vision.augment import crop_box, random_resized_crop
from llm2clip_vlm.vision.data import Stage2TrainData


def torchvision_get_params(width, height, scale, ratio):
    """pytorch/vision torchvision/transforms/transforms.py, ``RandomResizedCrop.get_params`` at
    commit 6247d96d3ce658d553e4e2ceea5cedd77f715b29 (BSD-3-Clause), copied; the only change:
    the image's size is passed in (``F._get_image_size(img)``)."""
    area = height * width

    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        log_ratio = torch.log(torch.tensor(ratio))
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()

        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))

        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,)).item()
            j = torch.randint(0, width - w + 1, size=(1,)).item()
            return i, j, h, w

    # Fallback to central crop
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:  # whole image
        w = width
        h = height
    i = (height - h) // 2
    j = (width - w) // 2
    return i, j, h, w


@pytest.mark.parametrize(("width", "height"), [(384, 288), (336, 336), (40, 400), (500, 100)])
@pytest.mark.parametrize("scale", [(0.9, 1.0), (0.08, 1.0)])
def test_crop_box_equals_torchvision(width: int, height: int, scale: tuple[float, float]) -> None:
    ratio = (3.0 / 4.0, 4.0 / 3.0)
    for seed in range(25):
        torch.manual_seed(seed)  # torchvision draws from the global generator
        expected = torchvision_get_params(width, height, scale, ratio)
        assert crop_box(width, height, scale, torch.Generator().manual_seed(seed)) == expected


class _Embeddings:
    dim = 4

    def caption_rows(self, image_index: int, kind: str) -> np.ndarray:
        return np.array([image_index]) if kind == "short" else np.array([], dtype=np.int64)

    def __getitem__(self, rows: object) -> np.ndarray:
        return np.zeros((1, 4), dtype=np.float32)


def test_training_images_are_cropped_deterministically() -> None:
    from transformers import CLIPImageProcessor

    from llm2clip_vlm.data.records import Caption, ImageCaptions

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8))
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    recs = [ImageCaptions(f"k{i}", f"/x/{i}.jpg", [Caption("a", "short")]) for i in range(3)]
    plain = Stage2TrainData(recs, _Embeddings(), proc, lambda r: img, 0.5, seed=1)
    aug = Stage2TrainData(recs, _Embeddings(), proc, lambda r: img, 0.5, seed=1, crop_scale=[0.9, 1.0])
    a, b = aug.train_pixels(img, 0, 2), aug.train_pixels(img, 0, 2)
    assert a.shape == plain.train_pixels(img, 0, 2).shape == (3, 32, 32)
    assert torch.equal(a, b)  # same (seed, epoch, image): same crop
    assert not torch.equal(a, aug.train_pixels(img, 1, 2))  # another epoch: another crop
    assert not torch.equal(a, plain.train_pixels(img, 0, 2))
    # The crop is the box of crop_box, resized bicubic to the processor's square.
    cropped = random_resized_crop(img, 32, (0.9, 1.0), (1, 0, 2))
    assert cropped.size == (32, 32)
    with pytest.raises(ValueError, match="random_resized_crop"):
        Stage2TrainData(recs, _Embeddings(), proc, lambda r: img, 0.5, seed=1, crop_scale=[0.9])
