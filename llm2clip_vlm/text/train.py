"""Stage 1: optional MNTP, then supervised SimCSE with LoRA, then merge and save.

Reads top to bottom (:func:`train_stage1`): open the run (:class:`~llm2clip_vlm.training.session.Session`)
-> check the settings -> data (SimCSE or E5 batches, CRA pairs) -> load the bidirectional LLM ->
CRA before -> (MNTP, :mod:`llm2clip_vlm.text.mntp`) -> LoRA (:mod:`llm2clip_vlm.text.lora`) ->
SimCSE steps (:class:`~llm2clip_vlm.text.step.SimCSEStep`) on the one loop
(:mod:`llm2clip_vlm.training.loop`: checkpointed, resumable) -> merge -> save ``encoder/`` -> CRA
after -> ``metrics.json`` (the one schema of :mod:`llm2clip_vlm.training.session`).

Multi-process training goes through accelerate (``accelerate launch`` / ``torchrun``): each process
embeds ``batch_size / world`` queries of the step's global batch (see
:mod:`llm2clip_vlm.text.simcse`), and the SimCSE loss gathers positives and hard negatives from
all processes with gradient, so N processes compute the same loss and update as one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llm2clip_vlm.data.records import ImageCaptions
from llm2clip_vlm.logging import get_logger
from llm2clip_vlm.text.config import Stage1Config
from llm2clip_vlm.text.cra import caption_pairs
from llm2clip_vlm.text.e5 import TaskBatches
from llm2clip_vlm.text.encoder import ENCODER_FILE, CaptionEncoder
from llm2clip_vlm.text.evaluate import cached_cra_before, cra_of
from llm2clip_vlm.text.lengths import over_long_captions
from llm2clip_vlm.text.lora import adapter_state, load_adapter, merge_adapters, merge_lora, wrap_lora
from llm2clip_vlm.text.mntp import train_mntp
from llm2clip_vlm.text.modeling import (
    ModelRef,
    decoder_of,
    load_bidirectional,
    load_tokenizer,
    resolve_model_ref,
)
from llm2clip_vlm.text.pooling import resolve_caption_template
from llm2clip_vlm.text.simcse import SimCSEBatches, Triplet
from llm2clip_vlm.text.step import SimCSEStep, step_token_count
from llm2clip_vlm.training.checkpoint import CHECKPOINTS
from llm2clip_vlm.training.loop import Run, Stage
from llm2clip_vlm.training.optim import DTYPES, adamw, make_scheduler
from llm2clip_vlm.training.session import RunInputs, Session, metrics_document, train_summary

log = get_logger(__name__)

MNTP_CHECKPOINTS = "mntp"  # under CHECKPOINTS: the MNTP warm-up's own checkpoints


def train_stage1(
    s: Stage1Config,
    output_dir: str | Path,
    train_records: Sequence[ImageCaptions],
    heldout_records: Sequence[ImageCaptions],
    *,
    text_corpus: Sequence[str] = (),
    text_corpus_ratio: float = 0.0,
    cra_info: dict[str, Any] | None = None,
    inputs: RunInputs | None = None,
) -> dict[str, Any]:
    """Train a caption embedder and write ``encoder/`` and ``metrics.json``.

    Args:
        s: the ``stage1`` section.
        output_dir: run directory; a run with checkpoints in it resumes from the latest.
        train_records: training images with their captions.
        heldout_records: held-out images with >= 2 short captions each (for CRA).
        text_corpus, text_corpus_ratio: plain texts MNTP mixes with the captions, and their share.
        cra_info: where the CRA pairs come from (:meth:`CRASource.describe`), for ``metrics.json``.
        inputs: reliability, tracking, config.yaml writer (the command layer's explicit inputs).

    Returns:
        The metrics written to ``metrics.json`` (empty on non-main processes).
    """
    from accelerate.utils import set_seed

    session = Session(output_dir, "stage1", s.loop.precision, inputs)
    set_seed(s.seed)
    check_settings(s, session.world)
    ref = resolve_model_ref(s.model)
    tokenizer = load_tokenizer(ref)
    data = stage1_data(s, tokenizer, train_records, heldout_records, session)
    model = load_model(s, ref, session)
    session.ready()

    cra_before = (
        cached_cra_before(decoder_of(model), tokenizer, s, data.pairs, session.out) if session.main else None
    )
    session.accelerator.wait_for_everyone()
    if s.mntp.enabled:
        captions = [c.text for r in train_records for c in r.captions]
        mntp_dir = session.out / CHECKPOINTS / MNTP_CHECKPOINTS
        acc, rel = session.accelerator, session.reliability
        model = train_mntp(
            model, tokenizer, s, captions, list(text_corpus), text_corpus_ratio, mntp_dir, acc, rel
        )

    peft_model = wrap_lora(decoder_of(model), s)
    run = session.open_run("stage1", s.loop, session.out / CHECKPOINTS)
    if run.resumed_weights is not None:
        load_adapter(peft_model, run.resumed_weights)
    tracker = session.start_tracker(run)
    tracker.log(0, {"cra": cra_before})
    stage = simcse_stage(session, run, peft_model, tokenizer, s, data)
    state = run.train(
        stage, rank_batches(session, run, data, s.batch_size), data.steps, session.on_step, tracker
    )

    merged = merge_lora(session.accelerator.unwrap_model(stage.model), ref, s, data.weight_dtype)
    metrics: dict[str, Any] = {}
    if session.main:
        encoder = save_encoder(merged, tokenizer, s, session.out)
        # Zero steps leave the weights as they were (the LoRA's B is zero): CRA is unchanged.
        cra_after = cra_of(merged, tokenizer, s, data.pairs) if state.step else cra_before
        cra = {"metric": "cra", "before": cra_before, "after": cra_after, "captions": 2 * len(data.pairs)}
        metrics = metrics_document(
            "stage1",
            train_summary(state, data.steps, run, s.batch_size, session.world),
            {**cra, **(cra_info or {})},
            details(session.out, encoder, data),
        )
        session.write_metrics(metrics)
        tracker.log(state.step, {"cra": cra_after})
        done = (cra_before, cra_after, state.step, state.seconds)
        log.info("stage 1 done: CRA %.1f -> %.1f after %d steps (%.0f s)", *done)
    session.close(end_training=True)
    return metrics


def check_settings(s: Stage1Config, world: int) -> None:
    """Refuse combinations that cannot run, before anything is loaded."""
    if s.mntp.enabled and s.lora.quantization != "none":
        raise ValueError(
            "stage1.mntp with a quantized base is not supported: run MNTP on a full-precision base"
        )
    if s.batch_size % world:
        raise ValueError(f"stage1.batch_size {s.batch_size} is not divisible by the {world} processes")
    if s.adapters and s.lora.quantization != "none":
        raise ValueError(
            "stage1.adapters cannot merge into a quantized base: merge them with import-encoder first"
        )
    if s.mntp.enabled and (Path(s.model) / ENCODER_FILE).is_file():
        raise ValueError(
            f"stage1.model {s.model} is a caption encoder, which has no LM head for MNTP: start MNTP "
            "from the base LLM with stage1.adapters (as the reference), or turn stage1.mntp off"
        )


@dataclass
class Stage1Data:
    """The step batches, the CRA pairs and what the run reports about its captions."""

    batches: SimCSEBatches | TaskBatches
    pairs: list[tuple[str, str]]
    over_long: dict[str, Any]
    steps: int
    weight_dtype: torch.dtype


def stage1_data(
    s: Stage1Config,
    tokenizer: Any,
    train_records: Sequence[ImageCaptions],
    heldout_records: Sequence[ImageCaptions],
    session: Session,
) -> Stage1Data:
    """SimCSE triplets of the records (or the reference's E5 tasks + the captions as one task,
    logging the per-task counts), the held-out CRA pairs, and the schedule's length."""
    log.info(
        "stage 1: captions wrapped as %r", resolve_caption_template(s.caption_template, tokenizer) or "{text}"
    )
    weight_dtype = _weight_dtype(s, session.device)
    instructions = {"short": s.instruction_short_query, "long": s.instruction_long_query}
    batches: SimCSEBatches | TaskBatches
    if s.e5.path:
        batches = TaskBatches(s.e5.path, s.e5.tasks, train_records, instructions, s.batch_size, s.seed)
    else:
        batches = SimCSEBatches(
            train_records, instructions, s.seed, s.hard_negatives, s.similar_negatives, pairing=s.pairing
        )
    pairs = caption_pairs(heldout_records, s.cra_captions)
    over_long = over_long_captions(tokenizer, train_records, s.max_length) if session.main else {}
    steps = total_steps(s, batches)
    sizes = (s.model, len(batches), steps, s.batch_size, s.batch_size // session.world, 2 * len(pairs))
    log.info(
        "stage 1: %s, %d training samples, %d steps of %d queries (%d per process), CRA on %d captions",
        *sizes,
    )
    return Stage1Data(batches, pairs, over_long, steps, weight_dtype)


def load_model(s: Stage1Config, ref: ModelRef, session: Session) -> nn.Module:
    """The bidirectional LLM (with its LM head for MNTP), adapters merged, on this rank's device."""
    quantized = s.lora.quantization != "none"
    model = load_bidirectional(
        ref,
        with_lm_head=s.mntp.enabled,
        attn_implementation=s.attn_implementation,
        dtype=_weight_dtype(s, session.device),
        quantization=s.lora.quantization,
        device_map={"": session.device} if quantized else None,
        allow_pickle=session.reliability.allow_pickle_weights,
    )
    merge_adapters(model, s.adapters)
    if not quantized:
        model.to(session.device)
    return model


def rank_batches(session: Session, run: Run, data: Stage1Data, batch_size: int) -> Iterator[list[Triplet]]:
    """This rank's slice of every step's global batch, from the resumed step on."""
    local = batch_size // session.world
    for k in range(run.state.step, data.steps):
        yield data.batches.batch(k, batch_size)[session.rank * local : (session.rank + 1) * local]


def simcse_stage(
    session: Session, run: Run, peft_model: nn.Module, tokenizer: Any, s: Stage1Config, data: Stage1Data
) -> Stage:
    """What the loop runs: AdamW on the LoRA weights, the schedule, the model prepared by the run
    (DDP; the checkpoint's optimizer state), :class:`SimCSEStep`, the LoRA weights for checkpoints."""
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = adamw(trainable, s.lr, session.device, weight_decay=s.weight_decay)
    scheduler = make_scheduler(optimizer, s.loop, data.steps)
    ddp_model, optimizer = run.prepare(peft_model, optimizer, scheduler)

    def count_tokens(k: int) -> int:
        return step_token_count(tokenizer, data.batches.batch(k, s.batch_size), s.max_length)

    def weights() -> dict[str, torch.Tensor] | None:
        return adapter_state(peft_model) if session.main else None

    step = SimCSEStep(session.accelerator, ddp_model, tokenizer, s, scheduler, run.state, count_tokens)
    parts = (ddp_model, optimizer, scheduler, step, weights, peft_model.parameters)
    return Stage("stage 1 SimCSE", *parts, samples_per_step=s.batch_size, unit="queries")


def save_encoder(merged: nn.Module, tokenizer: Any, s: Stage1Config, out: Path) -> CaptionEncoder:
    """The merged model as a caption encoder in ``out/encoder``."""
    instructions = {"short_query": s.instruction_short_query, "long_query": s.instruction_long_query}
    template = resolve_caption_template(s.caption_template, tokenizer)
    parts = (merged, tokenizer, s.max_length, instructions, s.pooling, s.pad_to_multiple_of)
    encoder = CaptionEncoder(*parts, caption_template=template)
    encoder.save_pretrained(out / "encoder")
    return encoder


def details(out: Path, encoder: CaptionEncoder, data: Stage1Data) -> dict[str, Any]:
    """Stage 1's own part of ``metrics.json``."""
    return {
        **({"tasks": data.batches.describe()} if isinstance(data.batches, TaskBatches) else {}),
        "encoder": str(out / "encoder"),
        "encoder_identity": encoder.identity(),
        "captions_over_max_length": data.over_long,
    }


def _weight_dtype(s: Stage1Config, device: torch.device) -> torch.dtype:
    """Base weights in bf16/fp16 on a GPU (memory); fp32 on a CPU, where bf16 runs under autocast."""
    if device.type == "cpu" or s.loop.precision == "fp32":
        return torch.float32
    return DTYPES[s.loop.precision]


def total_steps(s: Stage1Config, batches: SimCSEBatches) -> int:
    """SimCSE steps: ``loop.epochs`` over the images (0 = no training), capped at ``loop.max_steps``."""
    if s.loop.epochs == 0:
        return 0  # no training: the encoder is the base LLM (bidirectional, mean pooled)
    steps = max(1, math.ceil(s.loop.epochs * batches.steps_per_epoch(s.batch_size)))
    return min(steps, s.loop.max_steps) if s.loop.max_steps > 0 else steps
