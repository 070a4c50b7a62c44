"""Random-weight towers written in the exported format, for tests and benchmarks (no hub needed).

``save_random_tower(path, "clip", ...)`` builds a transformers ``CLIPVisionModel`` (or
``SiglipVisionModel``) from a config, seeds its weights, and saves it with its image processor
exactly as the stage-2 export does, so everything downstream runs the real ``from_pretrained`` path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

# OpenAI CLIP's normalisation (SigLIP uses 0.5/0.5, its processor's default).
from llm2clip_vlm.vision.backbones import CLIP_MEAN, CLIP_STD


@dataclass(frozen=True)
class TowerShape:
    """Sizes of a random ViT tower."""

    image_size: int = 32
    patch_size: int = 8
    hidden_size: int = 32
    num_layers: int = 3
    num_heads: int = 2
    intermediate_size: int = 64


# ViT-L/14-336, the reference LLaVA-1.5 tower (576 patches, 1024-d, 24 layers).
VIT_L_14_336 = TowerShape(336, 14, 1024, 24, 16, 4096)


def save_random_tower(
    path: str | Path,
    kind: Literal["clip", "siglip"] = "clip",
    shape: TowerShape = TowerShape(),
    seed: int = 0,
) -> Path:
    """Write a random-weight ``kind`` tower (model + image processor) to ``path``.

    Returns:
        ``path``.

    Raises:
        ValueError: unknown ``kind``.
    """
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        SiglipImageProcessor,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    sizes = {
        "image_size": shape.image_size,
        "patch_size": shape.patch_size,
        "hidden_size": shape.hidden_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads,
        "intermediate_size": shape.intermediate_size,
    }
    torch.manual_seed(seed)
    s = shape.image_size
    if kind == "clip":
        model = CLIPVisionModel(CLIPVisionConfig(**sizes))
        processor = CLIPImageProcessor(
            size={"shortest_edge": s},
            crop_size={"height": s, "width": s},
            image_mean=CLIP_MEAN,
            image_std=CLIP_STD,
        )
    elif kind == "siglip":
        model = SiglipVisionModel(SiglipVisionConfig(**sizes))
        processor = SiglipImageProcessor(size={"height": s, "width": s})
    else:
        raise ValueError(f"unknown tower kind {kind!r}; expected clip or siglip")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
