"""What a LLaVA phase hands the one loop (:func:`llava_stage`: :class:`~llm2clip_vlm.llava.step.LlavaStep`,
the trainable weights, the stream's position), and what it leaves after training: its part of
``metrics.json`` (:func:`details`) and the saved model (:func:`save_model`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llm2clip_vlm.data.errors import BadRecords
from llm2clip_vlm.llava.config import LlavaConfig, LlavaPhaseConfig
from llm2clip_vlm.llava.model import base_model, merged_model, save_llava, save_projector
from llm2clip_vlm.llava.step import LlavaStep
from llm2clip_vlm.training.loop import Run, Stage, TrainState
from llm2clip_vlm.training.session import Session


def llava_stage(
    session: Session,
    run: Run,
    model: Any,
    updates: tuple[Any, Any],
    loader: Any,
    p: LlavaPhaseConfig,
    phase: str,
    deepspeed: bool,
) -> Stage:
    """What the loop runs: :class:`LlavaStep` (its truncated/dropped counts kept in the run's state),
    the trainable weights for checkpoints, the stream's position (``updates``: optimizer, scheduler)."""
    accelerator = session.accelerator
    trainable = {n for n, t in accelerator.unwrap_model(model).named_parameters() if t.requires_grad}

    def weights() -> dict[str, torch.Tensor] | None:
        full = accelerator.get_state_dict(model)  # collective under FSDP: every rank calls it
        return {n: t.detach().cpu().contiguous() for n, t in (full or {}).items() if n in trainable}

    # The shared prefix needs one forward per backward outside any wrapper (DDP, DeepSpeed, FSDP2
    # hook one forward) and the KV cache (gradient checkpointing drops it).
    plain = not deepspeed and not run.fsdp2  # one process, or DDP
    alone = plain and accelerator.num_processes == 1
    share = p.share_prefix and alone and not p.gradient_checkpointing
    base = base_model(accelerator.unwrap_model(model))
    projector_weights = [t for t in base.model.multi_modal_projector.parameters() if t.requires_grad]
    step = LlavaStep(
        accelerator, model, p.micro_batch_size, deepspeed, run.state.extra, p.loss_mean, run.fsdp2,
        sort_micro_batches=p.sort_micro_batches,
        share_prefix_before=base.config.image_token_index if share else None,
        head=base.lm_head if alone else None,  # a hook inside a sharded module: not tried there
        image_weights=None if deepspeed else projector_weights,  # DeepSpeed zero-fills itself
        ddp=plain and not alone,
    )  # fmt: skip
    # Under DeepSpeed, clipping and the update happen in backward (gradient_clipping).
    parts = (model, *updates, step, weights, None if deepspeed else model.parameters)
    data_state = getattr(loader, "state_dict", None)
    return Stage(f"llava {phase}", *parts, samples_per_step=p.batch_size, data_state=data_state)


def details(
    p: LlavaPhaseConfig, phase: str, records: Any, bad: BadRecords, state: TrainState, n_train: int
) -> dict[str, Any]:
    """LLaVA's own part of ``metrics.json``."""
    return {
        "phase": phase,
        "tune": p.tune,
        "template": p.template,
        "records": len(records),
        "truncated_samples": state.extra.get("truncated", 0),
        "dropped_samples": state.extra.get("dropped", 0),
        "bad_records": {
            "count": len(bad.skipped),
            "records": [{"record": w, "reason": r} for w, r in bad.skipped],
        },
        "trainable_parameters": n_train,
    }


def save_model(
    llava: LlavaConfig,
    p: LlavaPhaseConfig,
    raw: Any,
    processor: Any,
    out: Path,
    dtype: torch.dtype,
    pickle: bool,
) -> None:
    """The model in transformers' LLaVA format (LoRA merged) in ``out/model``, and the projector
    alone in LLaVA's format."""
    final = merged_model(llava, p, raw, pickle)
    save_dtype = torch.float32 if p.loop.precision == "fp32" else dtype
    save_llava(final, processor, out / "model", p.template, llava.system_prompt or None, save_dtype)
    save_projector(final.model.multi_modal_projector, out)
