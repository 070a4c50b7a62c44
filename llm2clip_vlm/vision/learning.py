"""Is stage 2 learning? Retrieval on a slice of the training set next to the loss, and one warning
when, after the warm-up and an epoch, neither has moved.

The collapse warning (:mod:`llm2clip_vlm.vision.collapse`) catches one way of learning nothing:
every feature the same. A run can also learn nothing with healthy-looking, distinct features: the
loss hovers at ln(batch) and retrieval stays at chance, even on the images it trains on (issue 28:
a from-scratch ViT on a world of tilted glyphs over striped grounds, 276 steps, loss 4.13 -> 3.96,
held-out R@1 at chance, no warning). Held-out retrieval is only measured at the end; retrieval on a
fixed slice of *training* images is cheap enough to measure every epoch (a forward over a few
hundred cached images) and tells early whether the model fits anything at all.

:class:`TrainSlice` holds the slice (pixel values decoded once, one short and one long caption
embedding per image); :class:`LearningWatch` decides, and warns once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from llm2clip_vlm.logging import get_logger
from llm2clip_vlm.vision.data import CaptionEmbeddings, ImageLoader, pixel_values
from llm2clip_vlm.vision.retrieval import retrieval_metrics

log = get_logger(__name__)

# The loss counts as "not moved" while it stays within this share of where it started (ln(batch)
# for the CLIP loss: the loss of features that tell nothing apart).
LOSS_SLACK = 0.05
# Training-slice R@1 counts as "at chance" below this multiple of chance in both directions: the
# floor held-out retrieval must pass (issue 28). A run stuck at ln(batch) can still rank a few of
# the very images it trains on first (3-8x chance measured on the poster world), so 3x would miss it.
CHANCE_FACTOR = 10.0


class TrainSlice:
    """A fixed slice of training images with their caption embeddings, for a cheap retrieval check.

    Images are spread evenly over the training set, decoded and preprocessed once (256 images at
    96 px are 28 MB); each contributes its first short and first long caption, so the check covers
    both caption kinds as training does. Images that fail to load are left out.
    """

    def __init__(
        self, pixels: torch.Tensor, text_embeddings: torch.Tensor, caption_image: torch.Tensor
    ) -> None:
        self.pixels, self.text_embeddings, self.caption_image = pixels, text_embeddings, caption_image

    @property
    def n_images(self) -> int:
        return int(self.pixels.shape[0])

    @classmethod
    def build(
        cls,
        records: Sequence[Any],
        embeddings: CaptionEmbeddings,
        positions: Sequence[int],
        image_processor: Any,
        load_image: ImageLoader,
        n_images: int,
    ) -> TrainSlice | None:
        """The slice of ``n_images`` of ``positions`` (record indices); None when fewer than 2 load."""
        if n_images <= 0 or len(positions) < 2:
            return None
        picks = np.unique(
            np.linspace(0, len(positions) - 1, min(n_images, len(positions))).round().astype(int)
        )
        pixels, rows, owners = [], [], []
        for p in picks:
            index = int(positions[int(p)])
            try:
                image = load_image(records[index])
            except Exception:  # noqa: BLE001 - a bad image only shrinks the slice; training reports it
                continue
            mine = [int(r[0]) for kind in ("short", "long") if len(r := embeddings.caption_rows(index, kind))]
            if not mine:
                continue
            pixels.append(pixel_values(image_processor, image))
            rows.extend(mine)
            owners.extend([len(pixels) - 1] * len(mine))
        if len(pixels) < 2:
            return None
        text = torch.from_numpy(np.asarray(embeddings[np.asarray(rows)], dtype=np.float32))
        return cls(torch.stack(pixels), text, torch.tensor(owners, dtype=torch.long))

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, device: torch.device, autocast: Callable[[], Any], batch_size: int = 256
    ) -> dict[str, float | int]:
        """R@1/5/10 both ways on the slice, with ``model`` (any wrapper: every process calls it)."""
        was_training = model.training
        model.eval()
        image_features, text_features = [], []
        for start in range(0, self.n_images, batch_size):
            with autocast():
                out = model(pixel_values=self.pixels[start : start + batch_size].to(device))
            image_features.append(out["image_features"].float())
        for start in range(0, len(self.text_embeddings), batch_size):
            with autocast():
                out = model(text_embeddings=self.text_embeddings[start : start + batch_size].to(device))
            text_features.append(out["text_features"].float())
        model.train(was_training)
        sim = torch.cat(image_features) @ torch.cat(text_features).T
        return retrieval_metrics(sim.cpu(), self.caption_image)


class LearningWatch:
    """Warns once when a run has learned nothing after the warm-up and one epoch.

    Args:
        first_step: the first step at which the check may fire (warm-up steps + one epoch's).
        loss_start: where the loss starts when nothing is told apart (``ln(batch)`` for the CLIP
            loss); None = the first recorded loss (the sigmoid loss, whose start depends on the bias).
        main: only the main process logs.
    """

    def __init__(self, first_step: int, loss_start: float | None, *, main: bool = True) -> None:
        self.first_step, self.loss_start, self.main = first_step, loss_start, main
        self.warned = False

    @staticmethod
    def chance(metrics: dict[str, float | int]) -> float:
        """R@1 of a random ranking in percent (both directions over an ``n``-image slice: ~1/n)."""
        return 100.0 / max(int(metrics["n_images"]), 1)

    def stalled(self, losses: Sequence[float], metrics: dict[str, float | int], window: int) -> bool:
        """Loss (mean of the last ``window`` steps) within LOSS_SLACK of its start, and R@1 at chance."""
        if not losses:
            return False
        start = self.loss_start if self.loss_start is not None else losses[0]
        recent = losses[-max(1, window) :]
        loss = sum(recent) / len(recent)
        best = max(float(metrics["i2t_r1"]), float(metrics["t2i_r1"]))
        at_chance = best < CHANCE_FACTOR * self.chance(metrics)
        return loss >= (1 - LOSS_SLACK) * start and at_chance

    def update(
        self, step: int, losses: Sequence[float], metrics: dict[str, float | int], window: int
    ) -> bool:
        """Check at ``step``; True when this call logged the warning (at most once per run)."""
        if self.warned or step < self.first_step or not self.stalled(losses, metrics, window):
            return False
        self.warned = True
        if not self.main:
            return True
        recent = losses[-max(1, window) :]
        start = self.loss_start if self.loss_start is not None else losses[0]
        log.warning(
            "stage 2 is not learning (step %d): the loss is %.3f (%.3f at the start%s) and retrieval on "
            "%d training images is near chance (R@1 I2T %.1f / T2I %.1f, chance %.1f). Likely causes: "
            "the caption embeddings do not describe the images (check the store's data and the stage-1 "
            "CRA); they keep only what all captions of an image share, because stage 1 paired a short "
            "caption with a long one (stage1.pairing cross_kind, the reference's, or any): try "
            "stage1.pairing=same_kind (the demo recipe's) with more stage-1 steps (same-kind pairs "
            "teach CRA more slowly), which keeps the long captions' colours and backgrounds (on a "
            "poster world: long-caption R@1 0.4 -> 8.8-10.8); what the captions name is beyond a "
            "from-scratch ViT in this many steps (small, shifted or tilted glyphs over busy "
            "backgrounds: start from a pretrained encoder, stage2.backbone.name_or_path; there "
            "smaller patches, a conv stem, other learning rates, logit scale or normalisation did "
            "not help, and more epochs only memorised the training images); learning rates too high for the warm-up (stage2.lr, stage2.head_lr, "
            "stage2.loop.warmup_steps), or too few steps (stage2.loop.epochs)",
            step, sum(recent) / len(recent), start,
            " = ln(batch)" if self.loss_start is not None else "", int(metrics["n_images"]),
            float(metrics["i2t_r1"]), float(metrics["t2i_r1"]), self.chance(metrics),
        )  # fmt: skip
        return True


def clip_loss_start(batch_size: int) -> float:
    """The CLIP loss of features that tell nothing apart: ln(global batch)."""
    return math.log(batch_size)


class LearningCheck:
    """Stage 2's check: training-slice retrieval every ``every`` steps, logged next to the loss (the
    console, ``metrics.jsonl`` lines of kind ``learning``, ``history``), and the :class:`LearningWatch`.

    ``extra`` is the run state's ``extra`` dict: the history and whether it warned survive a resume.
    """

    def __init__(
        self, train_slice: TrainSlice | None, watch: LearningWatch, every: int, extra: dict[str, Any]
    ) -> None:
        self.slice, self.watch, self.every, self.extra = train_slice, watch, max(1, every), extra
        self.history: list[dict[str, Any]] = extra.setdefault("train_retrieval", [])
        watch.warned = bool(extra.get("not_learning_warned", False))

    @classmethod
    def for_stage2(
        cls, s: Any, steps: int, records: Sequence[Any], embeddings: CaptionEmbeddings, positions: Sequence[int],
        image_processor: Any, load_image: ImageLoader, extra: dict[str, Any], *, main: bool,
    ) -> LearningCheck:  # fmt: skip
        """From the ``stage2`` section: every epoch unless ``train_retrieval_every_steps``; the watch
        may fire from warm-up + one epoch on."""
        per_epoch = max(1, len(positions) // s.batch_size)
        warmup = s.loop.warmup_steps or math.ceil(s.loop.warmup_ratio * steps)
        start = clip_loss_start(s.batch_size) if s.loss == "clip" else None
        sl = TrainSlice.build(
            records, embeddings, positions, image_processor, load_image, s.train_retrieval_images
        )
        return cls(
            sl,
            LearningWatch(warmup + per_epoch, start, main=main),
            s.train_retrieval_every_steps or per_epoch,
            extra,
        )

    @property
    def warned(self) -> bool:
        return bool(self.extra.get("not_learning_warned", False))

    def due(self, step: int) -> bool:
        return step > 0 and step % self.every == 0

    def __call__(
        self, step: int, losses: Sequence[float], model: nn.Module, device: torch.device,
        autocast: Callable[[], Any], batch_size: int, tracker: Any, *, quiet: bool = False,
    ) -> None:  # fmt: skip
        """Measure at ``step`` (once per step), log, and let the watch decide (``quiet``: do not warn,
        e.g. after the collapse warning, which already named the cause)."""
        if self.slice is None or (self.history and self.history[-1]["step"] == step):
            return
        m = self.slice.evaluate(model, device, autocast, batch_size)
        recent = losses[-self.every :]
        loss = sum(recent) / max(len(recent), 1)
        self.history.append({"step": step, "loss": round(loss, 4), **m})
        log.info(
            "stage 2 step %d: loss %.3f (mean of the last %d steps), retrieval on %d training images "
            "R@1 I2T %.1f / T2I %.1f (chance %.1f)",
            step, loss, len(recent), m["n_images"], m["i2t_r1"], m["t2i_r1"], LearningWatch.chance(m),
        )  # fmt: skip
        tracker.log(step, {"train_retrieval": m, "train_loss_mean": loss}, kind="learning")
        if not quiet and self.watch.update(step, losses, m, self.every):
            self.extra["not_learning_warned"] = True
