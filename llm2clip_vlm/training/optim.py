"""Optimiser pieces every stage shares: precision names, AdamW parameter groups, one lr schedule.

The schedule: a linear warm-up whose factor is ``(step + 1) / warmup`` (open_clip's and
LLM2CLIP's ``_warmup_lr``: the last warm-up step runs at the full lr; or ``step / warmup`` from
lr 0, transformers' schedules, for the stages whose reference ran on the HF Trainer), then cosine
or linear decay to 0 at the last step, or a constant lr.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from llm2clip_vlm.training.config import LoopConfig

# Precision name -> torch dtype of the weights/autocast, and -> accelerate's ``mixed_precision``.
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MIXED_PRECISION: dict[str, str] = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}


def warmup_steps(loop: LoopConfig, total_steps: int) -> int:
    """The warm-up length: ``loop.warmup_steps``, else ``ceil(warmup_ratio * total_steps)``."""
    if loop.warmup_steps > 0:
        return loop.warmup_steps
    return int(math.ceil(loop.warmup_ratio * total_steps))


def lr_factor(step: int, warmup: int, total: int, schedule: str, from_zero: bool = False) -> float:
    """The factor on every group's base lr for 0-based optimizer step ``step`` of ``total``.

    Warm-up: ``(step + 1) / warmup``, or ``step / warmup`` with ``from_zero`` (transformers').
    """
    if step < warmup:
        return (step + (0 if from_zero else 1)) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return max(0.0, float(total - step) / float(max(1, total - warmup)))
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, loop: LoopConfig, total_steps: int) -> Any:
    """A ``LambdaLR`` of :func:`lr_factor`, stepped once per optimizer step by the loop.

    It is never given to ``accelerator.prepare``: accelerate would step it once per process.
    """
    warmup = warmup_steps(loop, total_steps)
    schedule, from_zero = loop.schedule, loop.warmup_from_zero

    def factor(step: int) -> float:
        return lr_factor(step, warmup, total_steps, schedule, from_zero)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def grouped(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
    part_of: Callable[[str], tuple[str, float]],
    weight_decay: float,
    base_lr: float,
    no_decay: Callable[[str, torch.nn.Parameter], bool] | None = None,
) -> list[dict[str, Any]]:
    """AdamW parameter groups keyed by (part, decay / no decay), in first-seen order.

    Trainable parameters only. ``no_decay(name, p)`` picks the parameters without weight decay
    (default: the 0/1-d ones: biases, norm scales, a CLS token or a logit scale). ``part_of(name)`` gives the group name and lr of a
    parameter. Each group carries ``name`` (for logs and tests) and ``lr_scale`` (relative to
    ``base_lr``); :func:`adamw` drops ``name`` before building the optimiser.
    """
    groups: dict[tuple[str, bool], dict[str, Any]] = {}
    for name, p in named_parameters:
        if not p.requires_grad:
            continue
        exempt = no_decay(name, p) if no_decay is not None else p.ndim < 2
        part, lr = part_of(name)
        g = groups.setdefault(
            (part, exempt),
            {
                "name": f"{part}.{'no_decay' if exempt else 'decay'}",
                "params": [],
                "lr": lr,
                "lr_scale": lr / base_lr if base_lr else 1.0,
                "weight_decay": 0.0 if exempt else weight_decay,
            },
        )
        g["params"].append(p)
    return list(groups.values())


def adamw(
    groups: list[dict[str, Any]] | Iterable[torch.nn.Parameter],
    lr: float,
    device: torch.device,
    **kwargs: Any,
) -> torch.optim.AdamW:
    """AdamW over ``groups`` (``name`` keys dropped); fused (one kernel) on a GPU."""
    groups = list(groups)
    if groups and isinstance(groups[0], dict):
        groups = [{k: v for k, v in g.items() if k != "name"} for g in groups]
    kwargs.setdefault("fused", device.type == "cuda")
    return torch.optim.AdamW(groups, lr=lr, **kwargs)
