"""``bench tower``: time per batch of ``LLM2CLIPVisionTower`` vs the raw transformers vision model.

Both variants run the same weights (the tower's own wrapped model), on the same input tensor,
in the same dtype, under ``no_grad``: "raw" is ``model(pixel_values=x, output_hidden_states=True)``,
what LLaVA's code would call; "tower" is ``tower(x)``. The tower is a random-weight model saved
in the exported format and loaded through the tower's real ``from_pretrained`` path.
Target: overhead <= 2% per batch.
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Literal

import torch

from llm2clip_vlm.adapters.llava.tower import LLM2CLIPVisionTower
from llm2clip_vlm.bench.harness import (
    BenchReport,
    device_name,
    measure,
    paired_ratio,
    process_peak_rss,
    resolve_device,
)
from llm2clip_vlm.tower.synthetic import VIT_L_14_336, TowerShape, save_random_tower
from llm2clip_vlm.training.optim import DTYPES

TARGET_OVERHEAD_PCT = 2.0


@dataclass(frozen=True)
class TowerPreset:
    """One benchmark set-up."""

    kind: Literal["clip", "siglip"]
    shape: TowerShape
    batch_size: int
    dtype: Literal["fp32", "bf16", "fp16"]
    # Default device when the command gives none.
    device: str
    warmup: int
    repeats: int


_TINY = TowerShape(
    image_size=224, patch_size=16, hidden_size=192, num_layers=6, num_heads=3, intermediate_size=768
)

PRESETS: dict[str, TowerPreset] = {
    # A small ViT at LLaVA's token count scale (196 patches), sized for a 2-core CPU.
    # Short calls (batch 4), so each back-to-back pair sees the same load on a shared machine.
    "tiny": TowerPreset("clip", _TINY, 4, "fp32", "cpu", 5, 60),
    "tiny-siglip": TowerPreset("siglip", _TINY, 4, "fp32", "cpu", 5, 60),
    # A one-layer 32-px tower, batch 1: the call is so short that the wrapper's fixed cost shows.
    "micro": TowerPreset("clip", TowerShape(32, 8, 32, 1, 2, 64), 1, "fp32", "cpu", 50, 500),
    # LLaVA-1.5's tower shape (ViT-L/14-336, 576 patches), random weights, for GPUs.
    "vit-l-14-336": TowerPreset("clip", VIT_L_14_336, 16, "bf16", "cuda", 10, 50),
}


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
    dev = resolve_device(device or p.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"preset {preset!r} runs on a GPU and none is available; pass --device cpu to force it"
        )
    dtype = DTYPES[p.dtype]
    warmup = p.warmup if warmup is None else warmup
    repeats = p.repeats if repeats is None else repeats

    with tempfile.TemporaryDirectory(prefix="bench-tower-") as tmp:
        path = save_random_tower(tmp, p.kind, p.shape, seed=0)
        args = SimpleNamespace(mm_vision_select_layer=-2, mm_vision_select_feature="patch")
        tower = LLM2CLIPVisionTower(f"llm2clip:{path}", args, delay_load=True)
        tower.load_model()
    tower.to(device=dev, dtype=dtype)
    raw = tower.vision_tower
    s = p.shape.image_size
    x = torch.randn(p.batch_size, 3, s, s, generator=torch.Generator().manual_seed(0)).to(
        device=dev, dtype=dtype
    )

    def call_raw() -> object:
        with torch.no_grad():
            return raw(pixel_values=x, output_hidden_states=True)

    def call_tower() -> object:
        return tower(x)

    timings = measure(
        {"raw": call_raw, "tower": call_tower},
        device=dev,
        warmup=warmup,
        repeats=repeats,
        items_per_call=p.batch_size,
        description=f"bench tower [{preset}]",
    )
    by_name = {t.name: t for t in timings}
    overhead = 100.0 * (paired_ratio(by_name["tower"], by_name["raw"]) - 1.0)
    of_medians = 100.0 * (by_name["tower"].median_s / by_name["raw"].median_s - 1.0)
    # The wrapper's own cost per call (tower minus raw, back-to-back pairs), in microseconds.
    wrapper_us = 1e6 * statistics.median(
        t - r for t, r in zip(by_name["tower"].times_s, by_name["raw"].times_s, strict=True)
    )
    # Load from other processes only ever adds time: the fastest call is the least disturbed.
    of_minima = 100.0 * (min(by_name["tower"].times_s) / min(by_name["raw"].times_s) - 1.0)
    settings = {**asdict(p), "warmup": warmup, "repeats": repeats, "device": str(dev)}
    memory_note = "" if dev.type == "cuda" else f"process peak RSS {process_peak_rss() / 2**20:.0f} MiB"
    return BenchReport(
        suite="tower",
        preset=preset,
        device=device_name(dev),
        settings=settings,
        timings=timings,
        results={
            "tokens_per_image": tower.tokens_per_image,
            "overhead_pct": overhead,
            "overhead_pct_of_medians": of_medians,
            "overhead_pct_of_minima": of_minima,
            "wrapper_us_per_call": wrapper_us,
            "target_overhead_pct": TARGET_OVERHEAD_PCT,
            "within_target": overhead <= TARGET_OVERHEAD_PCT,
        },
        memory_note=memory_note,
    )
