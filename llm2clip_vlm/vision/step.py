"""One stage-2 step: images and their captions' stored embeddings -> contrastive loss -> backward.

:class:`Stage2Step` is what the trainer (:mod:`llm2clip_vlm.vision.train`) hands the one loop as
``Stage.step``, and what ``bench stage2`` times (its ``offline`` variant whole; ``online`` and
``lora`` through :meth:`Stage2Step.forward_backward` after embedding the captions themselves):
a change here moves both.

The loss is ``ClipLoss`` or ``SigLipLoss`` (local loss, features gathered with gradient), so the
loss each rank returns is already the global batch's; the loop clamps the logit scale after each
update (``LLM2CLIP.clamp_logit_scale``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from llm2clip_vlm.training import dist
from llm2clip_vlm.training.loop import StepOutput, TrainState
from llm2clip_vlm.training.losses import ClipLoss, SigLipLoss
from llm2clip_vlm.vision.collapse import CollapseWatch


class Stage2Step:
    """``step((pixel_values, text_embeddings, failures))`` for the loop.

    Args:
        accelerator: the run's accelerator (autocast, backward, the loss reduced over ranks).
        model: the prepared :class:`~llm2clip_vlm.vision.model.LLM2CLIP`.
        loss: ``clip`` or ``siglip`` (``stage2.loss``).
        before: called with the batch before the forward (the trainer's not-learning check and
            mid-run bad images); None in a benchmark.
        collapse: watches the features for a collapse; None in a benchmark.
        state: the run's state (the step the collapse watch is told); None in a benchmark.
    """

    def __init__(
        self,
        accelerator: Any,
        model: nn.Module,
        loss: str = "clip",
        before: Callable[[Any], None] | None = None,
        collapse: CollapseWatch | None = None,
        state: TrainState | None = None,
    ) -> None:
        self.accelerator, self.model, self.siglip = accelerator, model, loss == "siglip"
        self.loss_fn: nn.Module = SigLipLoss() if self.siglip else ClipLoss()
        self.before, self.collapse, self.state = before, collapse, state
        # The logit scale of the last step, from the forward (under FSDP a rank's own shard of
        # the parameter may be empty).
        self.last_scale: float | None = None

    def forward_backward(
        self, pixel_values: torch.Tensor, text_embeddings: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This rank's loss of one batch, backpropagated; returns (loss, the model's outputs)."""
        with self.accelerator.autocast():
            feats = self.model(pixel_values=pixel_values, text_embeddings=text_embeddings)
        scale = feats["logit_scale"].float()
        if self.siglip:
            loss = self.loss_fn(
                feats["image_features"], feats["text_features"], scale, feats["logit_bias"].float()
            )
        else:
            loss = self.loss_fn(feats["image_features"], feats["text_features"], scale)
        self.accelerator.backward(loss)
        return loss, feats

    def __call__(self, batch: tuple[torch.Tensor, torch.Tensor, Any]) -> StepOutput:
        if self.before is not None:
            self.before(batch)
        device = self.accelerator.device
        pv, emb = (t.to(device, non_blocking=True) for t in batch[:2])
        loss, feats = self.forward_backward(pv, emb)
        if self.collapse is not None and self.state is not None:
            self.collapse.update(self.state.step + 1, feats["image_features"], feats["text_features"])
        self.last_scale = round(feats["logit_scale"].item(), 4)
        return StepOutput(
            dist.reduce_float(self.accelerator, loss),
            f"scale {self.last_scale:.1f}",
            {"logit_scale": self.last_scale},
        )
