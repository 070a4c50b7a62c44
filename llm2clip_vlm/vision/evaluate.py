"""Stage-2 zero-shot retrieval on held-out sets, with the model being trained (any wrapper)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from llm2clip_vlm.logging import get_logger
from llm2clip_vlm.vision.data import HeldoutSet, ImageList, ImageLoader
from llm2clip_vlm.vision.retrieval import retrieval_metrics

log = get_logger(__name__)


@torch.no_grad()
def evaluate_retrieval(
    model: nn.Module,
    heldout: dict[str, HeldoutSet],
    image_processor: Any,
    load_image: ImageLoader,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    autocast: Callable[[], Any],
    similarities: dict[str, torch.Tensor] | None = None,
) -> dict[str, dict[str, float | int]]:
    """Zero-shot retrieval metrics of every held-out set (``model`` may be DDP/FSDP-wrapped).

    Every process runs it (an FSDP model needs all ranks in its forward); only the main one writes.
    ``similarities``, when given, receives each set's ``[images, captions]`` similarity matrix.
    """
    was_training = model.training
    model.eval()
    results = {}
    for name, hs in heldout.items():
        loader = DataLoader(
            ImageList(hs.records, image_processor, load_image), batch_size=batch_size, num_workers=num_workers
        )
        image_features = []
        for pv in loader:
            with autocast():
                image_features.append(model(pixel_values=pv.to(device))["image_features"].float())
        text_features = []
        for start in range(0, len(hs.text_embeddings), batch_size):
            emb = hs.text_embeddings[start : start + batch_size].to(device)
            with autocast():
                text_features.append(model(text_embeddings=emb)["text_features"].float())
        sim = torch.cat(image_features) @ torch.cat(text_features).T
        results[name] = retrieval_metrics(sim.cpu(), hs.caption_image)
        if similarities is not None:
            similarities[name] = sim.cpu()
    model.train(was_training)
    return results


def log_retrieval(when: str, results: dict[str, Any]) -> None:
    for name, m in results.items():
        log.info(
            "retrieval %s on %s (%d images, %d captions): I2T R@1/5/10 %.1f/%.1f/%.1f  T2I %.1f/%.1f/%.1f",
            when, name, m["n_images"], m["n_captions"], m["i2t_r1"], m["i2t_r5"], m["i2t_r10"],
            m["t2i_r1"], m["t2i_r5"], m["t2i_r10"],
        )  # fmt: skip
