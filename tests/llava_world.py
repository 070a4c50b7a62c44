"""The tiny LLaVA world the LLaVA training, streaming and FSDP tests train on: the synthetic demo
splits at 32 px, a random 2-layer CLIP tower and a tiny random Llama."""

from __future__ import annotations

from pathlib import Path

from llm2clip_vlm.data.synthetic_llava import write_llava_demo
from llm2clip_vlm.text.tiny import save_tiny_llm
from llm2clip_vlm.tower.synthetic import TowerShape, save_random_tower


def write_llava_world(root: Path, heldout_images: int) -> dict[str, Path]:
    """``{"data", "tower", "llm"}`` under ``root``: 24 pretraining and 24 instruction images.

    Two text-only instruction records (``text_only_share`` 0.2 draws two here): the leftover batch
    of an epoch (ModalityBatchSampler) is trimmed to a multiple of the process count, so with an
    odd leftover one and two processes would train on different batches."""
    data = root / "data"
    write_llava_demo(
        data,
        pretrain_images=24,
        instruct_images=24,
        heldout_images=heldout_images,
        image_size=32,
        text_only_share=0.2,
    )
    return {
        "data": data,
        "tower": save_random_tower(root / "tower", "clip", TowerShape(32, 8, 32, 3, 2, 64), seed=1),
        "llm": save_tiny_llm(root / "llm", hidden_size=64, seed=2),  # bnb 4-bit needs multiples of 64
    }
