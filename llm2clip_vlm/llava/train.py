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
:class:`~llm2clip_vlm.training.session.Session` opens and closes the run (one metrics.json schema).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llm2clip_vlm.data.errors import write_report
from llm2clip_vlm.data.images import load_rgb
from llm2clip_vlm.llava.batches import phase_batches, steps_per_epoch
from llm2clip_vlm.llava.config import LlavaConfig, LlavaPhaseConfig
from llm2clip_vlm.llava.data import LlavaDataset
from llm2clip_vlm.llava.evaluate import HeldoutEvaluation
from llm2clip_vlm.llava.inputs import PhaseRecords
from llm2clip_vlm.llava.model import (
    base_model,
    build_model,
    check_inputs,
    fsdp_blocks,
    trainable_state,
)
from llm2clip_vlm.llava.stage import details, llava_stage, save_model
from llm2clip_vlm.llava.step import setup_deepspeed
from llm2clip_vlm.logging import get_logger
from llm2clip_vlm.tracking.gallery import write_answer_gallery
from llm2clip_vlm.training.checkpoint import CHECKPOINTS
from llm2clip_vlm.training.optim import DTYPES, adamw, grouped, make_scheduler
from llm2clip_vlm.training.session import RunInputs, Session, metrics_document, train_summary

log = get_logger(__name__)


def param_groups(model: Any, p: LlavaPhaseConfig) -> list[dict[str, Any]]:
    """AdamW groups: (projector / LLM) x (decay / no decay on biases and norms)."""

    def part_of(name: str) -> tuple[str, float]:
        if "multi_modal_projector" in name:
            return "projector", p.projector_lr or p.lr
        return "llm", p.lr

    return grouped(model.named_parameters(), part_of, p.weight_decay, p.lr)


def fused_adamw(device: torch.device, world: int, sharded: bool) -> bool | None:
    """AdamW's one-kernel update on a single CPU process (torch >= 2.4): the same update as the
    per-tensor loop, ~3x cheaper (0.13 against 0.39 CPU s a step for the demo's 135M parameters);
    None (torch's choice) elsewhere, as before (multi-process runs and GPUs: unchanged)."""
    return True if device.type == "cpu" and world == 1 and not sharded else None


def train_llava(
    llava: LlavaConfig,
    phase: str,
    output_dir: str | Path,
    data: PhaseRecords,
    *,
    init: Path | None = None,
    inputs: RunInputs | None = None,
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
        inputs: reliability, tracking, config.yaml writer, ``on_step`` (the command layer's).

    Returns:
        The metrics written to ``metrics.json`` (empty on non-main processes).
    """
    from accelerate.utils import set_seed

    p: LlavaPhaseConfig = getattr(llava, phase)
    session = Session(output_dir, f"llava-{phase}", p.loop.precision, inputs)
    rel, out, accelerator = session.reliability, session.out, session.accelerator
    main, rank, world = session.main, session.rank, session.world
    compute_dtype = DTYPES[p.loop.precision]
    check_inputs(llava, phase, init)
    records, heldout, bad = data.records, data.heldout, data.bad  # read by the command layer
    session.ready()  # only once the inputs are known to be usable (a refused run leaves no config.yaml)

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
        records,
        tokenizer,
        processor.image_processor,
        p.template,
        image_token_id,
        image_seq_length,
        p.max_length,
        p.image_aspect_ratio,
        system,
        skip_bad=p.data.skip_bad,
    )
    total_steps = p.loop.max_steps or max(
        1, int(p.loop.epochs * steps_per_epoch(records, p, world, deepspeed))
    )

    # Each rank slices the global batch, so only the same number of processes continues a run.
    run = session.open_run(f"llava {phase}", p.loop, out / CHECKPOINTS, same_world_size=True)
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
        param_groups(model, p),
        p.lr,
        accelerator.device,
        betas=(0.9, 0.999),
        eps=1e-8,
        fused=fused_adamw(accelerator.device, world, deepspeed or run.fsdp2),
    )
    scheduler = make_scheduler(optimizer, p.loop, total_steps)
    model, optimizer = run.prepare(model, optimizer, scheduler)
    raw = accelerator.unwrap_model(model)
    state = run.state

    n_train = sum(t.numel() for t in raw.parameters() if t.requires_grad)
    n_all, with_images = sum(t.numel() for t in raw.parameters()), int(records.has_image.sum())
    log.info(
        "llava %s: tune=%s, template %s; trains %.2fM of %.1fM parameters (tower frozen); %d records "
        "(%d with images), %d steps of %d (micro %d x %d processes), %s",
        *(phase, p.tune, p.template, n_train / 1e6, n_all / 1e6, len(records), with_images, total_steps),
        *(p.batch_size, p.micro_batch_size, world, p.loop.precision),
    )

    evaluation = HeldoutEvaluation(
        heldout,
        tokenizer,
        processor.image_processor,
        p,
        image_token_id,
        image_seq_length,
        system,
        accelerator.device,
        accelerator.autocast,
    )  # the same questions before and after training, on the unwrapped model

    def run_heldout() -> dict[str, Any]:
        return evaluation(raw) if heldout and main else {}

    if heldout and p.eval_before and not state.extra.get("heldout_before") and world == 1:
        state.extra["heldout_before"] = run_heldout()
        accuracy = state.extra["heldout_before"]["accuracy"]
        log.info("held-out accuracy before: %.1f%% (%d questions)", accuracy, len(heldout))

    tracker = session.start_tracker(run)
    if state.extra.get("heldout_before"):
        tracker.log(0, {"heldout": state.extra["heldout_before"]})

    loader = phase_batches(
        records,
        dataset,
        p,
        phase,
        rank=rank,
        world=world,
        start_step=state.step,
        total_steps=total_steps,
        deepspeed=deepspeed,
        saved=state.extra.get("data"),
        pin_memory=torch.cuda.is_available(),
    )
    stage = llava_stage(session, run, model, (optimizer, scheduler), loader, p, phase, deepspeed)
    run.train(stage, loader, total_steps, session.on_step, tracker)
    # Streamed: the records skipped while reading, all ranks', as of the last checkpoint.
    total_records = len(records) + len(bad.skipped)  # streamed skips are among ``records``
    bad.take(state.extra.get("data", {}).get("skipped", []))  # one ledger: read + streamed

    after = run_heldout() if world == 1 else {}
    before = state.extra.get("heldout_before", {})
    if after:
        tracker.log(state.step, {"heldout": after})
        write_answer_gallery(out, after["examples"], lambda path: load_rgb(str(path), str(path)))
        was = f"{before['accuracy']:.1f}%" if before else "not measured"
        log.info("held-out accuracy after: %.1f%% (before %s)", after["accuracy"], was)
    full = run.full_weights(model) if run.fsdp2 else None  # a collective: every rank gathers
    metrics: dict[str, Any] = {}
    if main:
        summary = train_summary(state, total_steps, run, p.batch_size, world)
        heldout_eval = {"metric": "heldout", "before": before, "after": after}
        metrics = metrics_document(
            f"llava-{phase}", summary, heldout_eval, details(p, phase, records, bad, state, n_train)
        )
        if full is not None:  # FSDP2: the gathered weights into a fresh, unsharded copy
            raw, _ = build_model(llava, phase, init, compute_dtype, rel.allow_pickle_weights)
            raw.load_state_dict(full)
        save_model(llava, p, raw, processor, out, compute_dtype, rel.allow_pickle_weights)
        session.write_metrics(metrics)
        write_report(out, data.name, total_records, bad.skipped)
    session.close()
    return metrics
