"""Config section of stage 1: turning a decoder LLM into a caption embedder (LLM2CLIP "CC")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    # LoRA only on the last N decoder layers (0 = every layer). The layers below stay frozen and
    # get no adapter, so the backward pass stops at the first adapted layer: a step costs one
    # forward plus a backward through N layers only.
    top_layers: int = 0
    # "4bit" = QLoRA (bitsandbytes NF4 base), "8bit" = LLM.int8 base, "none" = full-precision base.
    quantization: Literal["none", "4bit", "8bit"] = "none"


@dataclass
class MNTPConfig:
    """Masked next-token prediction warm-up (optional, before SimCSE)."""

    enabled: bool = False
    mlm_probability: float = 0.2
    steps: int = 1000
    batch_size: int = 32
    lr: float = 5e-5
    warmup_steps: int = 100


@dataclass
class Stage1Config:
    # Local directory, hub id, a ``.gguf`` file, or ``builtin:smollm2-135m-instruct``.
    model: str = "builtin:smollm2-135m-instruct"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    max_length: int = 512
    pad_to_multiple_of: int = 16
    pooling: Literal["mean"] = "mean"
    # Instructions prepended to queries (short -> long, long -> short); pooling skips them.
    instruction_short_query: str = "Given a sentence, retrieve a detailed relevant sentence"
    instruction_long_query: str = "Given a detailed sentence, retrieve a short relevant sentence"
    mntp: MNTPConfig = field(default_factory=MNTPConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    # Supervised SimCSE: cross-entropy over cosine similarity x scale (temperature 1/scale).
    scale: float = 50.0
    hard_negatives: bool = True
    # Draw hard negatives from the most similar images (word overlap of their captions); else random.
    similar_negatives: bool = True
    # Global batch (queries per optimizer step, summed over processes).
    batch_size: int = 512
    lr: float = 2e-4
    warmup_steps: int = 300
    weight_decay: float = 0.0
    # After warmup: the reference (llm2vec on the HF Trainer) decays linearly to 0; "constant" holds lr.
    lr_schedule: Literal["linear", "constant", "cosine"] = "linear"
    # Gradient-norm clip (the HF Trainer default the reference ran with); 0 = off.
    max_grad_norm: float = 1.0
    # 0 = no training (whatever max_steps says): the saved encoder is the base LLM, bidirectional and
    # mean pooled (the "without stage 1" baseline of the ablation).
    epochs: float = 1.0
    # Stop after this many optimizer steps (0 = run the epochs) / this many seconds (0 = no limit).
    max_steps: int = 0
    max_seconds: float = 0.0
    gradient_checkpointing: bool = True
    # Split each batch into length-sorted chunks of this many sequences for the forward pass.
    chunk_size: int = 0
    save_every_steps: int = 200
    # Checkpoints kept in <output>/checkpoints (older ones are deleted).
    keep_checkpoints: int = 2
    seed: int = 42
    # Caption Retrieval Accuracy on held-out caption pairs (number of captions retrieved among).
    cra_captions: int = 1000
    eval_batch_size: int = 64
