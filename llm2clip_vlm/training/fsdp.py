"""FSDP2 (torch's ``fully_shard``): the sharding strategy a recipe selects with ``loop.distributed: fsdp2``.

The same code runs under ``accelerate launch`` (the launcher only starts the processes and the
process group), ``torchrun``, or ``torch.multiprocessing`` on CPU processes over gloo (the tests):
accelerate's own FSDP wrapper is never used, because its launcher turns FSDP into DDP on a CPU.

- **Wrapping**: the model names its transformer blocks (a hook, as prismatic-vlms'
  ``get_fsdp_wrapping_policy``: :meth:`LLM2CLIP.fsdp_blocks`, :func:`llava.model.fsdp_blocks`); each
  block becomes one FSDP unit, then the root takes the rest. 0-d parameters (a logit scale) cannot
  be sharded: they stay whole on every rank and their gradient is averaged here.
- **Mixed precision**: :func:`mixed_precision` - on a GPU the recipe's precision for the gathered
  parameters (bf16) with fp32 gradient reduction and fp32 sharded master weights; fp32 on a CPU.
- **Sharded checkpoints**: :func:`save_sharded` / :func:`load_sharded` - ``torch.distributed.checkpoint``
  (DCP) with its safetensors storage (``HuggingFaceStorageWriter``: every rank writes its own
  shard) for the model and optimizer tensors, and JSON for the optimizer's scalar settings. No
  pickle is written or read: DCP's default ``.metadata`` file is a pickle, so it is not used.
- **Export**: :func:`full_state_dict` gathers the full weights on rank 0 (CPU) for the ordinary
  ``save_pretrained`` export.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from llm2clip_vlm.logging import get_logger
from llm2clip_vlm.training.checkpoint import SHARDED as SHARDED_DIR
from llm2clip_vlm.training.optim import DTYPES

log = get_logger(__name__)

SCALARS_FILE = "optimizer_settings.json"
_MODEL, _OPTIM = "model.", "optim."


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` was sharded by :func:`shard` (an FSDP2 module)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def mixed_precision(precision: str, device: torch.device) -> Any:
    """The ``MixedPrecisionPolicy`` of a run: the recipe's precision on a GPU, fp32 on a CPU.

    On a GPU with ``bf16`` (or ``fp16``) the parameters are all-gathered and computed in that dtype
    while gradients are reduced in fp32 and the sharded master weights stay fp32 (the optimizer
    steps in fp32). A CPU run keeps everything in fp32: CPU bf16 kernels are slow and the CPU runs
    are the ones compared tensor by tensor with unsharded runs.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device.type == "cpu" or precision == "fp32":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=DTYPES[precision], reduce_dtype=torch.float32)


def ensure_process_group(device: torch.device) -> None:
    """One process run without a launcher: a process group of one (FSDP needs a device mesh)."""
    if tdist.is_available() and not tdist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        tdist.init_process_group(backend, store=tdist.HashStore(), rank=0, world_size=1)


def shard(
    model: nn.Module,
    blocks: Iterable[nn.Module],
    precision: str,
    device: torch.device,
    forward_methods: Iterable[str] = (),
) -> nn.Module:
    """Shard ``model`` in place with ``fully_shard``: one unit per block, then the root.

    Args:
        model: the full model (on the CPU or the device; moved to ``device``).
        blocks: its transformer blocks (the model's wrapping hook), each one FSDP unit.
        precision: the loop's precision (``bf16`` / ``fp16`` / ``fp32``).
        device: this rank's device.
        forward_methods: methods other than ``forward`` that run the model (e.g. retrieval's
            ``get_image_features``); registered so they gather the parameters first.

    Returns:
        The same module, now an ``FSDPModule`` whose parameters are ``DTensor`` shards.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    ensure_process_group(device)
    mesh = init_device_mesh(device.type, (tdist.get_world_size(),))
    policy = mixed_precision(precision, device)
    # fully_shard refuses 0-d parameters (it shards along dim 0): keep them whole on every rank.
    scalars = {p for p in model.parameters() if p.ndim == 0}
    model.to(device)
    blocks = list(blocks)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, ignored_params=scalars)
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=scalars)
    world = tdist.get_world_size()
    for p in scalars:
        if p.requires_grad and world > 1:
            p.register_post_accumulate_grad_hook(_average_grad(world))
    for name in forward_methods:
        register_fsdp_forward_method(model, name)
    log.info(
        "FSDP2: %d blocks + root sharded over %d processes (%s), %d scalar parameters replicated",
        len(blocks), world, _describe(policy), len(scalars),
    )  # fmt: skip
    return model


def _describe(policy: Any) -> str:
    param = policy.param_dtype or torch.float32
    reduce = policy.reduce_dtype or param
    return f"params {str(param).removeprefix('torch.')}, reduce {str(reduce).removeprefix('torch.')}"


def _average_grad(world: int) -> Any:
    def hook(p: torch.Tensor) -> None:
        # A replicated parameter's gradient is this rank's part only (each rank's local loss):
        # average it as FSDP averages the sharded ones (gloo has no AVG op: sum, then divide).
        tdist.all_reduce(p.grad)
        p.grad.div_(world)

    return hook


def clip_grad_norm(parameters: Iterable[torch.nn.Parameter], max_norm: float) -> float:
    """Clip the global gradient norm over sharded (``DTensor``) and replicated gradients.

    Each sharded gradient adds its local squares, summed over ranks; a replicated one (the same on
    every rank) is added once. Returns the norm before clipping (the same on every rank).
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    sharded = [g.to_local() for g in grads if isinstance(g, DTensor)]
    whole = [g for g in grads if not isinstance(g, DTensor)]
    device = (sharded or whole)[0].device
    local = torch.zeros((), device=device, dtype=torch.float32)
    for g in sharded:
        local += g.detach().float().pow(2).sum()
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(local)
    for g in whole:
        local += g.detach().float().pow(2).sum()
    total = float(local.sqrt())
    coef = min(1.0, max_norm / (total + 1e-6))
    for g in grads:
        g.detach().mul_(coef)
    return total


def nonfinite_parameter(model: nn.Module) -> str | None:
    """The name of a parameter whose local shard holds NaN/inf (None: all finite), this rank only."""
    from torch.distributed.tensor import DTensor

    for name, p in model.named_parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        if local.numel() and not torch.isfinite(local.detach()).all():
            return name
    return None


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) weights on rank 0, on the CPU; ``{}`` on the other ranks.

    A collective: every rank must call it.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if tdist.get_rank() != 0:
        return {}
    return {k: v.detach().cpu() for k, v in state.items()}


def _state(model: nn.Module, optimizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors under ``model.`` / ``optim.`` names, the optimizer's non-tensor settings)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(flatten_optimizer_state_dict=True))
    tensors = {_MODEL + k: v for k, v in msd.items()}
    tensors.update({_OPTIM + k: v for k, v in osd.items() if isinstance(v, torch.Tensor)})
    settings = {k: v for k, v in osd.items() if not isinstance(v, torch.Tensor)}
    return tensors, settings


def save_sharded(folder: Path, model: nn.Module, optimizer: Any) -> None:
    """Write this rank's shards of the model and optimizer into ``folder/sharded`` (a collective).

    Tensors: DCP with its safetensors storage, each rank its own file. The optimizer's settings
    (lr per group, betas, ...) go to JSON (tuples recorded so they come back as tuples).
    """
    import torch.distributed.checkpoint as dcp

    tensors, settings = _state(model, optimizer)
    target = folder / SHARDED_DIR
    dcp.save(tensors, storage_writer=dcp.HuggingFaceStorageWriter(str(target), save_distributed=True))
    if tdist.get_rank() == 0:
        tuples = sorted(k for k, v in settings.items() if isinstance(v, tuple))
        doc = {"settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()},
               "tuples": tuples}  # fmt: skip
        path = target / SCALARS_FILE
        path.write_text(json.dumps(doc, indent=1))


def load_sharded(folder: Path, model: nn.Module, optimizer: Any) -> None:
    """Load what :func:`save_sharded` wrote into the sharded ``model`` and ``optimizer`` (a collective).

    The process count must be the one that wrote it only for the data position; DCP itself
    reshards tensors to the current mesh.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    source = folder / SHARDED_DIR
    tensors, _ = _state(model, optimizer)
    dcp.load(tensors, storage_reader=dcp.HuggingFaceStorageReader(str(source)))
    doc = json.loads((source / SCALARS_FILE).read_text())
    settings = {k: tuple(v) if k in set(doc["tuples"]) else v for k, v in doc["settings"].items()}
    optim = {k[len(_OPTIM) :]: v for k, v in tensors.items() if k.startswith(_OPTIM)}
    optim.update(settings)
    set_state_dict(
        model, optimizer,
        model_state_dict={k[len(_MODEL) :]: v for k, v in tensors.items() if k.startswith(_MODEL)},
        optim_state_dict=optim,
        options=StateDictOptions(flatten_optimizer_state_dict=True),
    )  # fmt: skip
