"""``plan``'s output: a rich table per GPU (one column per stage), and the JSON document.

JSON (``plan --json PATH``), one object::

    {"recipe": str, "gpus": int, "gpu_memory_gib": float, "mfu": float, "peak_tflops": float,
     "verdict": "fits" | "<stage>: <knob>; ...",
     "stages": [StagePlan.as_dict(), ...]}

Each stage: ``stage`` (stage1, embed, stage2, llava-pretrain, llava-finetune), ``model``,
``strategy`` (ddp, fsdp, fsdp-grad-op, zero1-3) and ``strategy_source``, ``gpus``, ``params``,
``trainable``, ``four_bit`` (parameters), ``micro_batch`` (sequences or images per rank per
forward), ``seq_len``, ``checkpointing``; per GPU in GiB: ``weights_gib``, ``gradients_gib``,
``optimizer_gib``, ``activations_gib`` (as the recipe runs), ``activations_checkpointing_gib``,
``activations_no_checkpointing_gib``, ``overhead_gib``, ``peak_gib`` (the predicted peak);
``data_ram_per_rank_gib`` (host RAM), ``store_gib`` (embed: the store on disk); ``records``,
``epochs``, ``steps_per_epoch``, ``step_tflop`` (model FLOPs of one optimizer step, all GPUs),
``epoch_hours``; ``fits``, ``knob`` ("fits" or what to turn), ``notes``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from llm2clip_vlm.plan.stages import GIB, Cluster, StagePlan


def verdict(plans: Sequence[StagePlan]) -> str:
    bad = [f"{p.stage}: {p.knob}" for p in plans if not p.fits]
    return "fits" if not bad else "; ".join(bad)


def document(recipe: str, plans: Sequence[StagePlan], cluster: Cluster) -> dict[str, Any]:
    return {
        "recipe": recipe,
        "gpus": cluster.gpus,
        "gpu_memory_gib": cluster.gpu_memory_gib,
        "mfu": cluster.mfu,
        "peak_tflops": round(cluster.peak_flops / 1e12, 1),
        "verdict": verdict(plans),
        "stages": [p.as_dict() for p in plans],
    }


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)


def _gib(x: float) -> str:
    return f"{x / GIB:.1f}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n else "0"


def table(recipe: str, plans: Sequence[StagePlan], cluster: Cluster) -> Table:
    """Rows: what each stage holds per GPU and costs; columns: the stages."""
    t = Table(
        title=f"{recipe}: per GPU, {cluster.gpus} x {cluster.gpu_memory_gib:g} GiB, "
        f"{cluster.peak_flops / 1e12:.0f} TFLOP/s bf16 at {cluster.mfu:.0%} MFU",
        title_justify="left",
    )
    t.add_column("")
    for p in plans:
        t.add_column(p.stage, justify="right")
    rows: list[tuple[str, Any]] = [
        ("distributed", lambda p: p.strategy),
        ("parameters", lambda p: _count(p.params) + (f" ({_count(p.four_bit)} 4-bit)" if p.four_bit else "")),
        ("trainable", lambda p: _count(p.trainable)),
        ("micro-batch x length", lambda p: f"{p.micro_batch} x {p.seq_len}"),
        ("weights, GiB", lambda p: _gib(p.states.weights)),
        ("gradients, GiB", lambda p: _gib(p.states.gradients)),
        ("optimizer, GiB", lambda p: _gib(p.states.optimizer)),
        ("activations (checkpointing), GiB", lambda p: _gib(p.activations_checkpointing)),
        ("activations (none), GiB", lambda p: _gib(p.activations_no_checkpointing)),
        ("checkpointing in recipe", lambda p: "-" if not p.trainable else "yes" if p.checkpointing else "no"),
        ("peak, GiB", lambda p: f"{_gib(p.peak())} / {p.gpu_memory_gib:g}"),
        ("data RAM per rank, GiB", lambda p: f"{p.data_ram_per_rank / GIB:.2f}"),
        ("store on disk, GiB", lambda p: _gib(p.store_bytes) if p.store_bytes else "-"),
        ("records x epochs", lambda p: f"{p.records:,} x {p.epochs:g}"),
        ("step, TFLOP", lambda p: f"{p.step_flops / 1e12:,.0f}"),
        ("time per epoch, h", lambda p: f"{p.epoch_hours:.2f}"),
        ("verdict", lambda p: "[green]fits[/green]" if p.fits else f"[red]{p.knob}[/red]"),
    ]
    for name, cell in rows:
        t.add_row(name, *(cell(p) for p in plans))
    return t
