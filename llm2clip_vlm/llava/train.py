"""LLaVA-1.5 training on a tower: projector pretraining and instruction tuning, top to bottom.

1. data: LLaVA records from JSON or shards, read and checked by the command layer
   (:func:`llm2clip_vlm.llava.inputs.read_phase`, :mod:`llm2clip_vlm.data.conversations`; the demo
   world's LLaVA splits when no data is given): the trainer opens no file; cut
   into modality batches, or streamed from shards (:mod:`llm2clip_vlm.llava.batches`: the stream
   position is saved with each checkpoint through the loop's ``data_state``);
2. model (:mod:`llm2clip_vlm.llava.model`): tower + LLM + ``mlp2x_gelu`` projector, transformers'
   ``LlavaForConditionalGeneration``; finetuning loads the projector that pretraining wrote;
3. optimiser: AdamW, no weight decay on biases and norms, the projector with its own lr, the
   loop's warm-up ratio then cosine (or constant);
4. the step (:mod:`llm2clip_vlm.llava.step`): micro batches accumulated up to the global batch,
   a token-mean loss over the global batch, DeepSpeed's own accumulation when it is in use;
   everything else (precision, clipping, checkpoints, resume, signals, the NaN guard, the time
   budget) is the one loop's (:mod:`llm2clip_vlm.training.loop`);
5. held-out questions answered before and after training, with their own image and blind
   (``eval_blind``: another question's image), scored per type next to the majority answer ->
   ``metrics.json`` / ``metrics.jsonl``; the model saved in
   transformers' LLaVA format (LoRA merged), plus the projector alone in LLaVA's format.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from llm2clip_vlm.data.errors import write_report
from llm2clip_vlm.data.images import load_rgb
from llm2clip_vlm.llava.batches import phase_batches, steps_per_epoch
from llm2clip_vlm.llava.config import LlavaConfig, LlavaPhaseConfig
from llm2clip_vlm.llava.data import LlavaDataset
from llm2clip_vlm.llava.evaluate import answer_questions, is_correct, score
from llm2clip_vlm.llava.inputs import PhaseRecords
from llm2clip_vlm.llava.model import (
    base_model,
    build_model,
    check_inputs,
    fsdp_blocks,
    merged_model,
    save_llava,
    save_projector,
    trainable_state,
)
from llm2clip_vlm.llava.step import LlavaStep, setup_deepspeed
from llm2clip_vlm.logging import get_logger
from llm2clip_vlm.reliability import ReliabilityConfig
from llm2clip_vlm.tracking.config import TrackingConfig
from llm2clip_vlm.tracking.gallery import write_answer_gallery
from llm2clip_vlm.tracking.tracker import RunTracker
from llm2clip_vlm.training import dist
from llm2clip_vlm.training.checkpoint import CHECKPOINTS
from llm2clip_vlm.training.loop import OnStep, Run, Stage
from llm2clip_vlm.training.optim import DTYPES, adamw, grouped, make_scheduler

log = get_logger(__name__)


def param_groups(model: Any, p: LlavaPhaseConfig) -> list[dict[str, Any]]:
    """AdamW groups: (projector / LLM) x (decay / no decay on biases and norms)."""

    def part_of(name: str) -> tuple[str, float]:
        if "multi_modal_projector" in name:
            return "projector", p.projector_lr or p.lr
        return "llm", p.lr

    return grouped(model.named_parameters(), part_of, p.weight_decay, p.lr)


def train_llava(
    llava: LlavaConfig,
    phase: str,
    output_dir: str | Path,
    data: PhaseRecords,
    *,
    init: Path | None = None,
    reliability: ReliabilityConfig | None = None,
    on_step: OnStep | None = None,
    tracking: TrackingConfig | None = None,
    run_config: dict[str, Any] | None = None,
    on_ready: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Train one phase (``pretrain``: projector only; ``finetune``) into ``output_dir``.

    Args:
        llava: the ``llava`` section (the parts, and ``llava.<phase>`` for the phase).
        phase: ``pretrain`` or ``finetune``.
        output_dir: the run directory (resumes from its checkpoint).
        data: the phase's checked records, held-out questions and the records skipped reading
            them (:func:`~llm2clip_vlm.llava.inputs.read_phase`).
        init: the pretrained projector (a ``llava-pretrain`` output or a ``mm_projector.safetensors``);
            required for ``finetune``.
        reliability: non-finite steps and pickled weights (default: stop / refuse).
        on_step: called as ``on_step(step, loss)`` after every optimizer step (main process).
        tracking, run_config: the ``tracking`` section and the resolved config it records.
        on_ready: called on the main process once the inputs are usable (writes config.yaml).

    Returns:
        The metrics written to ``metrics.json`` (empty on non-main processes).
    """
    from accelerate.utils import set_seed

    rel = reliability or ReliabilityConfig()
    p: LlavaPhaseConfig = getattr(llava, phase)
    out = Path(output_dir)
    compute_dtype = DTYPES[p.loop.precision]
    accelerator = dist.make_accelerator(p.loop.precision)
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    check_inputs(llava, phase, init)
    records, heldout, bad = data.records, data.heldout, data.bad  # read by the command layer
    if main:  # only once the inputs are known to be usable (a refused run leaves no config.yaml)
        out.mkdir(parents=True, exist_ok=True)
        if on_ready is not None:
            on_ready()

    set_seed(p.seed)
    model, processor = build_model(llava, phase, init, compute_dtype, rel.allow_pickle_weights)
    base = base_model(model)
    tokenizer = processor.tokenizer
    image_token_id, image_seq_length = base.config.image_token_index, base.config.image_seq_length
    system = llava.system_prompt or None
    if p.micro_batch_size <= 0:
        raise ValueError(f"llava.{phase}.micro_batch_size must be positive, got {p.micro_batch_size}")
    if p.batch_size % world:
        raise ValueError(
            f"llava.{phase}.batch_size {p.batch_size} must be divisible by the {world} processes"
        )
    deepspeed = setup_deepspeed(accelerator, p, phase)

    dataset = LlavaDataset(
        records, tokenizer, processor.image_processor, p.template, image_token_id, image_seq_length,
        p.max_length, p.image_aspect_ratio, system, skip_bad=p.data.skip_bad,
    )  # fmt: skip
    total_steps = p.loop.max_steps or max(
        1, int(p.loop.epochs * steps_per_epoch(records, p, world, deepspeed))
    )

    # Each rank slices the global batch, so only the same number of processes continues a run.
    run = Run(f"llava {phase}", p.loop, out / CHECKPOINTS, accelerator, skip_nonfinite=rel.skip_nonfinite_steps,
              max_skipped=rel.max_skipped_steps, same_world_size=True)  # fmt: skip
    if run.resumed_weights is not None:
        missing = set(trainable_state(model)) - set(run.resumed_weights)
        if missing:
            raise ValueError(
                f"{run.resumed.path} does not match this model: no weights for {sorted(missing)[:3]}"
            )
        model.load_state_dict(run.resumed_weights, strict=False)
    if run.fsdp2 and p.tune not in ("projector", "full"):
        raise ValueError(
            f"llava.{phase}.tune={p.tune} is not sharded with FSDP2 (loop.distributed=fsdp2): use full "
            "finetuning, or DDP / DeepSpeed ZeRO-3 for LoRA and QLoRA"
        )
    model = run.shard(model, fsdp_blocks(model))  # FSDP2 only; before the optimizer is built
    optimizer = adamw(
        param_groups(model, p), p.lr, accelerator.device, betas=(0.9, 0.999), eps=1e-8, fused=None
    )
    scheduler = make_scheduler(optimizer, p.loop, total_steps)
    model, optimizer = run.prepare(model, optimizer, scheduler)
    raw = accelerator.unwrap_model(model)
    state = run.state

    n_train = sum(t.numel() for t in raw.parameters() if t.requires_grad)
    log.info(
        "llava %s: tune=%s, template %s; trains %.2fM of %.1fM parameters (tower frozen); %d records "
        "(%d with images), %d steps of %d (micro %d x %d processes), %s",
        phase, p.tune, p.template, n_train / 1e6, sum(t.numel() for t in raw.parameters()) / 1e6, len(records),
        int(records.has_image.sum()), total_steps, p.batch_size, p.micro_batch_size, world, p.loop.precision,
    )  # fmt: skip

    def run_heldout() -> dict[str, Any]:
        if not heldout or not main:
            return {}

        def ask(blind: str) -> list[str]:
            return answer_questions(
                raw, tokenizer, processor.image_processor, heldout, template=p.template,
                image_token_id=image_token_id, image_seq_length=image_seq_length,
                image_aspect_ratio=p.image_aspect_ratio, system=system, max_new_tokens=p.eval_max_new_tokens,
                batch_size=p.eval_batch_size, device=accelerator.device, autocast=accelerator.autocast,
                blind=blind, blind_seed=p.seed,  # type: ignore[arg-type]
            )  # fmt: skip

        preds = ask("off")
        # A held-out set with images from fewer than two files cannot be shuffled: blank instead.
        mode = p.eval_blind
        if mode == "shuffle" and len({str(r.image) for r in heldout if r.image is not None}) < 2:
            log.warning("held-out images come from one file: the blind baseline uses a blank image")
            mode = "blank"
        blind_preds = ask(mode) if mode != "off" else None
        result = score(heldout, preds, blind_preds, mode)
        result["examples"] = [
            {"question": r.conversations[0]["value"], "answer": r.extra.get("answer"), "prediction": pr,
             "question_type": r.extra.get("question_type", ""), "image": str(r.image) if r.image else None,
             "correct": is_correct(pr, str(r.extra.get("answer", r.conversations[1]["value"])),
                                   str(r.extra.get("question_type", ""))),
             **({"blind_prediction": blind_preds[i]} if blind_preds is not None else {})}
            for i, (r, pr) in enumerate(list(zip(heldout, preds, strict=True))[:8])
        ]  # fmt: skip
        return result

    if heldout and not state.extra.get("heldout_before") and world == 1:
        state.extra["heldout_before"] = run_heldout()
        log.info(
            "held-out accuracy before: %.1f%% (%d questions)",
            state.extra["heldout_before"]["accuracy"],
            len(heldout),
        )

    tracker = RunTracker.start(
        out, tracking or TrackingConfig(), stage=f"llava-{phase}", main=main,
        resume_step=state.step if run.resumed is not None else None, config=run_config,
    )  # fmt: skip
    if state.extra.get("heldout_before"):
        tracker.log(0, {"heldout": state.extra["heldout_before"]})

    loader = phase_batches(
        records, dataset, p, phase, rank=rank, world=world, start_step=state.step, total_steps=total_steps,
        deepspeed=deepspeed, saved=state.extra.get("data"), pin_memory=torch.cuda.is_available(),
    )  # fmt: skip
    trainable = {n for n, t in raw.named_parameters() if t.requires_grad}

    def weights() -> dict[str, torch.Tensor] | None:
        full = accelerator.get_state_dict(model)  # collective under FSDP: every rank calls it
        return {n: t.detach().cpu().contiguous() for n, t in (full or {}).items() if n in trainable}

    step = LlavaStep(accelerator, model, p.micro_batch_size, deepspeed, state.extra, p.loss_mean, fsdp2=run.fsdp2)
    # Under DeepSpeed, clipping and the update happen in backward (gradient_clipping).
    stage = Stage(f"llava {phase}", model, optimizer, scheduler, step, weights,
                  None if deepspeed else model.parameters, samples_per_step=p.batch_size,
                  data_state=getattr(loader, "state_dict", None))  # fmt: skip
    run.train(stage, loader, total_steps, on_step, tracker)
    # Streamed: the records skipped while reading, all ranks', as of the last checkpoint.
    total_records = len(records) + len(bad.skipped)  # streamed skips are among ``records``
    bad.take(state.extra.get("data", {}).get("skipped", []))  # one ledger: read + streamed

    after = run_heldout() if world == 1 else {}
    before = state.extra.get("heldout_before", {})
    if after:
        tracker.log(state.step, {"heldout": after})
        write_answer_gallery(out, after["examples"], lambda path: load_rgb(str(path), str(path)))
        log.info("held-out accuracy after: %.1f%% (before %.1f%%)", after["accuracy"], before.get("accuracy", float("nan")))  # fmt: skip
    full = run.full_weights(model) if run.fsdp2 else None  # a collective: every rank gathers
    metrics: dict[str, Any] = {}
    if main:
        k = max(1, min(10, len(state.losses) // 5))
        metrics = {
            "phase": phase, "tune": p.tune, "template": p.template,
            "steps": state.step, "total_steps": total_steps,
            "train_seconds": round(state.seconds, 2),
            "samples_per_second": round(run.samples_per_second, 3),
            "first_loss": state.losses[0] if state.losses else None,
            "final_loss": state.losses[-1] if state.losses else None,
            # Means over the first/last k steps: single steps are noisy.
            "loss_start_mean": sum(state.losses[:k]) / k if state.losses else None,
            "loss_end_mean": sum(state.losses[-k:]) / k if state.losses else None,
            "losses": state.losses,
            "records": len(records),
            "truncated_samples": state.extra.get("truncated", 0),
            "dropped_samples": state.extra.get("dropped", 0),
            "bad_records": {"count": len(bad.skipped), "records": [{"record": w, "reason": r} for w, r in bad.skipped]},
            "heldout_before": before, "heldout_after": after,
            "trainable_parameters": n_train, "processes": world,
        }  # fmt: skip
        if full is not None:  # FSDP2: the gathered weights into a fresh, unsharded copy
            raw, _ = build_model(llava, phase, init, compute_dtype, rel.allow_pickle_weights)
            raw.load_state_dict(full)
        final = merged_model(llava, p, raw, rel.allow_pickle_weights)
        save_dtype = torch.float32 if p.loop.precision == "fp32" else compute_dtype
        save_llava(final, processor, out / "model", p.template, system, save_dtype)
        save_projector(final.model.multi_modal_projector, out)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        write_report(out, data.name, total_records, bad.skipped)
    tracker.finish()
    accelerator.wait_for_everyone()
    return metrics
