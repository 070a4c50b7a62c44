"""What stage 2 hands the one loop: its inputs, its :class:`~llm2clip_vlm.training.loop.Stage`
(:class:`~llm2clip_vlm.vision.step.Stage2Step` and the weights), and the checks around its steps
(images unreadable mid-run, the not-learning check on a training slice, the collapse watch)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import nn

from llm2clip_vlm.bad_samples import MidRunBadImages, gather_failures
from llm2clip_vlm.data.config import DataPolicy
from llm2clip_vlm.tracking.tracker import RunTracker
from llm2clip_vlm.training.loop import Run, Stage
from llm2clip_vlm.training.session import Session
from llm2clip_vlm.vision.collapse import CollapseWatch
from llm2clip_vlm.vision.config import Stage2Config
from llm2clip_vlm.vision.data import CaptionEmbeddings, HeldoutSet, ImageLoader
from llm2clip_vlm.vision.learning import LearningCheck
from llm2clip_vlm.vision.step import Stage2Step


@dataclass
class Stage2Data:
    """What stage 2 trains and evaluates on, as the command layer resolved it.

    Attributes:
        train_records: training images (``embeddings`` rows follow their captions' order).
        embeddings: caption embeddings of ``train_records`` (the store, already checked).
        heldout: retrieval sets by name.
        load_image: record -> PIL RGB image.
        usable: indices of the records to train on (default all; bad images left out).
        encoder_path, encoder_identity: the stage-1 encoder, recorded in the saved model.
        policy: the data policy (``data.*``): images found unreadable while training stop the run,
            or (``skip_bad``) are replaced deterministically up to ``max_bad_fraction``; with
            ``stream``, the records are streamed through a shuffle buffer.
    """

    train_records: Sequence[Any]
    embeddings: CaptionEmbeddings
    heldout: dict[str, HeldoutSet]
    load_image: ImageLoader
    usable: Sequence[int] | None = None
    encoder_path: str = ""
    encoder_identity: str = ""
    policy: DataPolicy = field(default_factory=DataPolicy)

    @property
    def shuffle_buffer(self) -> int:
        """0 = sample the records at random; otherwise stream them through a buffer this big."""
        return self.policy.shuffle_buffer if self.policy.stream else 0

    @cached_property
    def positions(self) -> Sequence[int]:
        """The record indices trained on (a range when all are: no list at 10M records)."""
        return list(self.usable) if self.usable is not None else range(len(self.train_records))


@dataclass
class Stage2Training:
    """What the loop runs, and the checks around its steps: images unreadable mid-run, the
    not-learning check on a training slice, the collapse watch (inside :class:`Stage2Step`)."""

    stage: Stage
    loader: Any
    step: Stage2Step
    learning: LearningCheck
    check_learning: Callable[[], None]
    bad_images: MidRunBadImages

    def details(self) -> dict[str, Any]:
        """Stage 2's own part of ``metrics.json``."""
        return {
            "bad_images": len(self.bad_images.seen),
            "logit_scale": self.step.last_scale,
            "train_retrieval": self.learning.history,
            "not_learning": self.learning.warned,
        }


def stage2_training(
    session: Session,
    run: Run,
    tracker: RunTracker,
    model: nn.Module,
    updates: tuple[Any, Any],
    loader: Any,
    s: Stage2Config,
    data: Stage2Data,
    steps: int,
) -> Stage2Training:
    """The hooks and the :class:`Stage` (``updates``: the optimizer and scheduler; ``loader``: this
    rank's batches)."""
    acc, state = session.accelerator, run.state
    processor = acc.unwrap_model(model).vision.image_processor
    seen = state.extra.get("bad_images", [])
    bad_images = MidRunBadImages(
        data.policy.skip_bad,
        data.policy.max_bad_fraction,
        session.out,
        "train",
        len(data.train_records),
        seen,
        write=session.main,
    )
    collapse = CollapseWatch()
    # Is it learning? Retrieval on a fixed slice of training images every epoch (or N steps), next
    # to the loss; one warning when neither moved after the warm-up and an epoch.
    records, embeddings, load_image = data.train_records, data.embeddings, data.load_image
    learning = LearningCheck.for_stage2(
        s, steps, records, embeddings, data.positions, processor, load_image, state.extra, main=session.main
    )

    def check_learning() -> None:
        measure = (model, acc.device, acc.autocast, s.eval_batch_size, tracker)
        learning(state.step, state.losses, *measure, quiet=collapse.warned)

    def before_step(batch: tuple[torch.Tensor, torch.Tensor, Any]) -> None:
        # The model as it is after ``state.step`` updates (every process: a forward under FSDP).
        if learning.due(state.step):
            check_learning()
        # Images unreadable mid-run: stop naming the file unless data.skip_bad; every rank decides alike.
        bad_images.add(gather_failures(acc, batch[2]))
        state.extra["bad_images"] = [list(x) for x in bad_images.seen]

    def weights() -> dict[str, torch.Tensor] | None:
        return acc.get_state_dict(model)  # collective under FSDP: every rank calls it

    step = Stage2Step(acc, model, s.loss, before_step, collapse, state)
    hooks = {
        "after_update": acc.unwrap_model(model).clamp_logit_scale,
        "data_state": getattr(loader, "state_dict", None),
    }
    parts = (model, *updates, step, weights, model.parameters)
    stage = Stage("stage 2", *parts, **hooks, samples_per_step=s.batch_size, unit="img")
    return Stage2Training(stage, loader, step, learning, check_learning, bad_images)
