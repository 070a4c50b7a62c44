"""A warning when stage 2's features collapse: every image and every caption mapped to one point.

From-scratch towers with a high learning rate can fall into this state (measured on the glyph
world, docs/BENCHMARKS.md): the contrastive loss then sits at ln(batch) with vanishing gradients
and nothing more is learned, however long the run. The loop cannot tell that from slow learning by
the loss alone, but the features show it at once: their mean pairwise cosine within a batch is ~1.
"""

from __future__ import annotations

import torch

from llm2clip_vlm.logging import get_logger

log = get_logger(__name__)

# Mean pairwise cosine above which a batch's features count as collapsed (a healthy batch of
# distinct images sits far below, even early in training).
COLLAPSED_COSINE = 0.995


def mean_pairwise_cosine(features: torch.Tensor) -> float:
    """Mean cosine between distinct rows of L2-normalised ``features`` ``[B, D]``."""
    n = features.shape[0]
    if n < 2:
        return 0.0
    f = features.detach().float()
    total = (f.sum(0) @ f.sum(0)).item()  # sum over all pairs, the diagonal (n ones) included
    return (total - n) / (n * (n - 1))


class CollapseWatch:
    """Warns once when ``patience`` consecutive steps have collapsed image and caption features."""

    def __init__(self, patience: int = 20) -> None:
        self.patience, self.run, self.warned = patience, 0, False

    def update(self, step: int, image_features: torch.Tensor, text_features: torch.Tensor) -> bool:
        """Record one step; True when this call logged the warning."""
        collapsed = (
            min(mean_pairwise_cosine(image_features), mean_pairwise_cosine(text_features)) > COLLAPSED_COSINE
        )
        self.run = self.run + 1 if collapsed else 0
        if self.run < self.patience or self.warned:
            return False
        self.warned = True
        log.warning(
            "stage 2 has collapsed (step %d): for %d steps every image and every caption got the same "
            "features, so the loss stays at ln(batch) and nothing more is learned. Restart it with a "
            "lower stage2.lr / stage2.head_lr or a longer stage2.loop.warmup_steps",
            step, self.run,
        )  # fmt: skip
        return True
