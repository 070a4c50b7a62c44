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


def wants_fsdp2(accelerator: Any, distributed: str) -> bool:
    """Whether a run shards with FSDP2 (:mod:`llm2clip_vlm.training.fsdp`).

    ``loop.distributed: fsdp2`` in the recipe, or an accelerate launcher config whose
    ``distributed_type`` is FSDP (``recipes/accelerate/fsdp-8gpu.yaml``): both take the same
    path, so a run behaves alike under ``accelerate launch`` on GPUs, ``torchrun``, and the CPU
    processes the tests start (where accelerate's launcher would turn FSDP into DDP).
    """
    return distributed == "fsdp2" or uses(accelerator, "FSDP")


def process_state() -> Any:
    """This process's place in the run (accelerate's ``PartialState``; joins the process group).

    ``cpu=True`` without a GPU, as :func:`make_accelerator` asks: a ``PartialState`` made first
    without it would pin a CPU run launched on several processes to one process per rank.
    """
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


class PrecisionConflictError(ValueError):
    """A second stage in one process asks accelerate for another mixed precision than the first.

    A user error (the CLI prints it as one line: ``errors.describe``), defined here so that this
    layer does not import the CLI's error module.
    """


def make_accelerator(precision: str) -> Any:
    """An ``Accelerator`` with the stage's precision (``fp32`` = accelerate's ``"no"``).

    accelerate keeps its state in a process-wide singleton that fixes one ``mixed_precision`` per
    process, refuses a second Accelerator with another one and has no public way to change it
    ("restart your runtime completely"). So one process runs its stages at one precision:
    ``build-tower`` checks that before its first stage (:func:`check_one_precision`), and a
    program that calls two trainers with different precisions gets one clear line instead of
    accelerate's ValueError.
    """
    from accelerate import Accelerator

    mixed = MIXED_PRECISION[precision]
    try:
        return Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available())
    except ValueError as e:
        if "already been initialized" not in str(e):
            raise
        raise PrecisionConflictError(
            f"this process already runs accelerate at another mixed precision and this stage asks for "
            f"{precision}: accelerate fixes one per process; give every stage of the command the same "
            f"loop.precision, or run the stages as separate commands"
        ) from None


def check_one_precision(precisions: dict[str, str]) -> None:
    """Refuse, before any work, stages of one process that ask for different precisions.

    Args:
        precisions: stage name -> its ``loop.precision``, for the stages this process will train.
    """
    if len(set(precisions.values())) > 1:
        listed = ", ".join(f"{name}.loop.precision={p}" for name, p in precisions.items())
        raise PrecisionConflictError(
            f"{listed}: one process runs at one mixed precision (accelerate fixes it per process); "
            f"set them equal, or run the stages as separate commands"
        )
