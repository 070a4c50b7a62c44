"""``LoopConfig``: the settings of the one training loop, with the same names in every stage.

Each stage's config section embeds one (``stage1.loop``, ``stage2.loop``, ``llava.pretrain.loop``,
``llava.finetune.loop``); a stage's defaults come from its own ``default_factory``. The loop reads
nothing else from the recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from llm2clip_vlm.config_io import COUNT, FRACTION, NONNEGATIVE, SIZE, Range

Precision = Literal["bf16", "fp16", "fp32"]
Schedule = Literal["cosine", "linear", "constant"]
Distributed = Literal["accelerate", "fsdp2"]


@dataclass
class LoopConfig:
    # Mixed precision of the forward/backward (fp32 master weights; accelerate's autocast).
    precision: Precision = "bf16"
    # How the processes share the model: "accelerate" = as the launcher config says (one process,
    # DDP, DeepSpeed); "fsdp2" = torch's fully_shard per transformer block, sharded checkpoints
    # (training/fsdp.py), under accelerate launch, torchrun or any process group. An accelerate
    # config with distributed_type FSDP (recipes/accelerate/fsdp-8gpu.yaml) also selects fsdp2.
    distributed: Distributed = "accelerate"
    # Passes over the training data; a stage turns it into its number of optimizer steps.
    epochs: float = 1.0
    # 0 = run ``epochs``; otherwise exactly this many optimizer steps (the schedule's length).
    max_steps: int = 0
    # Stop early after this many seconds of training (0 = no limit); the schedule is not shortened.
    max_seconds: float = 0.0
    # Linear warm-up over this many steps: lr factor (step + 1) / warmup_steps, 1 from then on.
    warmup_steps: int = 0
    # Warm-up as a share of the total steps (rounded up), used when ``warmup_steps`` is 0.
    warmup_ratio: float = 0.0
    # False: the warm-up factor is (step + 1) / warmup_steps (open_clip's and LLM2CLIP's
    # _warmup_lr: full lr at the last warm-up step). True: step / warmup_steps from lr 0, as
    # transformers' schedules under the HF Trainer that stage 1's references (llm2vec) ran on.
    warmup_from_zero: bool = False
    # After warm-up: cosine to 0, linear to 0, or constant at the base lr.
    schedule: Schedule = "cosine"
    # Clip the global gradient norm to this (0 = off).
    grad_clip: float = 1.0
    # Checkpoint (weights, optimizer, schedule, RNG) every N steps (0 = only at the end / on stop).
    save_every_steps: int = 500
    # Checkpoints kept in ``<output>/checkpoints`` (the newest; older ones are deleted).
    keep_checkpoints: int = 2

    # Accepted values, checked when a recipe is read (llm2clip_vlm.config_io.Range).
    RANGES: ClassVar[dict[str, Range]] = {
        "epochs": NONNEGATIVE,  # 0 = no training steps (stage 1: the "without stage 1" baseline)
        "max_steps": COUNT,
        "max_seconds": NONNEGATIVE,
        "warmup_steps": COUNT,
        "warmup_ratio": FRACTION,
        "grad_clip": NONNEGATIVE,
        "save_every_steps": COUNT,
        "keep_checkpoints": SIZE,
    }
