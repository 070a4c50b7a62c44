"""Config sections of stage 2 (aligning a vision encoder to the frozen LLM) and of the export."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal


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


@dataclass
class Stage2Config:
    backbone: VisionBackboneConfig = field(default_factory=VisionBackboneConfig)
    # Shared embedding width of the image head and the text adaptor (1280 EVA02/OpenAI-L, 1152 SigLIP2).
    embed_dim: int = 1280
    adaptor_blocks: int = 4
    loss: Literal["clip", "siglip"] = "clip"
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = math.log(100)
    # Share of samples that use a long caption (the rest a short one).
    long_caption_ratio: float = 0.5
    batch_size: int = 4096
    lr: float = 1e-5
    # Learning rate of the new parts (adaptor, heads, logit scale); 0 = same as ``lr``.
    head_lr: float = 0.0
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    layer_decay: float = 0.85
    warmup_steps: int = 0
    grad_clip: float = 5.0
    epochs: float = 1.0
    max_steps: int = 0
    max_seconds: float = 0.0
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    gradient_checkpointing: bool = True
    num_workers: int = 2
    save_every_steps: int = 500
    seed: int = 42
    eval_batch_size: int = 256


@dataclass
class ExportConfig:
    # Write the tower in fp32 / bf16 / fp16.
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
