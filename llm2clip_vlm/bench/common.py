"""What the suites share: model shapes (tiny and reference), random models built from configs,
the demo caption mix in memory, a tokenizer trained on it, and small helpers.

Reference shapes are transformers configs with the real dimensions (Llama-3-8B-Instruct,
Vicuna-7B-v1.5, CLIP ViT-L/14-336); weights are random and allocated directly on the device, so
no hub and no files are needed. Throughput does not depend on the weights' values.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llm2clip_vlm.bench.harness import resolve_device
from llm2clip_vlm.data.records import Caption, ImageCaptions
from llm2clip_vlm.data.synthetic import (
    LONG_PER_IMAGE,
    SHORT_PER_IMAGE,
    long_captions,
    random_scene,
    short_captions,
)
from llm2clip_vlm.training import dist


@dataclass(frozen=True)
class LLMShape:
    """Sizes of a Llama-architecture decoder."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    max_position_embeddings: int = 4096


# Llama-3-8B-Instruct (the reference stage-1 LLM) and Vicuna-7B-v1.5 (LLaVA-1.5's LLM).
LLAMA3_8B = LLMShape(4096, 14336, 32, 32, 8, 128256, 8192)
VICUNA_7B = LLMShape(4096, 11008, 32, 32, 32, 32000, 4096)


def llama_config(shape: LLMShape, vocab_size: int | None = None) -> Any:
    """A ``LlamaConfig`` of ``shape`` (``vocab_size`` overrides the shape's, e.g. a tiny tokenizer's)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.hidden_size // shape.num_heads,
        vocab_size=vocab_size or shape.vocab_size,
        max_position_embeddings=shape.max_position_embeddings,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def check_device(device: torch.device, preset: str) -> None:
    """Refuse a CUDA preset on a machine without a GPU, with a hint."""
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"preset {preset!r} runs on a GPU and none is available; pass --device cpu to force it"
        )


def resolve_run(preset: str, p: Any, device: str | None, warmup: int | None, repeats: int | None
                ) -> tuple[torch.device, int, int]:  # fmt: skip
    """The device (checked), warm-up and repeat counts of a run: the CLI's values over the preset's.

    Raises:
        RuntimeError: a CUDA device was asked for and there is none.
    """
    dev = resolve_device(device or p.device)
    check_device(dev, preset)
    return dev, p.warmup if warmup is None else warmup, p.repeats if repeats is None else repeats


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (of the trainable ones only, when asked)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def non_embedding_params(model: nn.Module) -> int:
    """Parameters that cost compute per token: all but the token-embedding tables."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return sum(p.numel() for p in model.parameters() if id(p) not in embeddings)


# --------------------------------------------------------------------------------------------
# The demo caption mix, in memory
# --------------------------------------------------------------------------------------------
def demo_captions(n_images: int, seed: int = 0) -> list[ImageCaptions]:
    """``n_images`` demo scenes with their short and long captions (as the demo data set has them).

    The same generator as :mod:`llm2clip_vlm.data.synthetic` (3 short + 2 long captions per
    image), without drawing or writing images.
    """
    rng = random.Random(seed)
    records = []
    for i in range(n_images):
        scene = random_scene(rng)
        caps = [Caption(t, "short") for t in short_captions(scene, rng, SHORT_PER_IMAGE)]
        caps += [Caption(t, "long") for t in long_captions(scene, rng, LONG_PER_IMAGE)]
        records.append(ImageCaptions(key=f"{i:06d}", image="", captions=caps, source=f"demo scene {i}"))
    return records


def caption_tokenizer(
    records: list[ImageCaptions], vocab_size: int = 2048, extra: tuple[str, ...] = ()
) -> Any:
    """A byte-level BPE tokenizer trained on the captions (Llama-like: BOS in front, no EOS).

    Trained in memory, so a caption gets a realistic number of tokens (a word is one or two
    tokens, as with a real LLM's tokenizer) without any file. Left padding, pad = eos, as
    :func:`llm2clip_vlm.text.modeling.load_tokenizer` sets up.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [c.text for r in records for c in r.captions] + list(extra)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    out.padding_side = "left"
    out.pad_token = out.eos_token
    return out


def fused_adamw_kwargs(device: torch.device) -> dict[str, Any]:
    """``fused=True`` on CUDA (one kernel for all parameters); the default elsewhere."""
    return {"fused": True} if device.type == "cuda" else {}


def trainer_accelerator(precision: str, dev: torch.device) -> Any:
    """The accelerator the trainers' step runs under (``fp32`` or ``bf16``: its autocast).

    Raises:
        RuntimeError: ``dev`` is not accelerate's device (``--device cpu`` on a machine with a GPU):
            the trainers' step runs where accelerate puts it.
    """
    accelerator = dist.make_accelerator(precision)
    if accelerator.device.type != dev.type:
        raise RuntimeError(
            f"bench runs the trainers' own step, which runs on accelerate's device "
            f"({accelerator.device.type}), not {dev.type}: hide the GPU (CUDA_VISIBLE_DEVICES=) to bench the CPU"
        )
    return accelerator
