"""Distributed helpers: rank, world, collectives that every process must call, the accelerator.

Every function takes the run's ``accelerate.Accelerator`` (or None: one plain process), so library
code never reads ``RANK`` itself.
"""

from __future__ import annotations

from typing import Any

import torch

from llm2clip_vlm.training.optim import MIXED_PRECISION


def rank(accelerator: Any) -> int:
    return accelerator.process_index if accelerator is not None else 0


def world(accelerator: Any) -> int:
    return accelerator.num_processes if accelerator is not None else 1


def is_main(accelerator: Any) -> bool:
    return accelerator is None or accelerator.is_main_process


def barrier(accelerator: Any) -> None:
    if accelerator is not None and accelerator.num_processes > 1:
        accelerator.wait_for_everyone()


def any_rank(accelerator: Any, flag: bool) -> bool:
    """True if ``flag`` holds on any process (a collective: every process must call it)."""
    if accelerator is None or accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def reduce_float(accelerator: Any, value: torch.Tensor, reduction: str = "mean") -> float:
    """``value`` (a 0-d tensor on this rank) reduced over the processes, as a Python float."""
    return float(accelerator.reduce(value.detach(), reduction=reduction))


def sharded_optimizer(accelerator: Any) -> bool:
    """Under FSDP and DeepSpeed (ZeRO) each rank holds its own shard of the optimizer state."""
    if accelerator is None:
        return False
    return str(getattr(accelerator, "distributed_type", "")).endswith(("FSDP", "DEEPSPEED"))


def uses(accelerator: Any, kind: str) -> bool:
    """Whether the run is distributed as ``kind`` ("FSDP", "DEEPSPEED", "MULTI_GPU", ...)."""
    return str(getattr(accelerator, "distributed_type", "")).endswith(kind)


def process_state() -> Any:
    """This process's place in the run (accelerate's ``PartialState``; joins the process group).

    ``cpu=True`` without a GPU, as :func:`make_accelerator` asks: a ``PartialState`` made first
    without it would pin a CPU run launched on several processes to one process per rank.
    """
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def make_accelerator(precision: str) -> Any:
    """An ``Accelerator`` with the stage's precision, also after another stage ran in this process.

    accelerate keeps its state in a process-wide singleton and refuses a second Accelerator with
    another ``mixed_precision`` (``build-tower`` runs stage 1 and stage 2 in one process, and so
    does a test session). accelerate has no public way to change it; the one documented exception
    in this package is the reset below, which keeps the process group (``PartialState``) intact.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    mixed = MIXED_PRECISION[precision]
    shared = AcceleratorState._shared_state
    if shared and str(shared.get("_mixed_precision", mixed)) != mixed:
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available())
