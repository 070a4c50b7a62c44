"""How long a ``build-tower`` run will take on this machine, printed before it starts.

A FLOP count of each stage's planned work (from the config and a sample of the captions) divided
by the fp32 matmul rate this process measures on the spot (``calibrate``, ~0.2 s on one thread, so
a busy machine gives a longer estimate, scaled to the run's torch threads by the speed-up small
models measured here), times one efficiency factor per kind of work: a caption encoder on short
sequences and a small ViT with its loader and evaluation reach only part of the matmul rate. The
factors are fitted to measured demo runs (docs/BENCHMARKS.md), so the estimate is a guide (within
~20% on the demo on an idle machine), not a promise.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from llm2clip_vlm.data.records import ImageCaptions
from llm2clip_vlm.text.modeling import load_tokenizer, resolve_model_ref
from llm2clip_vlm.text.simcse import same_kind_pairable

if TYPE_CHECKING:  # the recipe schema stays above this module (type hints only)
    from llm2clip_vlm.recipe import RunConfig

# Share of the measured one-thread matmul rate each kind of work reaches, fitted on this
# project's 2-core AMD EPYC (fp32; docs/BENCHMARKS.md): a 384x384 matmul ran at 62 GFLOP/s on one
# thread, a SmolLM2-135M forward over 64 x 16 tokens at 4.3 ms/token (0.79 of it). Fitted to the
# whole-stage wall times of idle 2-thread demo builds (model loading, CRA, padding, the loader,
# evaluation and checkpoints included; builds of 12-02: 14:35, 15:16 and 10:46, the VM's speed
# varying by ~20% between them): stage 1's caption passes at 0.75, the store pass (batches of
# 64, sorted by length) at 1.0, stage 2's ViT at 0.29, and a stage-1 training step at
# 1 + 2.75 x (the LoRA layers' share) forwards (a backward through LoRA layers with small batches
# costs more than the textbook 2x), plus 0.75 of a forward when LoRA dropout is on: torch draws
# the dropout masks on a CPU with a serial bernoulli_ (0.6 of 2.2 s in a demo step's forward).
# The estimate errs long when the VM runs fast (12:32 for the 10:46 build).
LLM_EFFICIENCY = 0.75
EMBED_EFFICIENCY = 1.0
VIT_EFFICIENCY = 0.29
BACKWARD_FACTOR = 2.75
DROPOUT_FACTOR = 0.75
VIT_BACKWARD_FACTOR = 2.0  # the ViT's backward at about twice its forward
# Speed-up of n torch threads over one on these small models: n ** 0.6 (2 threads: 1.5x; measured
# 1.4-1.7x for SmolLM2-135M steps and passes, where a large matmul gets ~2x).
THREAD_EXPONENT = 0.6


@dataclass
class LLMShape:
    non_embedding_params: float
    layers: int


def calibrate(seconds: float = 0.2, size: int = 384) -> float:
    """Effective fp32 FLOP/s of this process now: the one-thread matmul rate under the current
    machine load, times the speed-up of the current torch threads (``THREAD_EXPONENT``)."""
    threads = torch.get_num_threads()
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.set_num_threads(1)
    try:
        a @ b  # warm-up
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            n += 1
        rate = n * 2.0 * size**3 / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return rate * threads**THREAD_EXPONENT


def llm_shape(model: str) -> LLMShape | None:
    """Size of the stage-1 LLM from its config (None when it cannot be read offline)."""
    try:
        from transformers import AutoConfig

        ref = resolve_model_ref(model)
        c = AutoConfig.from_pretrained(ref.path, **ref.kwargs())
    except Exception:  # an estimate is optional: a model that cannot be read gets none
        return None
    d, layers = int(c.hidden_size), int(c.num_hidden_layers)
    ffn = int(getattr(c, "intermediate_size", 4 * d))
    heads = int(c.num_attention_heads)
    kv = int(getattr(c, "num_key_value_heads", heads) or heads)
    attn = 2 * d * d + 2 * d * (d * kv // heads)
    return LLMShape(layers * (attn + 3 * d * ffn), layers)


def _mean_tokens(tokenizer: Any, texts: Sequence[str], max_length: int, multiple: int) -> float:
    """Mean padded length of ``texts`` (a sample), capped at ``max_length``."""
    if not texts:
        return 0.0
    lengths = [min(max_length, len(ids)) for ids in tokenizer(list(texts))["input_ids"]]
    multiple = max(1, multiple)  # 0 = no rounding
    return sum(math.ceil(n / multiple) * multiple for n in lengths) / len(lengths)


def _same_kind_long_share(record: ImageCaptions) -> float:
    """The share of long captions in the ``same_kind`` pairs one image gives (see text.simcse)."""
    pairable = same_kind_pairable(record.captions)
    return sum(k == "long" for k in pairable) / len(pairable) if pairable else 0.5


def estimate_build(
    cfg: RunConfig,
    train: Sequence[ImageCaptions],
    heldout: dict[str, Sequence[ImageCaptions]],
    rate: float | None = None,
) -> dict[str, float] | None:
    """Seconds per stage (``stage1``, ``embed``, ``stage2``, ``total``); None if the LLM is unknown."""
    shape = llm_shape(cfg.stage1.model)
    if shape is None or not train:
        return None
    rate = rate or calibrate()
    s1, s2, emb = cfg.stage1, cfg.stage2, cfg.embed
    tok = load_tokenizer(resolve_model_ref(s1.model))
    sample = list(train[:256])
    short = [c.text for r in sample for c in r.captions if c.kind == "short"]
    long = [c.text for r in sample for c in r.captions if c.kind == "long"]
    t_short = _mean_tokens(tok, short, s1.max_length, s1.pad_to_multiple_of)
    t_long = _mean_tokens(tok, long, s1.max_length, s1.pad_to_multiple_of) or t_short
    # Seconds per caption token of a forward at the full matmul rate; each kind of pass reaches a share.
    token_seconds = 2.0 * shape.non_embedding_params / rate
    per_token = token_seconds / LLM_EFFICIENCY

    # Stage 1: each step embeds query + positive (+ negative), forward through every layer and
    # backward through the layers that carry LoRA; CRA before and after on short captions.
    steps = s1.loop.max_steps or math.ceil(s1.loop.epochs * len(train) / s1.batch_size)
    lora_share = min(1.0, s1.lora.top_layers / shape.layers) if s1.lora.top_layers else 1.0
    seqs = s1.batch_size * (3 if s1.hard_negatives else 2)
    # Cross-kind pairs are half short, half long; "any" pairs draw captions as the images hold them;
    # same-kind pairs are long with the share of images whose coin (among their kinds with 2+
    # captions) says long.
    if s1.pairing == "cross_kind":
        long_share = 0.5
    elif s1.pairing == "same_kind":
        long_share = sum(_same_kind_long_share(r) for r in sample) / len(sample)
    else:
        long_share = len(long) / max(1, len(short) + len(long))
    step_tokens = seqs * ((1 - long_share) * t_short + long_share * t_long)
    dropout = DROPOUT_FACTOR if s1.lora.dropout > 0 else 0.0
    stage1 = steps * step_tokens * per_token * (1 + dropout + BACKWARD_FACTOR * lora_share)
    stage1 += 2 * min(s1.cra_captions or 10**9, 2 * len(heldout.get("short", []))) * t_short * per_token

    # Embed: every kept training caption and every held-out caption, once (max_length of embed).
    keep = emb.train_captions_per_kind or 10**9
    n_short = sum(min(keep, len(r.of_kind("short"))) for r in train)  # type: ignore[arg-type]
    n_long = sum(min(keep, len(r.of_kind("long"))) for r in train)  # type: ignore[arg-type]
    # The store pads its batches to embed.pad_to_multiple_of (0: as stage 1 did).
    multiple = emb.pad_to_multiple_of or s1.pad_to_multiple_of
    e_short = _mean_tokens(tok, short, s1.max_length, multiple)
    e_long = _mean_tokens(tok, long, s1.max_length, multiple) or e_short
    embed_tokens = n_short * e_short + n_long * e_long
    for records in heldout.values():
        for r in records[:2000]:
            embed_tokens += len(r.of_kind("short")) * e_short + len(r.of_kind("long")) * e_long  # type: ignore[arg-type]
    embed = embed_tokens * token_seconds / EMBED_EFFICIENCY

    # Stage 2: a random ViT of the configured size (a pretrained one: not estimated here).
    b = s2.backbone
    tokens = (b.image_size // b.patch_size) ** 2 + 1
    vit_params = b.num_layers * 12 * b.hidden_size**2 + 3 * b.patch_size**2 * b.hidden_size
    steps2 = s2.loop.max_steps or math.ceil(s2.loop.epochs * len(train) / s2.batch_size)
    per_image = 2.0 * vit_params * tokens * (1 + VIT_BACKWARD_FACTOR)
    stage2 = steps2 * s2.batch_size * per_image / (rate * VIT_EFFICIENCY)
    stage2 *= 1.0 if not b.name_or_path else float("nan")
    n_held = sum(len(v) for v in heldout.values())
    stage2 += 2 * n_held * 2.0 * vit_params * tokens / (rate * VIT_EFFICIENCY)  # before and after
    out = {"stage1": stage1, "embed": embed, "stage2": stage2}
    out["total"] = sum(out.values())
    return out


def format_estimate(est: dict[str, float], threads: int) -> str:
    def mmss(x: float) -> str:
        return "?" if math.isnan(x) else f"{int(x // 60)}:{int(x % 60):02d}"

    return (
        f"expected duration on this machine now ({threads} torch threads): ~{mmss(est['total'])} "
        f"(stage 1 {mmss(est['stage1'])}, embed {mmss(est['embed'])}, stage 2 {mmss(est['stage2'])}); "
        "more if other jobs start sharing the CPU"
    )
