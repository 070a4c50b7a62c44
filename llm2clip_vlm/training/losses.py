"""The contrastive loss family shared by both stages, distributed-aware.

- :class:`SupervisedSimCSELoss` (stage 1): query captions against the positives and hard negatives
  of the *global* batch, cross-entropy over cosine similarity x scale (LLM2Vec / LLM2CLIP "CC").
- :class:`ClipLoss` (stage 2): symmetric InfoNCE with a learnable logit scale, open_clip's
  ``local_loss + gather_with_grad`` formulation: every rank scores its own rows against the
  global batch, and gradients flow back through the gather to the rank that produced a row.
- :class:`SigLipLoss` (stage 2 option): pairwise sigmoid loss with logit scale and bias.

Each takes already-computed features and works unchanged in one process or many: with
``torch.distributed`` uninitialised (or world size 1) the gather is the identity.

[IMPORTANT] Why the 1-process and N-process losses agree: rank r's loss is the mean over its
local rows; DDP averages parameter gradients over ranks, and the gather's backward sums the
gradients that other ranks' losses send to rank r's rows. Together that is exactly the gradient
of the mean over the global batch. Tests pin this with 2 gloo processes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def world_info() -> tuple[int, int]:
    """(rank, world_size) of the default process group, or (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0; gradients flow back to the owning rank."""
    _, world = world_info()
    if world == 1:
        return x
    import torch.distributed.nn.functional as dist_fn  # lazy: not every build ships it

    return torch.cat(dist_fn.all_gather(x.contiguous()), dim=0)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Gather without autograd, re-inserting the local tensor so its own gradient survives."""
    rank, world = world_info()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = x
    return torch.cat(parts, dim=0)


def _gather(x: torch.Tensor, with_grad: bool) -> torch.Tensor:
    return gather_with_grad(x) if with_grad else gather_no_grad(x)


class SupervisedSimCSELoss(nn.Module):
    """Supervised SimCSE with optional hard negatives, over the global batch.

    Row i of ``query`` is paired with row i of ``positive``; every other positive and every hard
    negative in the global batch is a negative for it.
    """

    def __init__(self, scale: float = 50.0, gather_with_grad: bool = True) -> None:
        super().__init__()
        self.scale = scale
        self.gather_with_grad = gather_with_grad

    def forward(
        self,
        query: torch.Tensor,
        positive: torch.Tensor,
        hard_negative: torch.Tensor | None = None,
    ) -> torch.Tensor:
        rank, _ = world_info()
        q = F.normalize(query.float(), dim=-1)
        candidates = [_gather(F.normalize(positive.float(), dim=-1), self.gather_with_grad)]
        if hard_negative is not None:
            candidates.append(_gather(F.normalize(hard_negative.float(), dim=-1), self.gather_with_grad))
        logits = q @ torch.cat(candidates, dim=0).T * self.scale
        labels = torch.arange(q.shape[0], device=q.device) + rank * q.shape[0]
        return F.cross_entropy(logits, labels)


class ClipLoss(nn.Module):
    """Symmetric CLIP InfoNCE (open_clip's ``ClipLoss`` with ``local_loss=True``)."""

    def __init__(self, gather_with_grad: bool = True) -> None:
        super().__init__()
        self.gather_with_grad = gather_with_grad

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
    ) -> torch.Tensor:
        rank, _ = world_info()
        all_image = _gather(image_features, self.gather_with_grad)
        all_text = _gather(text_features, self.gather_with_grad)
        logits_per_image = logit_scale * image_features @ all_text.T
        logits_per_text = logit_scale * text_features @ all_image.T
        labels = torch.arange(image_features.shape[0], device=image_features.device)
        labels = labels + rank * image_features.shape[0]
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss (SigLIP): every image-text pair of the global batch is a binary task.

    Each rank scores its local images against all texts; normalised by the local batch size as in
    the SigLIP paper, so the per-rank value equals the global one averaged over ranks.
    """

    def __init__(self, gather_with_grad: bool = True) -> None:
        super().__init__()
        self.gather_with_grad = gather_with_grad

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor,
    ) -> torch.Tensor:
        rank, _ = world_info()
        all_text = _gather(text_features, self.gather_with_grad)
        logits = logit_scale * image_features @ all_text.T + logit_bias
        n = image_features.shape[0]
        targets = -torch.ones_like(logits)
        idx = torch.arange(n, device=logits.device)
        targets[idx, idx + rank * n] = 1.0
        return -F.logsigmoid(targets * logits).sum() / n
