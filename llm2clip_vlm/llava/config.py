"""Config section of LLaVA-1.5 training on a tower: ``llava-pretrain`` and ``llava-finetune``.

The defaults are the reference LLaVA-1.5-7B settings (SPEC section 1); recipes change only what
differs. ``llava.pretrain`` and ``llava.finetune`` are two phases with the same shape: the data,
the template, and how the model trains.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from llm2clip_vlm.config_io import COUNT, DROPOUT, INDEX, NONNEGATIVE, RATE, SEED, SIZE, Range
from llm2clip_vlm.data.config import DataPolicy
from llm2clip_vlm.training.config import LoopConfig


@dataclass
class LlavaDataConfig(DataPolicy):
    """A LLaVA data set: a JSON list (or JSONL) of records and the folder their images live in, or
    webdataset shards of LLaVA records (``docs/DATA.md``); how it is read (bad records, the image
    check, streaming) is the :class:`~llm2clip_vlm.data.config.DataPolicy` every stage shares.
    Streamed batches mix image and text-only records (``group_by_modality`` does not apply)."""

    # LLaVA records (``blip_laion_cc_sbu_558k.json``, ``llava_v1_5_mix665k.json``, ...), or shards: a
    # folder of ``*.tar``, a brace pattern ``llava-{000..099}.tar`` or a glob; empty = the synthetic
    # demo world's LLaVA splits.
    path: str = ""
    # Image paths are relative to this folder (default: the JSON's folder); paths leaving it are refused.
    image_folder: str = ""
    # Keep only the first N records (0 = all).
    max_samples: int = 0
    # Held-out question records (``{"question_type", "answer"}`` extras) scored by exact match
    # before and after training (empty = none; the demo uses its held-out split).
    heldout_path: str = ""
    heldout_max_samples: int = 0

    # Accepted values, checked when a recipe is read (llm2clip_vlm.config_io.Range).
    RANGES: ClassVar[dict[str, Range]] = {
        **DataPolicy.RANGES,
        "max_samples": COUNT,
        "heldout_max_samples": COUNT,
    }


@dataclass
class LlavaPhaseConfig:
    """How one phase trains (pretraining: the projector; finetuning: the projector and the LLM)."""

    data: LlavaDataConfig = field(default_factory=LlavaDataConfig)
    # plain = LLaVA's pretraining template; vicuna_v1 = LLaVA-1.5's instruction template;
    # chat_template = the LLM's own chat template.
    template: Literal["plain", "vicuna_v1", "chat_template"] = "vicuna_v1"
    # What trains besides the projector: nothing (projector), the whole LLM (full), LoRA adapters
    # on the LLM's linear layers (lora), or LoRA on a 4-bit base (qlora). The tower stays frozen.
    tune: Literal["projector", "full", "lora", "qlora"] = "full"
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    # Global batch (samples per optimizer step over all processes) and the per-process micro batch;
    # gradient accumulation makes up the difference.
    batch_size: int = 128
    micro_batch_size: int = 16
    lr: float = 2e-5
    # Learning rate of the projector (0 = ``lr``); LLaVA's LoRA recipe uses 2e-5 with lr 2e-4.
    projector_lr: float = 0.0
    weight_decay: float = 0.0
    max_length: int = 2048
    # pad = LLaVA-1.5's ``image_aspect_ratio=pad`` (finetune.sh: pad to square with the processor's
    # mean colour); square = LLaVA's default (train.py DataArguments, pretrain.sh): the processor's
    # own resize and centre crop; none = the same as square (the older name).
    image_aspect_ratio: Literal["pad", "square", "none"] = "pad"
    # Batches hold only image records or only text-only records (LLaVA's group_by_modality_length).
    group_by_modality: bool = True
    # Also group by length as LLaVA's LengthGroupedSampler (llava/train/llava_trainer.py): each
    # global batch is a "megabatch" of similar-length records (word counts, LLaVA's
    # modality_lengths), split into per-process micro batches of balanced length.
    group_by_length: bool = False
    # The loss: "tokens" = the mean over the global batch's supervised tokens (independent of the
    # micro batch and process counts); "micro_batch" = LLaVA's (the HF Trainer's): the mean over each
    # micro batch's tokens, averaged over the micro batches and the processes.
    loss_mean: Literal["tokens", "micro_batch"] = "tokens"
    # Micro batches cut from the global batch sorted by length (rows of similar length pad less;
    # the demo's vicuna_v1 batches of 1-3 question turns: ~25 % of the computed tokens were
    # padding). The token-mean loss does not depend on which rows share a micro batch, so the
    # update is the same up to float rounding; not applied with loss_mean micro_batch (there the
    # grouping weighs the tokens).
    sort_micro_batches: bool = True
    # The tokens every row of a micro batch starts with (the BOS, the system prompt and "USER:"
    # before the image in vicuna_v1: 33 of ~95 tokens a row in the demo) go through the LLM once,
    # as one row whose KV cache the rows continue from: the loss and gradients are the same up to
    # float rounding (llm2clip_vlm.llava.step.token_loss_sum). One process only, without
    # gradient checkpointing (transformers drops the cache there), DeepSpeed or FSDP.
    share_prefix: bool = True
    gradient_checkpointing: bool = True
    num_workers: int = 4
    seed: int = 42
    # Held-out question answering: greedy answers of at most this many tokens, this many per batch.
    eval_max_new_tokens: int = 16
    eval_batch_size: int = 16
    # The blind baseline of the held-out questions (asked again with the image withheld):
    # shuffle = each question gets another question's image (in-distribution input: a drop means
    # the model uses THIS image); blank = a mean-colour image; off = not measured. Doubles the
    # held-out evaluation's time.
    eval_blind: Literal["shuffle", "blank", "off"] = "shuffle"
    # Also answer the held-out questions before training (the model it starts from). A finetune's
    # "before" is the pretrained projector asked in the chat template, which answers ~0 %: the
    # demo turns it off to spend its minutes on training.
    eval_before: bool = True
    # The loop: LLaVA-1.5 warms up over 3% of the steps (ceil), from lr 0 as the HF Trainer's
    # get_cosine_schedule_with_warmup (factors 0, 1/w, ...), then decays the lr on a cosine.
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(warmup_ratio=0.03, warmup_from_zero=True))

    # Accepted values, checked when a recipe is read (llm2clip_vlm.config_io.Range).
    RANGES: ClassVar[dict[str, Range]] = {
        "lora_r": SIZE,
        "lora_alpha": SIZE,
        "lora_dropout": DROPOUT,
        "batch_size": SIZE,
        "micro_batch_size": SIZE,
        "lr": RATE,
        "projector_lr": NONNEGATIVE,
        "weight_decay": NONNEGATIVE,
        "max_length": SIZE,
        "num_workers": COUNT,
        "seed": SEED,
        "eval_max_new_tokens": SIZE,
        "eval_batch_size": SIZE,
    }


def _pretrain_defaults() -> LlavaPhaseConfig:
    # LLaVA-1.5's pretrain.sh: no --image_aspect_ratio (train.py's default 'square'), no grouping.
    return LlavaPhaseConfig(
        template="plain", tune="projector", batch_size=256, micro_batch_size=32, lr=1e-3,
        image_aspect_ratio="square", group_by_modality=False,
    )  # fmt: skip


@dataclass
class LlavaConfig:
    """LLaVA-1.5 on an LLM2CLIP tower: the parts, then the two phases."""

    # The exported tower directory (``build-tower``'s ``tower/``, or any CLIP/SigLIP vision model dir).
    tower: str = ""
    # The LLM: local directory, hub id, ``.gguf`` file or ``builtin:smollm2-135m-instruct``.
    llm: str = "lmsys/vicuna-7b-v1.5"
    vision_feature_layer: int = -2
    # default = patch tokens (CLS dropped), LLaVA-1.5's; full = every token.
    select_strategy: Literal["default", "full"] = "default"
    system_prompt: str = ""  # empty = the template's own (vicuna_v1: LLaVA-1.5's)
    pretrain: LlavaPhaseConfig = field(default_factory=_pretrain_defaults)
    finetune: LlavaPhaseConfig = field(default_factory=LlavaPhaseConfig)

    # Accepted values, checked when a recipe is read (llm2clip_vlm.config_io.Range).
    RANGES: ClassVar[dict[str, Range]] = {
        "vision_feature_layer": INDEX,
    }
