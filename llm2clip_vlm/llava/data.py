"""LLaVA samples and batches: checked records (:mod:`llm2clip_vlm.data.conversations`) as tokens + pixels.

:class:`LlavaDataset` turns a record into a :class:`Sample` (the template's tokens and labels,
``<image>`` expanded to the image's feature count, the image's pixel values); the
:class:`Collator` pads samples into a :class:`Batch`. Nothing crashes mid-epoch: an image that
only fails to decode during training is dropped from its batch under ``skip_bad`` and counted.

Batches: :class:`ModalityBatchSampler` cuts each global batch from one modality (image records or
text-only records, LLaVA's ``group_by_modality_length``), decided by ``(seed, epoch)`` alone; each
process takes its contiguous slice of every global batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset

from llm2clip_vlm.data.conversations import ConversationError, LlavaRecord
from llm2clip_vlm.data.errors import DataError
from llm2clip_vlm.data.images import load_rgb
from llm2clip_vlm.llava.grouping import StepBatchSampler
from llm2clip_vlm.llava.prompting import expand_image_tokens
from llm2clip_vlm.llava.templates import IGNORE_INDEX, TemplateName, tokenize_conversation
from llm2clip_vlm.logging import get_logger

log = get_logger(__name__)


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------
def expand_to_square(image: Any, background: tuple[int, int, int]) -> Any:
    """LLaVA-1.5's ``expand2square``: pad the shorter side (centred) with ``background``."""
    from PIL import Image

    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def mean_colour(image_processor: Any) -> tuple[int, int, int]:
    """The processor's normalisation mean as an RGB colour (what LLaVA pads with)."""
    return tuple(int(x * 255) for x in image_processor.image_mean)  # type: ignore[return-value]


def image_to_pixels(image: Any, image_processor: Any, aspect: str) -> torch.Tensor:
    """``[3, H, W]`` pixel values of a PIL RGB image (padded to square first for ``pad``)."""
    if aspect == "pad":
        image = expand_to_square(image, mean_colour(image_processor))
    return image_processor(images=image, return_tensors="pt")["pixel_values"][0]


# ----------------------------------------------------------------------------------------------
# Samples and batches
# ----------------------------------------------------------------------------------------------
@dataclass
class Sample:
    input_ids: torch.Tensor  # [T] with the image placeholder expanded
    labels: torch.Tensor  # [T]
    pixel_values: torch.Tensor | None  # [3, H, W] for image records
    truncated: bool
    source: str


class LlavaDataset(Dataset):
    """Tokenized samples: the template's ids and labels, ``<image>`` expanded to the feature count.

    Sequences longer than ``max_length`` are cut at the end (counted as truncated); a record whose
    image tokens alone do not fit is a bad record. A sample that fails to load returns ``None``
    under ``skip_bad`` (the collator drops it), else raises naming the record.
    """

    def __init__(
        self,
        records: Sequence[LlavaRecord],
        tokenizer: Any,
        image_processor: Any,
        template: TemplateName,
        image_token_id: int,
        image_seq_length: int,
        max_length: int,
        image_aspect_ratio: str = "pad",
        system: str | None = None,
        skip_bad: bool = False,
    ) -> None:
        self.records, self.tokenizer, self.image_processor = records, tokenizer, image_processor
        self.template, self.system = template, system
        self.image_token_id, self.image_seq_length = image_token_id, image_seq_length
        self.max_length, self.aspect, self.skip_bad = max_length, image_aspect_ratio, skip_bad

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Sample | None:
        rec = self.records[i]
        try:
            return self.sample(rec)
        except (DataError, ConversationError) as e:
            if not self.skip_bad:
                raise DataError(f"{rec.source}: {e}") from e
            log.warning("dropped %s from its batch: %s", rec.source, e)
            return None

    def sample(self, rec: LlavaRecord) -> Sample:
        """One record's sample; raises (ConversationError, DataError) when it cannot be built."""
        tok = tokenize_conversation(self.template, rec.conversations, self.tokenizer, self.system)
        ids, labels = expand_image_tokens(
            tok.input_ids, tok.labels, self.image_token_id, self.image_seq_length
        )
        n_image = ids.count(self.image_token_id)
        if n_image != (self.image_seq_length if rec.has_image else 0):
            raise ConversationError(
                f"expected {self.image_seq_length if rec.has_image else 0} image tokens, got {n_image}"
            )
        truncated = len(ids) > self.max_length
        if truncated:
            if rec.has_image and ids.index(self.image_token_id) + self.image_seq_length > self.max_length:
                raise ConversationError(
                    f"the image's {self.image_seq_length} tokens do not fit in max_length {self.max_length}"
                )
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        pixels = None
        if rec.image is not None:
            pixels = image_to_pixels(load_rgb(rec.image, rec.source), self.image_processor, self.aspect)
        return Sample(torch.tensor(ids), torch.tensor(labels), pixels, truncated, rec.source)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T], right-padded
    attention_mask: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor | None  # [n_images, 3, H, W], in the order of the image rows
    image_rows: torch.Tensor  # [B] int: 1 where the row carries an image
    truncated: int = 0
    dropped: int = 0
    sources: list[str] = field(default_factory=list)  # the rows' records (for messages, tests)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_supervised(self) -> int:
        """Tokens that carry loss (labels shifted by one: the first position predicts nothing)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    def by_length(self) -> Batch:
        """The same rows, longest first (stable; pixel values follow their rows): micro batches
        cut from it hold rows of similar length, so :meth:`split` trims more padding."""
        order = torch.argsort(self.attention_mask.sum(1), descending=True, stable=True)
        pv = None
        if self.pixel_values is not None:
            image_of_row = torch.cumsum(self.image_rows, 0) - 1  # row -> its image's index
            pv = self.pixel_values[image_of_row[order[self.image_rows[order].bool()]]]
        sources = [self.sources[int(i)] for i in order] if self.sources else []
        return Batch(
            self.input_ids[order], self.attention_mask[order], self.labels[order], pv,
            self.image_rows[order], self.truncated, self.dropped, sources,
        )  # fmt: skip

    def split(self, size: int) -> list[Batch]:
        """Micro batches of at most ``size`` rows (pixel values follow their rows)."""
        out = []
        offsets = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long), self.image_rows]), 0)
        for s in range(0, len(self), size):
            e = min(s + size, len(self))
            pv = None
            if self.pixel_values is not None and int(offsets[e]) > int(offsets[s]):
                pv = self.pixel_values[int(offsets[s]) : int(offsets[e])]
            # Trim the padding columns no row of this micro batch needs.
            t = int(self.attention_mask[s:e].sum(1).max())
            out.append(
                Batch(
                    self.input_ids[s:e, :t],
                    self.attention_mask[s:e, :t],
                    self.labels[s:e, :t],
                    pv,
                    self.image_rows[s:e],
                )  # fmt: skip
            )
        return out


class Collator:
    """Right-pads a list of samples into a :class:`Batch` (``None`` samples are dropped, counted)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad = pad_token_id

    def __call__(self, samples: Sequence[Sample | None]) -> Batch:
        kept = [s for s in samples if s is not None]
        dropped = len(samples) - len(kept)
        if not kept:
            empty = torch.zeros(0, 1, dtype=torch.long)
            return Batch(empty, empty, empty, None, torch.zeros(0, dtype=torch.long), 0, dropped)
        t = max(len(s.input_ids) for s in kept)
        ids = torch.full((len(kept), t), self.pad, dtype=torch.long)
        labels = torch.full((len(kept), t), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(kept), t), dtype=torch.long)
        for r, s in enumerate(kept):
            n = len(s.input_ids)
            ids[r, :n], labels[r, :n], mask[r, :n] = s.input_ids, s.labels, 1
        images = [s.pixel_values for s in kept if s.pixel_values is not None]
        image_rows = torch.tensor([int(s.pixel_values is not None) for s in kept], dtype=torch.long)
        return Batch(
            ids, mask, labels, torch.stack(images) if images else None, image_rows,
            truncated=sum(s.truncated for s in kept), dropped=dropped, sources=[s.source for s in kept],
        )  # fmt: skip


class ModalityBatchSampler(StepBatchSampler):
    """This process's slice of global batch ``step``, for ``step in [start_step, total_steps)``.

    Epoch ``e`` shuffles the image records and the text-only records with ``seed + e``, cuts each
    into global batches (with ``group_by_modality``; else one shuffled pool), puts the leftovers
    of both in one mixed batch (dropped if smaller than the number of processes), and shuffles the
    order of the batches (``full_batches_only`` drops the leftovers). The same ``(seed, epoch)``
    gives the same full batches for any process count, so a resumed run continues the exact
    sequence; the leftover batch is trimmed to a multiple of the process count, so it (and with it
    the batch order) is the same for every process count only when its size is a multiple of each.
    """

    def __init__(
        self,
        is_image: Sequence[bool],
        global_batch: int,
        rank: int,
        world: int,
        seed: int,
        start_step: int,
        total_steps: int,
        group_by_modality: bool = True,
        full_batches_only: bool = False,
    ) -> None:
        if global_batch % world:
            raise ValueError(f"batch_size {global_batch} is not divisible by the {world} processes")
        self.is_image = list(is_image)
        self.batch, self.rank, self.world = global_batch, rank, world
        self.seed, self.start, self.total = seed, start_step, total_steps
        self.group = group_by_modality
        # DeepSpeed fixes the number of micro batches per step: no smaller leftover batch then.
        self.full_only = full_batches_only
        self.steps_per_epoch = len(self.epoch_batches(0))
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.is_image)} records make no batch of {global_batch}")

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        idx = torch.randperm(len(self.is_image), generator=g).tolist()
        pools = (
            [[i for i in idx if self.is_image[i]], [i for i in idx if not self.is_image[i]]]
            if self.group
            else [idx]
        )
        batches, rest = [], []
        for pool in pools:
            full = len(pool) // self.batch * self.batch
            batches += [pool[k : k + self.batch] for k in range(0, full, self.batch)]
            rest += pool[full:]
        usable = len(rest) // self.world * self.world
        if usable and len(rest) < self.batch and not self.full_only:
            batches.append(rest[:usable])
        order = torch.randperm(len(batches), generator=g).tolist()
        return [batches[o] for o in order]
