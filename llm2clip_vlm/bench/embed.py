"""``bench embed``: the caption-embedding pass (``write_store``), with and without length bucketing.

Each call writes the demo caption mix (generated in memory: 3 short + 2 long captions per scene)
into a fresh store with the package's real writer and a random-weight bidirectional LLM, then
deletes it. Reported per variant: captions/s, tokens/s (caption tokens, and tokens the model
computed, padding included), the padding share of computed tokens, and on a GPU the share of the
device's dense bf16 peak that the model FLOPs reach (see :mod:`llm2clip_vlm.bench.flops`).
Targets: bucketing keeps padding under 10% of computed tokens; an 8B model reaches at
least 50% of the bf16 peak on a GPU.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from llm2clip_vlm.bench.common import (
    LLAMA3_8B,
    LLMShape,
    caption_tokenizer,
    count_params,
    demo_captions,
    llama_config,
    non_embedding_params,
    resolve_run,
)
from llm2clip_vlm.bench.flops import batches_flops, bf16_peak_flops, peak_share
from llm2clip_vlm.bench.harness import (
    BenchReport,
    cpu_threads,
    device_name,
    measure,
    paired_ratio,
    peak_mb,
)
from llm2clip_vlm.data.records import Caption, ImageCaptions
from llm2clip_vlm.store.config import EmbedConfig
from llm2clip_vlm.store.writer import bucket_batches, write_store
from llm2clip_vlm.text.encoder import CaptionEncoder
from llm2clip_vlm.text.modeling import bidirectional_from_config
from llm2clip_vlm.training.optim import DTYPES

TARGET_PADDING_SHARE = 0.10
TARGET_PEAK_SHARE = 0.50


@dataclass(frozen=True)
class EmbedPreset:
    """One benchmark set-up."""

    llm: LLMShape
    images: int
    batch_size: int
    # Weight dtype and the writer's compute precision (autocast).
    dtype: str
    precision: str
    pad_to_multiple_of: int
    max_length: int
    device: str
    warmup: int
    repeats: int
    # Use the model's own vocabulary size (reference) instead of the tokenizer's (tiny).
    full_vocab: bool = False
    # Each caption repeated this many times (length sweeps; 1 = the demo mix as is).
    caption_repeat: int = 1
    # Intra-op CPU threads (None = torch's default); see harness.cpu_threads.
    cpu_threads: int | None = None


PRESETS: dict[str, EmbedPreset] = {
    # A 4-layer 256-d Llama (3.5M parameters) on 1000 demo captions: seconds per pass on a CPU.
    # No rounding of batch lengths (pad_to_multiple_of 1): the demo captions are ~30 tokens, and
    # rounding up to 16 alone wastes ~25% of the computed tokens (measured: 29% padding and 1.6x
    # slower than 1, fp32 on this CPU).
    "tiny": EmbedPreset(
        LLMShape(256, 896, 4, 4, 2, 0), 200, 64, "fp32", "fp32", 1, 512, "cpu", 1, 3, cpu_threads=1
    ),
    # The GPU proof's dry run (scripts/gpu-proof.sh --dry-run): the tiny pass on 16 images' captions.
    "dry": EmbedPreset(
        LLMShape(256, 896, 4, 4, 2, 0), 16, 32, "fp32", "fp32", 1, 512, "cpu", 0, 1, cpu_threads=1
    ),
    # Llama-3-8B-Instruct's shape, random bf16 weights, 10000 captions, batch 256: for GPUs.
    "llama3-8b": EmbedPreset(LLAMA3_8B, 2000, 256, "bf16", "bf16", 1, 512, "cuda", 1, 3, full_vocab=True),
}


def repeat_captions(records: list[ImageCaptions], k: int) -> list[ImageCaptions]:
    """Each caption's text repeated ``k`` times (same number of captions, ``k`` x the tokens)."""
    if k == 1:
        return records
    return [
        dataclasses.replace(r, captions=[Caption(" ".join([c.text] * k), c.kind) for c in r.captions])
        for r in records
    ]


def run(
    preset: str,
    *,
    device: str | None = None,
    warmup: int | None = None,
    repeats: int | None = None,
) -> BenchReport:
    """Measure preset ``preset``; ``device``/``warmup``/``repeats`` override the preset's.

    Raises:
        RuntimeError: a CUDA device was asked for and there is none.
    """
    p = PRESETS[preset]
    dev, warmup, repeats = resolve_run(preset, p, device, warmup, repeats)

    records = repeat_captions(demo_captions(p.images, seed=0), p.caption_repeat)
    tokenizer = caption_tokenizer(demo_captions(200, seed=1))
    config = llama_config(p.llm, None if p.full_vocab else len(tokenizer))
    torch.manual_seed(0)
    model = bidirectional_from_config(config, dtype=DTYPES[p.dtype], device=dev)
    encoder = CaptionEncoder(model, tokenizer, p.max_length, pad_to_multiple_of=p.pad_to_multiple_of)
    # Random weights: hashing them (the store's provenance) is not what is measured here.
    encoder._identity = "bench-embed-random-weights"
    texts = [c.text for r in records for c in r.captions]
    cfg = EmbedConfig(dtype="bf16", batch_size=p.batch_size, shard_size=len(texts), precision=p.precision)  # type: ignore[arg-type]

    tokens: dict[str, dict[str, Any]] = {}
    counter = itertools.count()
    with tempfile.TemporaryDirectory(prefix="bench-embed-") as tmp, cpu_threads(p.cpu_threads, dev):

        def write(name: str, bucket: bool) -> None:
            out = Path(tmp) / f"{name}-{next(counter)}"
            write_store(encoder, records, out, dataclasses.replace(cfg, bucket_by_length=bucket))
            tokens[name] = json.loads((out / "manifest.json").read_text())["tokens"]
            shutil.rmtree(out)

        timings = measure(
            {"bucketed": lambda: write("bucketed", True), "unbucketed": lambda: write("unbucketed", False)},
            device=dev,
            warmup=warmup,
            repeats=repeats,
            items_per_call=len(texts),
            description=f"bench embed [{preset}]",
        )
        dev_name = device_name(dev)  # inside: it names the thread count used

    # FLOPs of the passes, from the same lengths and batches the writer used.
    lengths = [len(x) for x in tokenizer(texts, truncation=True, max_length=p.max_length)["input_ids"]]
    n_params = non_embedding_params(model)
    attn_dim = p.llm.hidden_size
    model_flops = batches_flops(n_params, p.llm.num_layers, attn_dim, [lengths])
    peak = bf16_peak_flops(dev_name) if dev.type == "cuda" else None
    m = p.pad_to_multiple_of
    variants: dict[str, dict[str, Any]] = {}
    for t in timings:
        batches = bucket_batches(lengths, p.batch_size, t.name == "bucketed")
        padded = [[m * math.ceil(max(lengths[i] for i in b) / m)] * len(b) for b in batches]
        hw_flops = batches_flops(n_params, p.llm.num_layers, attn_dim, padded)
        tok = tokens[t.name]
        variants[t.name] = {
            "captions_per_s": round(t.items_per_s, 2),
            "tokens_per_s": round(tok["real"] / t.median_s, 1),
            "computed_tokens_per_s": round(tok["computed"] / t.median_s, 1),
            "real_tokens": tok["real"],
            "computed_tokens": tok["computed"],
            "padding_share": tok["padding_share"],
            "model_tflops_per_s": round(model_flops / t.median_s / 1e12, 4),
            "hardware_tflops_per_s": round(hw_flops / t.median_s / 1e12, 4),
            "peak_share": peak_share(model_flops, t.median_s, peak),
            "peak_mem_mb": peak_mb(t),
        }
    by_name = {t.name: t for t in timings}
    results = {
        "captions": len(texts),
        "mean_tokens_per_caption": round(sum(lengths) / len(lengths), 1),
        "model_params": count_params(model),
        "model_non_embedding_params": n_params,
        "bucketing_speedup": paired_ratio(by_name["unbucketed"], by_name["bucketed"]),
        "padding_share_bucketed": tokens["bucketed"]["padding_share"],
        "padding_share_unbucketed": tokens["unbucketed"]["padding_share"],
        "target_padding_share": TARGET_PADDING_SHARE,
        "bf16_peak_tflops": None if peak is None else peak / 1e12,
        "target_peak_share": TARGET_PEAK_SHARE if dev.type == "cuda" else None,
    }
    settings = {**asdict(p), "warmup": warmup, "repeats": repeats, "device": str(dev)}
    return BenchReport(
        suite="embed",
        preset=preset,
        device=dev_name,
        settings=settings,
        timings=timings,
        results=results,
        variants=variants,
        memory_note="" if dev.type == "cuda" else "CPU peak = process peak RSS during one call",
    )
