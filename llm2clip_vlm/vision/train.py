"""Stage 2: align a vision encoder to the frozen LLM through stored caption embeddings.

Reads like the run it is, top to bottom:

1. data (:mod:`llm2clip_vlm.vision.data`): training images + their caption embeddings; per sample a
   long or a short caption at random (``long_caption_ratio``), decided by ``(seed, epoch, index)``
   alone, so every process count and every resumed run sees the same samples; sampled at random,
   or streamed from shards (its position saved with each checkpoint through the loop's
   ``data_state``);
2. model: :class:`LLM2CLIP` (backbone + new image head + text adaptor + logit scale);
3. optimiser: AdamW (0.9, 0.98, eps 1e-6), weight decay except on biases, norms and the logit
   scale, layer-wise lr decay over the ViT blocks, ``head_lr`` for the new parts, the loop's
   schedule (:mod:`llm2clip_vlm.training.optim`);
4. the step: ``ClipLoss`` / ``SigLipLoss`` (local loss, gather with grad), logit scale clamped after
   each update; everything else (precision, clipping, checkpoints, resume, signals, the NaN
   guard, the time budget) is the one loop's (:mod:`llm2clip_vlm.training.loop`);
5. zero-shot retrieval on every held-out set before and after training -> ``metrics.json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llm2clip_vlm.bad_samples import MidRunBadImages, gather_failures
from llm2clip_vlm.logging import get_logger
from llm2clip_vlm.reliability import ReliabilityConfig
from llm2clip_vlm.tracking.config import TrackingConfig
from llm2clip_vlm.tracking.gallery import write_retrieval_gallery
from llm2clip_vlm.tracking.tracker import RunTracker
from llm2clip_vlm.training import dist
from llm2clip_vlm.training.checkpoint import CHECKPOINTS
from llm2clip_vlm.training.loop import OnStep, Run, Stage, StepOutput
from llm2clip_vlm.training.losses import ClipLoss, SigLipLoss
from llm2clip_vlm.training.optim import adamw, grouped, make_scheduler
from llm2clip_vlm.vision.backbones import create_backbone
from llm2clip_vlm.vision.collapse import CollapseWatch
from llm2clip_vlm.vision.config import Stage2Config
from llm2clip_vlm.vision.data import (
    CaptionEmbeddings,
    HeldoutSet,
    ImageLoader,
    Stage2TrainData,
    epoch_size,
    train_loader,
)
from llm2clip_vlm.vision.decay import exempt_from_weight_decay
from llm2clip_vlm.vision.evaluate import evaluate_retrieval, log_retrieval
from llm2clip_vlm.vision.learning import LearningCheck
from llm2clip_vlm.vision.model import LLM2CLIP, stage2_model_config

log = get_logger(__name__)


def build_param_groups(model: LLM2CLIP, s: Stage2Config) -> list[dict[str, Any]]:
    """AdamW parameter groups: (layer, decay / no decay), each with its own lr.

    - no weight decay on 0/1-d parameters (biases, norm scales, logit scale/bias) nor on the
      positional and class embeddings (:mod:`llm2clip_vlm.vision.decay`, as the reference);
    - backbone layer ``l`` (0 = stem, ``L + 1`` = after the last block) gets
      ``lr * layer_decay ** (L + 1 - l)``;
    - the new parts (image head, text adaptor, logit scale/bias) get ``head_lr`` (or ``lr``).

    Each group carries ``lr_scale`` (relative to ``lr``) and ``name`` for logs and tests.
    """
    head_lr = s.head_lr or s.lr
    layer_of = model.vision.layer_ids()
    top = model.vision.num_layers + 1

    def part_of(name: str) -> tuple[str, float]:
        if name.startswith("vision."):
            layer = layer_of[name[len("vision.") :]]
            return f"vision.layer{layer}", s.lr * s.layer_decay ** (top - layer)
        return "new", head_lr

    return grouped(model.named_parameters(), part_of, s.weight_decay, s.lr, no_decay=exempt_from_weight_decay)


def total_steps(s: Stage2Config, n_images: int) -> int:
    """``loop.max_steps``, else ``loop.epochs`` passes of full global batches (at least 1)."""
    if s.loop.max_steps > 0:
        return s.loop.max_steps
    return max(1, int(s.loop.epochs * (n_images // s.batch_size)))


def train_stage2(
    s: Stage2Config,
    output_dir: str | Path,
    train_records: Sequence[Any],
    embeddings: CaptionEmbeddings,
    heldout: dict[str, HeldoutSet],
    *,
    load_image: ImageLoader,
    reliability: ReliabilityConfig | None = None,
    encoder_path: str = "",
    encoder_identity: str = "",
    on_step: OnStep | None = None,
    usable: Sequence[int] | None = None,
    skip_bad: bool = False,
    max_bad_fraction: float = 0.01,
    tracking: TrackingConfig | None = None,
    run_config: dict[str, Any] | None = None,
    on_ready: Callable[[], None] | None = None,
    shuffle_buffer: int = 0,
) -> dict[str, Any]:
    """Train stage 2 and write ``model/`` and ``metrics.json`` into ``output_dir``.

    Args:
        s: the ``stage2`` section.
        output_dir: run directory; a checkpoint in it is resumed from.
        train_records: training images (``embeddings`` rows follow their captions' order).
        embeddings: caption embeddings of ``train_records`` (the store, already checked).
        heldout: retrieval sets by name.
        load_image: record -> PIL RGB image.
        reliability: what to do with non-finite steps (default: stop).
        encoder_path, encoder_identity: the stage-1 encoder, recorded in the saved model.
        on_step: called as ``on_step(step, loss)`` after every optimizer step (main process).
        usable: indices of the records to train on (default all; bad images left out).
        skip_bad, max_bad_fraction: images found unreadable while training (``data.*``): stop, or
            replace them deterministically and stop above this share.
        tracking, run_config: the ``tracking`` section and the resolved config it records.
        on_ready: called on the main process once the inputs are usable (writes config.yaml).
        shuffle_buffer: 0 = sample the records at random; otherwise stream them (``data.stream``)
            through a shuffle buffer of this many records.

    Returns:
        The metrics written to ``metrics.json`` (``{"stage2": {...}}``).
    """
    from accelerate.utils import set_seed

    rel = reliability or ReliabilityConfig()
    out = Path(output_dir)
    accelerator = dist.make_accelerator(s.loop.precision)
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    usable = list(usable) if usable is not None else range(len(train_records))  # no list at 10M
    # A weighted list of sets (data.train[i].weight) changes how many samples an epoch holds.
    steps = total_steps(s, epoch_size(train_records, usable, s.seed))

    set_seed(s.seed)  # identical initial weights on every rank (DDP also broadcasts them)
    model = LLM2CLIP(
        stage2_model_config(s, embeddings.dim, encoder_path, encoder_identity),
        backbone=create_backbone(s.backbone, allow_pickle=rel.allow_pickle_weights),
    )
    if main and on_ready is not None:  # once the inputs (stores, backbone weights) are known to be usable
        out.mkdir(parents=True, exist_ok=True)
        on_ready()
    if s.gradient_checkpointing:
        model.vision.set_grad_checkpointing(True)
    processor = model.vision.image_processor
    # Each rank slices the global batch, so only the same number of processes continues a run.
    run = Run("stage2", s.loop, out / CHECKPOINTS, accelerator, skip_nonfinite=rel.skip_nonfinite_steps,
              max_skipped=rel.max_skipped_steps, same_world_size=True)  # fmt: skip
    if run.resumed_weights is not None:
        model.load_state_dict(run.resumed_weights)
    model = run.shard(model, model.fsdp_blocks())  # FSDP2 only; before the optimizer is built
    optimizer = adamw(build_param_groups(model, s), s.lr, accelerator.device, betas=tuple(s.betas), eps=s.eps)
    scheduler = make_scheduler(optimizer, s.loop, steps)
    model, optimizer = run.prepare(model, optimizer, scheduler)
    raw = accelerator.unwrap_model(model)
    loss_fn: nn.Module = SigLipLoss() if s.loss == "siglip" else ClipLoss()

    log.info(
        "stage 2: %s backbone (%s), %.1fM parameters all trained, %d images, %d steps of %d (%d per process), "
        "%s, long-caption ratio %.2f",
        s.backbone.kind, s.backbone.name_or_path or "random", sum(p.numel() for p in raw.parameters()) / 1e6,
        len(usable), steps, s.batch_size, s.batch_size // world, s.loop.precision, s.long_caption_ratio,
    )  # fmt: skip

    def run_eval(similarities: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        return evaluate_retrieval(
            model, heldout, processor, load_image, s.eval_batch_size, s.num_workers,
            accelerator.device, accelerator.autocast, similarities,
        )  # fmt: skip

    state = run.state
    if not state.extra.get("retrieval_before"):
        state.extra["retrieval_before"] = run_eval()
        log_retrieval("before", state.extra["retrieval_before"])
    tracker = RunTracker.start(
        out, tracking or TrackingConfig(), stage="stage2", main=main,
        resume_step=state.step if run.resumed is not None else None, config=run_config,
    )  # fmt: skip
    tracker.log(0, {"retrieval": state.extra["retrieval_before"]})
    bad_images = MidRunBadImages(
        skip_bad,
        max_bad_fraction,
        out,
        "train",
        len(train_records),
        state.extra.get("bad_images", []),
        write=main,
    )

    dataset = Stage2TrainData(
        train_records, embeddings, processor, load_image, s.long_caption_ratio, s.seed, indices=usable,
        crop_scale=s.random_resized_crop,
    )  # fmt: skip
    loader = train_loader(
        dataset, batch_size=s.batch_size, rank=rank, world=world, start_step=state.step, total_steps=steps,
        num_workers=s.num_workers, shuffle_buffer=shuffle_buffer, saved=state.extra.get("data"),
        skip_bad=skip_bad, max_bad_fraction=max_bad_fraction,
        pin_memory=accelerator.device.type == "cuda",  # the host-to-device copies overlap compute
    )  # fmt: skip
    last_scale: list[float] = []
    collapse = CollapseWatch()
    # Is it learning? Retrieval on a fixed slice of training images every epoch (or N steps), next
    # to the loss; one warning when neither moved after the warm-up and an epoch.
    learning = LearningCheck.for_stage2(
        s, steps, train_records, embeddings, usable, processor, load_image, state.extra, main=main
    )

    def check_learning() -> None:
        learning(state.step, state.losses, model, accelerator.device, accelerator.autocast, s.eval_batch_size,
                 tracker, quiet=collapse.warned)  # fmt: skip

    def step(batch: tuple[torch.Tensor, torch.Tensor, Any]) -> StepOutput:
        # The model as it is after ``state.step`` updates (every process: a forward under FSDP).
        if learning.due(state.step):
            check_learning()
        # Images unreadable mid-run: stop naming the file unless data.skip_bad; every rank decides alike.
        bad_images.add(gather_failures(accelerator, batch[2]))
        state.extra["bad_images"] = [list(x) for x in bad_images.seen]
        pv, emb = (t.to(accelerator.device, non_blocking=True) for t in batch[:2])
        with accelerator.autocast():
            feats = model(pixel_values=pv, text_embeddings=emb)
        scale = feats["logit_scale"].float()
        if s.loss == "siglip":
            loss = loss_fn(
                feats["image_features"], feats["text_features"], scale, feats["logit_bias"].float()
            )
        else:
            loss = loss_fn(feats["image_features"], feats["text_features"], scale)
        accelerator.backward(loss)
        collapse.update(state.step + 1, feats["image_features"], feats["text_features"])
        # From the forward, not the parameter: under FSDP a rank's own shard of it may be empty.
        last_scale[:] = [round(feats["logit_scale"].item(), 4)]
        return StepOutput(
            dist.reduce_float(accelerator, loss), f"scale {last_scale[0]:.1f}", {"logit_scale": last_scale[0]}
        )

    def weights() -> dict[str, torch.Tensor] | None:
        return accelerator.get_state_dict(model)  # collective under FSDP: every rank calls it

    stage = Stage("stage 2", model, optimizer, scheduler, step, weights, model.parameters,
                  after_update=raw.clamp_logit_scale, samples_per_step=s.batch_size, unit="img",
                  data_state=getattr(loader, "state_dict", None))  # fmt: skip
    run.train(stage, loader, steps, on_step, tracker)
    check_learning()

    similarities: dict[str, torch.Tensor] = {}
    after = run_eval(similarities)
    log_retrieval("after", after)
    tracker.log(state.step, {"retrieval": after})
    if main:  # what the report's retrieval gallery shows
        write_retrieval_gallery(out, heldout, similarities, load_image)
    metrics = {
        "stage2": {
            "retrieval": after,
            "retrieval_before": state.extra["retrieval_before"],
            "train": {
                "steps": state.step,
                "total_steps": steps,
                "seconds": round(state.seconds, 2),
                "images_per_second": round(run.samples_per_second, 2),
                "first_loss": state.losses[0] if state.losses else None,
                "final_loss": state.losses[-1] if state.losses else None,
                "losses": state.losses,
                "skipped_steps": state.skipped_steps,
                "bad_images": len(state.extra.get("bad_images", [])),
                "processes": world,
                "logit_scale": last_scale[0] if last_scale else None,
                "train_retrieval": learning.history,
                "not_learning": learning.warned,
            },
        }
    }
    to_save: LLM2CLIP | None = raw
    if run.fsdp2:
        # Sharded parameters: gather the full state (a collective) into a fresh copy on the main rank.
        full = run.full_weights(model)
        to_save = LLM2CLIP(raw.config) if main else None
        if to_save is not None:
            to_save.load_state_dict(full)
    if main and to_save is not None:
        out.mkdir(parents=True, exist_ok=True)
        to_save.save_pretrained(out / "model")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    tracker.finish()
    accelerator.wait_for_everyone()
    return metrics
