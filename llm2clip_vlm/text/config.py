"""Config section of stage 1: turning a decoder LLM into a caption embedder (LLM2CLIP "CC")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from llm2clip_vlm.config_io import COUNT, DROPOUT, NONNEGATIVE, PROBABILITY, RATE, SEED, SIZE, Range
from llm2clip_vlm.training.config import LoopConfig

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

    # Accepted values, checked when a recipe is read (llm2clip_vlm.config_io.Range).
    RANGES: ClassVar[dict[str, Range]] = {
        "r": SIZE,
        "alpha": SIZE,
        "dropout": DROPOUT,
        "top_layers": COUNT,
    }


@dataclass
class MNTPConfig:
    """Masked next-token prediction warm-up (optional, before SimCSE)."""

    enabled: bool = False
    mlm_probability: float = 0.2
    # Global batch (the reference: 32 per device x 8 GPUs = 256).
    batch_size: int = 32
    lr: float = 5e-5
    # The reference runs MNTP on the HF Trainer with its defaults (microsoft/LLM2CLIP
    # llm_caption_contrastive/run_mntp.py:936 + train_configs/mntp/MetaLlama3_cc3m.json set none
    # of these): weight decay 0, and in ``loop``: no warm-up, gradient-norm clip 1.0, linear decay
    # to 0 (warm-up from lr 0 when one is set, as transformers' schedules).
    weight_decay: float = 0.0
    # MNTP's own run of the one loop, the same LoopConfig as every stage's. ``loop.max_steps`` is
    # its length: our MNTP counts steps of line-level samples; the reference runs one epoch over
    # wikitext-103 + CC3M grouped into 512-token blocks (run_mntp.py group_texts), whose length
    # depends on the tokenizer: set it to the epoch you want (``epochs`` does not apply).
    # ``precision`` and ``distributed`` are stage1.loop's (one accelerator runs both), and MNTP has
    # no time budget (``max_seconds`` must stay 0), so SimCSE always starts from the same model.
    loop: LoopConfig = field(
        default_factory=lambda: LoopConfig(
            max_steps=1000,
            warmup_steps=0,
            warmup_from_zero=True,
            schedule="linear",
            grad_clip=1.0,
            save_every_steps=200,
        )
    )

    # Keys of older recipes, now in ``loop`` (config_io names the new key instead of failing on an
    # unknown one).
    MOVED: ClassVar[dict[str, str]] = {
        "steps": "loop.max_steps",
        "warmup_steps": "loop.warmup_steps",
        "grad_clip": "loop.grad_clip",
        "schedule": "loop.schedule",
    }
    # Accepted values, checked when a recipe is read (llm2clip_vlm.config_io.Range).
    RANGES: ClassVar[dict[str, Range]] = {
        "mlm_probability": PROBABILITY,
        "batch_size": SIZE,
        "lr": RATE,
        "weight_decay": NONNEGATIVE,
    }


@dataclass
class E5Config:
    """llm2vec's E5 mix for supervised SimCSE (see :mod:`llm2clip_vlm.text.e5`)."""

    # The E5 folder (llm2vec's ``cache/echo-data``: one ``<task>.jsonl`` per task with query /
    # positive / negative). Set, stage 1 trains on the E5 tasks plus the caption pairs as one more
    # task, in task-homogeneous batches, as the reference; empty = captions only.
    path: str = ""
    # E5 task names to read (empty = every task of the reference's E5_EMBEDDING_PROMPTS).
    # With E5 on, the caption pairs are drawn as the reference draws them (a short and a long
    # caption, a random other image's caption as the negative): stage1.pairing and
    # stage1.similar_negatives do not apply.
    tasks: list[str] = field(default_factory=list)


@dataclass
class Stage1Config:
    # Local directory, hub id, a ``.gguf`` file, or ``builtin:smollm2-135m-instruct``; also a
    # caption encoder written by ``import-encoder`` or an earlier stage 1 (SimCSE only: it has no
    # LM head for MNTP).
    model: str = "builtin:smollm2-135m-instruct"
    # PEFT LoRA adapter directories merged into ``model`` in order before training, as the
    # reference's ``extra_model_name_or_path`` (e.g. LLM2Vec's -mntp then -mntp-supervised).
    adapters: list[str] = field(default_factory=list)
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    max_length: int = 512
    pad_to_multiple_of: int = 16
    pooling: Literal["mean"] = "mean"
    # How every caption is wrapped before tokenization, stored in the encoder directory (so `embed`
    # wraps as stage 1 did): "auto" = the reference's choice, the Llama-3 chat header
    # "<|start_header_id|>user<|end_header_id|>\n\n{text}<|eot_id|>" for Llama-3 Instruct
    # tokenizers, bare text otherwise; "none"; or a template with one {text}.
    caption_template: str = "auto"
    # Instructions prepended to queries (short -> long, long -> short); pooling skips them.
    instruction_short_query: str = "Given a sentence, retrieve a detailed relevant sentence"
    instruction_long_query: str = "Given a detailed sentence, retrieve a short relevant sentence"
    mntp: MNTPConfig = field(default_factory=MNTPConfig)
    e5: E5Config = field(default_factory=E5Config)
    lora: LoraConfig = field(default_factory=LoraConfig)
    # Supervised SimCSE: cross-entropy over cosine similarity x scale (temperature 1/scale).
    scale: float = 50.0
    # Which two captions of an image form a SimCSE pair. "cross_kind" (the reference,
    # E5_cc3m.py): a short with a long one whenever the image has both kinds. "any": any two
    # different captions of the image, so images with several captions of a kind also give
    # short-short and long-long pairs (cheaper, and what caption-to-caption retrieval measures).
    # "same_kind": short with short, long with long (a fair coin between the kinds the image has
    # two or more of; an image with one caption per kind pairs those two). It departs from the
    # reference for captions whose kinds say different things: a pair trains its two captions to
    # agree on what they share, so a long caption paired with a short one keeps only what the
    # short one names (on the poster world, the glyphs, and its colours and ground drop out:
    # docs/BENCHMARKS.md, issue 28), while two long captions keep everything both state. Stage 2
    # and its held-out sets compare an image with one kind at a time, so nothing downstream needs
    # a short and a long caption of an image to meet.
    pairing: Literal["cross_kind", "any", "same_kind"] = "cross_kind"
    hard_negatives: bool = True
    # Draw hard negatives from the most similar images (word overlap of their captions); else random.
    similar_negatives: bool = True
    # Global batch (queries per optimizer step, summed over processes).
    batch_size: int = 512
    lr: float = 2e-4
    weight_decay: float = 0.0
    gradient_checkpointing: bool = True
    # Split each batch into length-sorted chunks of this many sequences for the forward pass.
    chunk_size: int = 0
    seed: int = 42
    # Caption Retrieval Accuracy on held-out caption pairs (number of captions retrieved among).
    cra_captions: int = 1000
    # The held-out set (a name in data.heldout) whose short-caption pairs CRA reads. Empty = the
    # first held-out set with two or more short captions per image; if there is none, a slice of
    # the training data is held out of stage-1 training for it (said in the log and metrics.json).
    cra_set: str = ""
    eval_batch_size: int = 64
    # The loop. The reference (llm2vec on the HF Trainer) warms up from lr 0 (transformers'
    # step / warmup), then decays linearly to 0, and clips the gradient norm at 1.0 (the HF
    # Trainer default). ``loop.epochs`` 0 = no training
    # (whatever max_steps says): the saved encoder is the base LLM, bidirectional and mean pooled
    # (the "without stage 1" baseline of the ablation).
    loop: LoopConfig = field(
        default_factory=lambda: LoopConfig(
            warmup_steps=300, warmup_from_zero=True, schedule="linear", grad_clip=1.0, save_every_steps=200
        )
    )

    # Accepted values, checked when a recipe is read (llm2clip_vlm.config_io.Range).
    RANGES: ClassVar[dict[str, Range]] = {
        "max_length": SIZE,
        "pad_to_multiple_of": COUNT,
        "scale": RATE,
        "batch_size": SIZE,
        "lr": RATE,
        "weight_decay": NONNEGATIVE,
        "chunk_size": COUNT,
        "seed": SEED,
        "cra_captions": COUNT,
        "eval_batch_size": SIZE,
    }
