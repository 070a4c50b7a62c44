"""Per-GPU bytes of weights, gradients and optimizer state under each distributed strategy, and
the distributed strategy an accelerate config file names.

With AdamW (two moments per trainable parameter, in the parameter's dtype):

- ``ddp`` (accelerate's MULTI_GPU, or one process): every rank holds the whole model, the
  gradients, and DDP's gradient buckets (``gradient_as_bucket_view`` is off by default, so the
  bucket is a second copy of the gradients; one process has no buckets), and the whole optimizer;
- ``fsdp`` (FULL_SHARD) / ``zero3``: everything sharded over the ranks, plus the parameters of
  the block being gathered and the next one (prefetch), in 16-bit;
- ``fsdp-grad-op`` (SHARD_GRAD_OP) / ``zero2``: whole weights, sharded gradients and optimizer;
- DeepSpeed (``zero1``-``zero3``) under bf16 turns the model to bf16 and keeps an fp32 master
  copy with the moments in the optimizer: 2 + 2 + 12 bytes per trainable parameter before
  sharding (Rajbhandari et al. 2020, "ZeRO", section 3), 2 per frozen one.

4-bit (QLoRA) weights keep their NF4 bytes under every strategy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from llm2clip_vlm.plan.meta import NF4_BYTES, Counts

STRATEGIES = ("ddp", "fsdp", "fsdp-grad-op", "zero1", "zero2", "zero3")
# CUDA context, cuBLAS/NCCL workspaces and the caching allocator's fragmentation: a fixed part
# and a share of everything else (a rule of thumb; the GPU proof measures it).
RUNTIME_FIXED_GIB = 2.0
FRAGMENTATION = 0.05


@dataclass(frozen=True)
class Distributed:
    """A distributed strategy, where it was read, and the processes that config starts."""

    strategy: str
    source: str
    num_processes: int | None = None


DEFAULT = Distributed("ddp", "accelerate's default (DDP; no --config_file in the recipe)")


def read_accelerate(path: Path) -> Distributed:
    """The strategy of an accelerate config file (``recipes/accelerate/*.yaml``).

    Raises:
        ValueError: unreadable file or a distributed type plan does not model.
    """
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: not a readable accelerate config ({e})") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: not an accelerate config (expected a mapping)")
    kind = str(raw.get("distributed_type", "NO")).upper()
    n = raw.get("num_processes")
    if kind in ("NO", "MULTI_GPU"):
        strategy = "ddp"
    elif kind == "FSDP":
        sharding = str((raw.get("fsdp_config") or {}).get("fsdp_sharding_strategy", "FULL_SHARD")).upper()
        strategy = "fsdp" if sharding in ("FULL_SHARD", "1", "HYBRID_SHARD") else "fsdp-grad-op"
        if sharding in ("NO_SHARD", "3"):
            strategy = "ddp"
    elif kind == "DEEPSPEED":
        stage = int((raw.get("deepspeed_config") or {}).get("zero_stage", 2))
        strategy = "ddp" if stage == 0 else f"zero{stage}"
    else:
        raise ValueError(
            f"{path}: distributed_type {kind} is not one plan models (NO, MULTI_GPU, FSDP, DEEPSPEED)"
        )
    return Distributed(strategy, str(path), int(n) if n else None)


def named_config(recipe_text: str, recipe_dir: Path) -> Path | None:
    """The accelerate config a recipe's own run line names (``--config_file PATH``), if any.

    Paths in the run lines are relative to the repository (``recipes/accelerate/...``): tried
    as written, then next to the recipe.
    """
    found = re.search(r"--config_file[ =](\S+\.ya?ml)", recipe_text)
    if not found:
        return None
    written = Path(found.group(1))
    for candidate in (written, recipe_dir / "accelerate" / written.name, recipe_dir / written):
        if candidate.is_file():
            return candidate
    return None


@dataclass(frozen=True)
class States:
    """Per-GPU bytes of the model's states."""

    weights: float
    gradients: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer


def state_bytes(c: Counts, strategy: str, gpus: int, largest_block: int = 0) -> States:
    """Per-GPU weights, gradients and AdamW state of a model counted by :func:`~.meta.count`.

    ``largest_block``: parameters of the largest transformer block (the unit a sharded strategy
    gathers at a time).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    n = max(1, gpus)
    four_bit_bytes = c.four_bit * NF4_BYTES
    gathered = 2 * 2.0 * largest_block  # two blocks in flight (the next one prefetched), 16-bit
    if strategy.startswith("zero"):
        stage = int(strategy[-1])
        weights = 2.0 * (c.params - c.four_bit) + four_bit_bytes
        grads = 2.0 * c.trainable
        opt = 12.0 * c.trainable
        return States(
            weights / n + gathered if stage == 3 else weights,
            grads / n if stage >= 2 else grads,
            opt / n,
        )
    grads = c.trainable_bytes
    opt = 2.0 * c.trainable_bytes
    if strategy == "ddp":
        return States(c.weight_bytes, grads * (2 if n > 1 else 1), opt)
    if strategy == "fsdp-grad-op":
        return States(c.weight_bytes, grads / n, opt / n)
    return States(c.weight_bytes / n + gathered, grads / n, opt / n)


def overhead_bytes(rest: float) -> float:
    """The runtime's share on top of ``rest`` bytes (see ``RUNTIME_FIXED_GIB``)."""
    return RUNTIME_FIXED_GIB * 2**30 + FRAGMENTATION * rest
