"""Config sections of stage 2 (aligning a vision encoder to the frozen LLM) and of the export."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from llm2clip_vlm.config_io import (
    BETA,
    COUNT,
    FINITE,
    FRACTION,
    NONNEGATIVE,
    PROBABILITY,
    RATE,
    SEED,
    SIZE,
    Range,
)
from llm2clip_vlm.training.config import LoopConfig


@dataclass
class VisionBackboneConfig:
    # Registry name of the backbone family.
    kind: Literal["clip", "siglip", "timm"] = "clip"
    # Local directory or hub id of the pretrained encoder; empty = a small random ViT (demo).
    name_or_path: str = ""
    # For a random ViT only (demo / tests): its size.
    image_size: int = 64
    patch_size: int = 8
    hidden_size: int = 192
    num_layers: int = 6
    num_heads: int = 3

    # Accepted values, checked when a recipe is read (llm2clip_vlm.config_io.Range).
    RANGES: ClassVar[dict[str, Range]] = {
        "image_size": SIZE,
        "patch_size": SIZE,
        "hidden_size": SIZE,
        "num_layers": SIZE,
        "num_heads": SIZE,
    }


@dataclass
class Stage2Config:
    backbone: VisionBackboneConfig = field(default_factory=VisionBackboneConfig)
    # Shared embedding width of the image head and the text adaptor (1280 EVA02/OpenAI-L, 1152 SigLIP2).
    embed_dim: int = 1280
    # The re-initialised image head: "linear" (no bias, as OpenAI CLIP's proj), "linear_bias" (as
    # EVA's head), "none" (the pooled feature, as the reference's SigLIP2 tower; width = embed_dim).
    image_head: Literal["linear", "linear_bias", "none"] = "linear"
    adaptor_blocks: int = 4
    loss: Literal["clip", "siglip"] = "clip"
    # Learnable log temperature: ln(1/0.07) at start, clamped at ln(100) after every step.
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = math.log(100)
    # SigLIP loss only: initial logit bias (the SigLIP paper uses -10 with logit_scale_init ln 10).
    logit_bias_init: float = -10.0
    # Train augmentation: RandomResizedCrop over this range of area shares, e.g. [0.9, 1.0] as the
    # reference (llm2clip/eva_clip/transform.py:83); [] = resize and centre crop only.
    random_resized_crop: list[float] = field(default_factory=list)
    # Share of samples that use a long caption (the rest a short one).
    long_caption_ratio: float = 0.5
    # Global batch (images per optimizer step, summed over processes).
    batch_size: int = 4096
    lr: float = 1e-5
    # Learning rate of the new parts (adaptor, heads, logit scale); 0 = same as ``lr``.
    head_lr: float = 0.0
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    # Layer-wise lr decay over the ViT: block l of L gets lr * layer_decay ** (L + 1 - l).
    layer_decay: float = 0.85
    gradient_checkpointing: bool = True
    # DataLoader worker processes (image decoding and preprocessing).
    num_workers: int = 2
    seed: int = 42
    eval_batch_size: int = 256
    # Retrieval on this many training images (a fixed, evenly spread slice; 0 = off), measured every
    # ``train_retrieval_every_steps`` steps (0 = once per epoch) and logged next to the loss; it
    # feeds the warning that the run learns nothing (llm2clip_vlm/vision/learning.py).
    train_retrieval_images: int = 256
    train_retrieval_every_steps: int = 0
    # The loop: precision, steps/epochs, time budget, warm-up and cosine schedule, clipping, saving.
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(grad_clip=5.0))

    # Accepted values, checked when a recipe is read (llm2clip_vlm.config_io.Range).
    RANGES: ClassVar[dict[str, Range]] = {
        "embed_dim": SIZE,
        "adaptor_blocks": COUNT,
        "logit_scale_init": FINITE,
        "logit_scale_max": FINITE,
        "logit_bias_init": FINITE,
        "long_caption_ratio": FRACTION,
        # Area shares in (0, 1], item by item (the pair's order is checked by the data set).
        "random_resized_crop": PROBABILITY,
        "train_retrieval_images": COUNT,
        "train_retrieval_every_steps": COUNT,
        "batch_size": SIZE,
        "lr": RATE,
        "head_lr": NONNEGATIVE,
        "weight_decay": NONNEGATIVE,
        "betas": BETA,
        "eps": RATE,
        "layer_decay": PROBABILITY,
        "num_workers": COUNT,
        "seed": SEED,
        "eval_batch_size": SIZE,
    }


@dataclass
class ExportConfig:
    # Write the tower in fp32 / bf16 / fp16.
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
