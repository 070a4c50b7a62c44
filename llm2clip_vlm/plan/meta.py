"""Every reference model built at full size on the meta device, through the package's own builders.

Nothing is allocated (an 8B LLM takes seconds), yet each model is the one training would build:
stage 1's bidirectional decoder (:func:`~llm2clip_vlm.text.modeling.bidirectional_from_config`,
bitsandbytes 4-bit layers for QLoRA) wrapped by :func:`~llm2clip_vlm.text.lora.wrap_lora`; stage
2's :class:`~llm2clip_vlm.vision.model.LLM2CLIP` on a backbone from
:func:`~llm2clip_vlm.vision.backbones.backbone_from_config`; LLaVA assembled by
:func:`~llm2clip_vlm.llava.assemble.assemble_llava` and frozen/wrapped by
:func:`~llm2clip_vlm.llava.model.prepare_phase`. So a recipe that no longer builds fails here,
and ``plan`` counts the parameters, their dtypes and what trains from the real modules.

QLoRA on meta: bitsandbytes' ``Linear4bit`` layers are built, but their weights keep the unpacked
shape and dtype until they are quantized on a GPU, so :func:`count` counts them by arithmetic:
NF4 with double quantization stores 4 bits per weight, one 8-bit absmax per block of 64 and one
fp32 scale per 256 blocks: ``0.5 + 1/64 + 4/(64*256)`` bytes per weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llm2clip_vlm.llava.assemble import assemble_llava, resolve_select_strategy
from llm2clip_vlm.llava.config import LlavaConfig
from llm2clip_vlm.llava.model import prepare_phase
from llm2clip_vlm.text.config import Stage1Config
from llm2clip_vlm.text.lora import wrap_lora
from llm2clip_vlm.text.modeling import bidirectional_from_config, quantization_config
from llm2clip_vlm.tower.formats import tower_format
from llm2clip_vlm.training.optim import DTYPES
from llm2clip_vlm.vision.backbones import backbone_from_config, create_backbone
from llm2clip_vlm.vision.config import Stage2Config
from llm2clip_vlm.vision.model import LLM2CLIP, stage2_model_config

NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)


@dataclass(frozen=True)
class Counts:
    """Parameters of a built model: how many, how many train, and their bytes as stored."""

    params: int
    trainable: int
    four_bit: int
    weight_bytes: float
    trainable_bytes: float

    @property
    def frozen_bytes(self) -> float:
        return self.weight_bytes - self.trainable_bytes


def count(model: nn.Module) -> Counts:
    """Count ``model``'s parameters (shared ones once); 4-bit weights by NF4 arithmetic."""
    four_bit_ids = {id(m.weight) for m in model.modules() if type(m).__name__ == "Linear4bit"}
    params = trainable = four_bit = 0
    weight_bytes = trainable_bytes = 0.0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        size = n * NF4_BYTES if id(p) in four_bit_ids else n * p.element_size()
        params += n
        weight_bytes += size
        if id(p) in four_bit_ids:
            four_bit += n
        if p.requires_grad:
            trainable += n
            trainable_bytes += size
    return Counts(params, trainable, four_bit, weight_bytes, trainable_bytes)


def _attn(impl: str) -> str:
    # flash_attention_2 needs the flash-attn package to build; its memory is sdpa's (no s^2 term).
    return "sdpa" if impl == "flash_attention_2" else impl


def stage1_model(s: Stage1Config, llm_config: Any) -> nn.Module:
    """Stage 1's trained model: the bidirectional decoder (4-bit for QLoRA) with its LoRA."""
    # Base weights in the run's precision on a GPU (as text.train loads them there).
    base = bidirectional_from_config(
        llm_config,
        dtype=DTYPES[s.loop.precision],
        device="meta",
        attn_implementation=_attn(s.attn_implementation),
        quantization=s.lora.quantization,
    )
    with torch.device("meta"):  # the adapters too (peft would initialise them in CPU memory)
        return wrap_lora(base, s)


def embed_model(llm_config: Any, precision: str) -> nn.Module:
    """The embed pass's model: the merged stage-1 decoder in ``precision``, frozen."""
    model = bidirectional_from_config(llm_config, dtype=DTYPES[precision], device="meta")
    return model.requires_grad_(False)


def stage2_model(s: Stage2Config, vision_config: Any, text_dim: int) -> LLM2CLIP:
    """Stage 2's model: backbone (``vision_config``: a transformers config or a timm name; None:
    the random ViT of ``s.backbone``'s sizes), image head, text adaptor for ``text_dim``-wide
    caption embeddings, logit scale."""
    with torch.device("meta"):
        if vision_config is None:
            backbone = create_backbone(s.backbone)
        else:
            backbone = backbone_from_config(s.backbone.kind, vision_config)
        model = LLM2CLIP(stage2_model_config(s, text_dim), backbone=backbone)
    if s.gradient_checkpointing:
        model.vision.set_grad_checkpointing(True)
    return model


def llava_model(llava: LlavaConfig, phase: str, vision_config: Any, llm_config: Any) -> Any:
    """LLaVA-1.5 for ``phase`` (``pretrain``/``finetune``) on a tower and an LLM of these configs.

    Raises:
        ValueError: a tower that transformers' LLaVA cannot hold (timm), as ``llava-pretrain`` says.
    """
    from transformers import AutoModel, AutoModelForCausalLM

    p = getattr(llava, phase)
    fmt = tower_format(getattr(vision_config, "model_type", "timm"))
    if fmt.name not in ("clip", "siglip"):
        raise ValueError(
            f"a {fmt.name} tower is not a transformers vision model; LlavaForConditionalGeneration "
            "needs a CLIP or SigLIP tower"
        )
    # Copies: assembling resizes the LLM's vocabulary in its config (the <image> token).
    llm_config = type(llm_config).from_dict(llm_config.to_dict())
    vision_config = type(vision_config).from_dict(vision_config.to_dict())
    with torch.device("meta"):
        vision = AutoModel.from_config(vision_config)
        lm = AutoModelForCausalLM.from_config(llm_config)
    quantized = p.tune == "qlora"
    if quantized:
        from transformers.integrations.bitsandbytes import replace_with_bnb_linear

        lm = replace_with_bnb_linear(
            lm,
            modules_to_not_convert=["lm_head"],
            quantization_config=quantization_config("4bit", torch.float32),
        )
    has_cls = fmt.num_prefix_tokens(vision_config) == 1
    vocab = int(llm_config.vocab_size)
    model = assemble_llava(
        vision, lm, has_cls=has_cls, select_strategy=resolve_select_strategy(fmt, llava.select_strategy, has_cls),
        image_token_id=vocab, vocab_size=vocab + 1, vision_feature_layer=llava.vision_feature_layer,
        dtype=torch.float32, quantized=quantized,
    )  # fmt: skip
    with torch.device("meta"):  # LoRA adapters too
        return prepare_phase(model, p, DTYPES[p.loop.precision])


def largest_block(model: nn.Module) -> int:
    """Parameters of the largest item of any ``ModuleList`` (a transformer block: the unit that
    FSDP and ZeRO-3 gather at a time)."""
    best = 0
    for m in model.modules():
        if isinstance(m, nn.ModuleList):
            for block in m:
                best = max(best, sum(p.numel() for p in block.parameters()))
    return best


def embedding_params(model: nn.Module) -> int:
    """Parameters of the token-embedding tables (no compute per token)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
