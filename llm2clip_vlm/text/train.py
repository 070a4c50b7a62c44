"""Stage 1: optional MNTP, then supervised SimCSE with LoRA, then merge and save.

Reads top to bottom: load the bidirectional LLM -> CRA before -> (MNTP, :mod:`llm2clip_vlm.text.mntp`)
-> LoRA (:mod:`llm2clip_vlm.text.lora`) -> SimCSE steps on the one loop
(:mod:`llm2clip_vlm.training.loop`: checkpointed, resumable) -> merge -> save ``encoder/`` -> CRA
after -> metrics.

Multi-process training goes through accelerate (``accelerate launch`` / ``torchrun``): each process
embeds ``batch_size / world`` queries of the step's global batch (see
:mod:`llm2clip_vlm.text.simcse`), and the SimCSE loss gathers positives and hard negatives from
all processes with gradient, so N processes compute the same loss and update as one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llm2clip_vlm.data.records import ImageCaptions
from llm2clip_vlm.logging import get_logger
from llm2clip_vlm.reliability import ReliabilityConfig
from llm2clip_vlm.text.config import Stage1Config
from llm2clip_vlm.text.cra import caption_pairs, caption_retrieval_accuracy
from llm2clip_vlm.text.e5 import TaskBatches
from llm2clip_vlm.text.encoder import ENCODER_FILE, CaptionEncoder
from llm2clip_vlm.text.lengths import over_long_captions
from llm2clip_vlm.text.lora import adapter_state, load_adapter, merge_adapters, merge_lora, wrap_lora
from llm2clip_vlm.text.mntp import train_mntp
from llm2clip_vlm.text.modeling import decoder_of, load_bidirectional, load_tokenizer, resolve_model_ref
from llm2clip_vlm.text.pooling import resolve_caption_template
from llm2clip_vlm.text.simcse import SimCSEBatches, Triplet, embed_triplets
from llm2clip_vlm.tracking.config import TrackingConfig
from llm2clip_vlm.tracking.tracker import RunTracker
from llm2clip_vlm.training import dist
from llm2clip_vlm.training.checkpoint import CHECKPOINTS
from llm2clip_vlm.training.loop import Run, Stage, StepOutput
from llm2clip_vlm.training.losses import SupervisedSimCSELoss
from llm2clip_vlm.training.optim import DTYPES, adamw, make_scheduler

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
    reliability: ReliabilityConfig | None = None,
    cra_info: dict[str, Any] | None = None,
    tracking: TrackingConfig | None = None,
    run_config: dict[str, Any] | None = None,
    on_ready: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Train a caption embedder and write ``encoder/`` and ``metrics.json``.

    Args:
        s: the ``stage1`` section.
        output_dir: run directory; a run with checkpoints in it resumes from the latest.
        train_records: training images with their captions.
        heldout_records: held-out images with >= 2 short captions each (for CRA).
        text_corpus, text_corpus_ratio: plain texts MNTP mixes with the captions, and their share.
        reliability: what to do with non-finite steps (default: stop).
        cra_info: where the CRA pairs come from (:meth:`CRASource.describe`), for ``metrics.json``.
        tracking, run_config: the ``tracking`` section and the resolved config it records.
        on_ready: called on the main process once the inputs are usable (writes config.yaml).

    Returns:
        The metrics written to ``metrics.json`` (empty on non-main processes).
    """
    from accelerate.utils import set_seed

    rel = reliability or ReliabilityConfig()
    out = Path(output_dir)
    accelerator = dist.make_accelerator(s.loop.precision)
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    set_seed(s.seed)
    if s.mntp.enabled and s.lora.quantization != "none":
        raise ValueError(
            "stage1.mntp with a quantized base is not supported: run MNTP on a full-precision base"
        )
    if s.batch_size % world:
        raise ValueError(f"stage1.batch_size {s.batch_size} is not divisible by the {world} processes")
    if s.adapters and s.lora.quantization != "none":
        raise ValueError("stage1.adapters cannot merge into a quantized base: merge them with import-encoder first")
    if s.mntp.enabled and (Path(s.model) / ENCODER_FILE).is_file():
        raise ValueError(
            f"stage1.model {s.model} is a caption encoder, which has no LM head for MNTP: start MNTP "
            "from the base LLM with stage1.adapters (as the reference), or turn stage1.mntp off"
        )

    ref = resolve_model_ref(s.model)
    tokenizer = load_tokenizer(ref)
    log.info(
        "stage 1: captions wrapped as %r", resolve_caption_template(s.caption_template, tokenizer) or "{text}"
    )
    weight_dtype = _weight_dtype(s, accelerator.device)
    instructions = {"short": s.instruction_short_query, "long": s.instruction_long_query}
    if s.e5.path:  # the reference's E5 tasks + the captions as one task (logs the per-task counts)
        batches: SimCSEBatches | TaskBatches = TaskBatches(s.e5.path, s.e5.tasks, train_records, instructions, s.batch_size, s.seed)  # fmt: skip
    else:
        batches = SimCSEBatches(
            train_records, instructions, s.seed, s.hard_negatives, s.similar_negatives, pairing=s.pairing
        )
    pairs = caption_pairs(heldout_records, s.cra_captions)
    over_long = over_long_captions(tokenizer, train_records, s.max_length) if main else {}
    steps = total_steps(s, batches)
    log.info(
        "stage 1: %s, %d training samples, %d steps of %d queries (%d per process), CRA on %d captions",
        s.model, len(batches), steps, s.batch_size, s.batch_size // world, 2 * len(pairs),
    )  # fmt: skip

    model = load_bidirectional(
        ref, with_lm_head=s.mntp.enabled, attn_implementation=s.attn_implementation, dtype=weight_dtype,
        quantization=s.lora.quantization,
        device_map={"": accelerator.device} if s.lora.quantization != "none" else None,
        allow_pickle=rel.allow_pickle_weights,
    )  # fmt: skip
    merge_adapters(model, s.adapters)
    if s.lora.quantization == "none":
        model.to(accelerator.device)
    if main:  # once the inputs (data, base weights) are known to be usable
        out.mkdir(parents=True, exist_ok=True)
        if on_ready is not None:
            on_ready()

    cra_before = _cra_before(decoder_of(model), tokenizer, s, pairs, out) if main else None
    accelerator.wait_for_everyone()

    if s.mntp.enabled:
        captions = [c.text for r in train_records for c in r.captions]
        model = train_mntp(
            model, tokenizer, s, captions, list(text_corpus), text_corpus_ratio,
            out / CHECKPOINTS / MNTP_CHECKPOINTS, accelerator, rel,
        )  # fmt: skip

    peft_model = wrap_lora(decoder_of(model), s)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = adamw(trainable, s.lr, accelerator.device, weight_decay=s.weight_decay)
    scheduler = make_scheduler(optimizer, s.loop, steps)
    run = Run("stage1", s.loop, out / CHECKPOINTS, accelerator,
              skip_nonfinite=rel.skip_nonfinite_steps, max_skipped=rel.max_skipped_steps)  # fmt: skip
    if run.resumed_weights is not None:
        load_adapter(peft_model, run.resumed_weights)
    tracker = RunTracker.start(
        out, tracking or TrackingConfig(), stage="stage1", main=main,
        resume_step=run.state.step if run.resumed is not None else None, config=run_config,
    )  # fmt: skip
    tracker.log(0, {"cra": cra_before})
    ddp_model, optimizer = run.prepare(peft_model, optimizer, scheduler)
    loss_fn = SupervisedSimCSELoss(scale=s.scale)
    local = s.batch_size // world

    def my_batches() -> Iterator[list[Triplet]]:
        for k in range(run.state.step, steps):
            yield batches.batch(k, s.batch_size)[rank * local : (rank + 1) * local]

    def step(triplets: list[Triplet]) -> StepOutput:
        k = run.state.step
        with accelerator.autocast():
            q, p, n = embed_triplets(ddp_model, tokenizer, triplets, s, accelerator.device)
        loss = loss_fn(q, p, n)
        accelerator.backward(loss)
        # Each rank's loss is the mean over its rows; their mean is the global-batch loss.
        # Tokens of the global batch, counted only when the tracker logs the step.
        tokens = lambda: _token_count(tokenizer, batches.batch(k, s.batch_size), s.max_length)  # noqa: E731
        return StepOutput(
            round(dist.reduce_float(accelerator, loss), 6),
            f"lr {scheduler.get_last_lr()[0]:.2e}",
            {"tokens": tokens},
        )

    def weights() -> dict[str, torch.Tensor] | None:
        return adapter_state(peft_model) if main else None

    stage = Stage("stage 1 SimCSE", ddp_model, optimizer, scheduler, step, weights, peft_model.parameters,
                  samples_per_step=s.batch_size, unit="queries")  # fmt: skip
    state = run.train(stage, my_batches(), steps, tracker=tracker)

    merged = merge_lora(accelerator.unwrap_model(ddp_model), ref, s, weight_dtype)
    metrics: dict[str, Any] = {}
    if main:
        encoder = CaptionEncoder(
            merged,
            tokenizer,
            s.max_length,
            {"short_query": s.instruction_short_query, "long_query": s.instruction_long_query},
            s.pooling,
            s.pad_to_multiple_of,
            caption_template=resolve_caption_template(s.caption_template, tokenizer),
        )
        encoder.save_pretrained(out / "encoder")
        # Zero steps leave the weights as they were (the LoRA's B is zero): CRA is unchanged.
        cra_after = _cra(merged, tokenizer, s, pairs) if state.step else cra_before
        metrics = {
            "cra_before": cra_before,
            "cra_after": cra_after,
            "cra_captions": 2 * len(pairs),
            **(cra_info or {}),
            "steps": state.step,
            "planned_steps": steps,
            "train_seconds": round(state.seconds, 1),
            "seconds_per_step": round(state.seconds / max(1, len(state.losses)), 3),
            "global_batch": s.batch_size,
            **({"tasks": batches.describe()} if isinstance(batches, TaskBatches) else {}),
            "processes": world,
            "loss": state.losses,
            "skipped_steps": state.skipped_steps,
            "encoder": str(out / "encoder"),
            "encoder_identity": encoder.identity(),
            "captions_over_max_length": over_long,
        }
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        tracker.log(state.step, {"cra": cra_after})
        log.info(
            "stage 1 done: CRA %.1f -> %.1f after %d steps (%.0f s)",
            cra_before,
            cra_after,
            state.step,
            state.seconds,
        )
    tracker.finish()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


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


CRA_BEFORE = "cra_before.json"


def _cra_before(
    decoder: nn.Module, tokenizer: Any, s: Stage1Config, pairs: list[tuple[str, str]], out: Path
) -> float:
    """CRA of the untrained model, computed once per run directory: a resumed run reads it back
    (it depends only on the base model, the caption pairs and the encoding settings)."""
    import hashlib

    key = hashlib.sha256(
        json.dumps(
            [s.model, s.adapters, s.max_length, s.pad_to_multiple_of, s.loop.precision, s.caption_template, pairs]
        ).encode()
    ).hexdigest()
    cached = out / CRA_BEFORE
    if cached.is_file():
        try:
            saved = json.loads(cached.read_text())
        except json.JSONDecodeError:
            saved = {}
        if saved.get("key") == key:
            log.info("CRA before training: %.1f (computed by an earlier run, %s)", saved["cra"], cached)
            return float(saved["cra"])
    cra = _cra(decoder, tokenizer, s, pairs)
    cached.write_text(json.dumps({"key": key, "cra": cra}) + "\n")
    return cra


def _cra(decoder: nn.Module, tokenizer: Any, s: Stage1Config, pairs: list[tuple[str, str]]) -> float:
    encoder = CaptionEncoder(
        decoder, tokenizer, s.max_length, pad_to_multiple_of=s.pad_to_multiple_of,
        caption_template=resolve_caption_template(s.caption_template, tokenizer),
    )  # fmt: skip
    if s.loop.precision != "fp32":
        encoder.autocast_dtype = DTYPES[s.loop.precision]
    return round(caption_retrieval_accuracy(encoder, pairs, s.eval_batch_size), 2)


def _token_count(tokenizer: Any, triplets: list[Triplet], max_length: int) -> int:
    """Tokens the step embedded over all processes (queries with instructions, positives, negatives)."""
    texts = [(t.instruction or "") + t.query for t in triplets] + [t.positive for t in triplets]
    texts += [t.negative for t in triplets if t.negative is not None]
    return sum(len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"])
