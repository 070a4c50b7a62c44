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
5. zero-shot retrieval on every held-out set before and after training -> ``metrics.json`` (the
   one schema of :mod:`llm2clip_vlm.training.session`, which also opens and closes the run).

The step itself is :class:`~llm2clip_vlm.vision.step.Stage2Step` (``bench stage2`` times it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from llm2clip_vlm.logging import get_logger
from llm2clip_vlm.tracking.gallery import write_retrieval_gallery
from llm2clip_vlm.training.checkpoint import CHECKPOINTS
from llm2clip_vlm.training.loop import Run
from llm2clip_vlm.training.optim import adamw, grouped, make_scheduler
from llm2clip_vlm.training.session import RunInputs, Session, metrics_document, train_summary
from llm2clip_vlm.vision.backbones import create_backbone
from llm2clip_vlm.vision.config import Stage2Config
from llm2clip_vlm.vision.data import (
    Stage2TrainData,
    epoch_size,
    train_loader,
)
from llm2clip_vlm.vision.decay import exempt_from_weight_decay
from llm2clip_vlm.vision.evaluate import evaluate_retrieval, log_retrieval
from llm2clip_vlm.vision.model import LLM2CLIP, stage2_model_config
from llm2clip_vlm.vision.stage import Stage2Data, stage2_training

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
    s: Stage2Config, output_dir: str | Path, data: Stage2Data, inputs: RunInputs | None = None
) -> dict[str, Any]:
    """Train stage 2 and write ``model/`` and ``metrics.json`` into ``output_dir``.

    Args:
        s: the ``stage2`` section.
        output_dir: run directory; a checkpoint in it is resumed from.
        data: the records, their embeddings, the held-out sets and the bad-image policy.
        inputs: reliability, tracking, config.yaml writer, ``on_step`` (the command layer's).

    Returns:
        The metrics written to ``metrics.json``.
    """
    from accelerate.utils import set_seed

    session = Session(output_dir, "stage2", s.loop.precision, inputs)
    # A weighted list of sets (data.train[i].weight) changes how many samples an epoch holds.
    steps = total_steps(s, epoch_size(data.train_records, data.positions, s.seed))
    set_seed(s.seed)  # identical initial weights on every rank (DDP also broadcasts them)
    model = build_model(s, data, session)
    session.ready()  # once the inputs (stores, backbone weights) are known to be usable
    if s.gradient_checkpointing:
        model.vision.set_grad_checkpointing(True)
    # Each rank slices the global batch, so only the same number of processes continues a run.
    run = session.open_run("stage2", s.loop, session.out / CHECKPOINTS, same_world_size=True)
    if run.resumed_weights is not None:
        model.load_state_dict(run.resumed_weights)
    model = run.shard(model, model.fsdp_blocks())  # FSDP2 only; before the optimizer is built
    optimizer = adamw(build_param_groups(model, s), s.lr, session.device, betas=tuple(s.betas), eps=s.eps)
    scheduler = make_scheduler(optimizer, s.loop, steps)
    model, optimizer = run.prepare(model, optimizer, scheduler)
    log_setup(s, session.accelerator.unwrap_model(model), len(data.positions), steps, session.world)

    state = run.state
    if not state.extra.get("retrieval_before"):
        state.extra["retrieval_before"] = evaluate(model, s, data, session)
        log_retrieval("before", state.extra["retrieval_before"])
    tracker = session.start_tracker(run)
    tracker.log(0, {"retrieval": state.extra["retrieval_before"]})
    loader = stage2_loader(s, data, model_processor(model, session.accelerator), session, run, steps)
    training = stage2_training(session, run, tracker, model, (optimizer, scheduler), loader, s, data, steps)
    run.train(training.stage, training.loader, steps, session.on_step, tracker)
    training.check_learning()

    similarities: dict[str, torch.Tensor] = {}
    after = evaluate(model, s, data, session, similarities)
    log_retrieval("after", after)
    tracker.log(state.step, {"retrieval": after})
    if session.main:  # what the report's retrieval gallery shows
        write_retrieval_gallery(session.out, data.heldout, similarities, data.load_image)
    retrieval = {"metric": "retrieval", "before": state.extra["retrieval_before"], "after": after}
    metrics = metrics_document(
        "stage2",
        train_summary(state, steps, run, s.batch_size, session.world),
        retrieval,
        training.details(),
    )
    save_model(run, model, session)
    session.write_metrics(metrics)
    session.close()
    return metrics


def build_model(s: Stage2Config, data: Stage2Data, session: Session) -> LLM2CLIP:
    """:class:`LLM2CLIP`: the backbone (random or pretrained), the new image head, the text adaptor."""
    config = stage2_model_config(s, data.embeddings.dim, data.encoder_path, data.encoder_identity)
    return LLM2CLIP(
        config, backbone=create_backbone(s.backbone, allow_pickle=session.reliability.allow_pickle_weights)
    )


def log_setup(s: Stage2Config, raw: nn.Module, images: int, steps: int, world: int) -> None:
    """One line: what is trained, on how many images, in how many steps of which batch."""
    params = sum(p.numel() for p in raw.parameters()) / 1e6
    log.info(
        "stage 2: %s backbone (%s), %.1fM parameters all trained, %d images, %d steps of %d (%d per process), "
        "%s, long-caption ratio %.2f",
        *(s.backbone.kind, s.backbone.name_or_path or "random", params, images, steps, s.batch_size),
        *(s.batch_size // world, s.loop.precision, s.long_caption_ratio),
    )


def evaluate(
    model: nn.Module,
    s: Stage2Config,
    data: Stage2Data,
    session: Session,
    sims: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Zero-shot retrieval on every held-out set (every process: a forward under FSDP); ``sims``:
    a dict that receives the similarity matrices (the report's gallery)."""
    acc = session.accelerator
    loader = (data.load_image, s.eval_batch_size, s.num_workers, acc.device, acc.autocast)
    return evaluate_retrieval(model, data.heldout, model_processor(model, acc), *loader, sims)


def model_processor(model: nn.Module, accelerator: Any) -> Any:
    """The backbone's image processor (resize, crop, normalise), through any DDP/FSDP wrapper."""
    return accelerator.unwrap_model(model).vision.image_processor


def stage2_loader(
    s: Stage2Config, data: Stage2Data, processor: Any, session: Session, run: Run, steps: int
) -> Any:
    """This rank's batches from the resumed step on: sampled at random, or streamed (its position
    restored from the checkpoint's ``data`` state)."""
    dataset = Stage2TrainData(
        data.train_records,
        data.embeddings,
        processor,
        data.load_image,
        s.long_caption_ratio,
        s.seed,
        indices=data.positions,
        crop_scale=s.random_resized_crop,
    )
    return train_loader(
        dataset,
        batch_size=s.batch_size,
        rank=session.rank,
        world=session.world,
        start_step=run.state.step,
        total_steps=steps,
        num_workers=s.num_workers,
        shuffle_buffer=data.shuffle_buffer,
        saved=run.state.extra.get("data"),
        skip_bad=data.policy.skip_bad,
        max_bad_fraction=data.policy.max_bad_fraction,
        pin_memory=session.device.type == "cuda",  # the host-to-device copies overlap compute
    )


def save_model(run: Run, model: nn.Module, session: Session) -> None:
    """``model/`` on the main process; under FSDP2 the sharded parameters are gathered first (a
    collective) into a fresh copy."""
    raw = session.accelerator.unwrap_model(model)
    to_save: LLM2CLIP | None = raw
    if run.fsdp2:
        full = run.full_weights(model)
        to_save = LLM2CLIP(raw.config) if session.main else None
        if to_save is not None:
            to_save.load_state_dict(full)
    if session.main and to_save is not None:
        session.out.mkdir(parents=True, exist_ok=True)
        to_save.save_pretrained(session.out / "model")
