"""Stage-2 data: sampled (image, caption embedding) pairs, the global-batch sampler, the training
loader (map-style or streamed: :func:`train_loader`), held-out sets.

[IMPORTANT] The global batch is ``stage2.batch_size`` whatever the number of processes: the
sampler cuts one global batch per step and each rank takes its contiguous slice, in rank order.
With the local-loss formulation the mean of the ranks' losses is then exactly the 1-process loss,
which the 2-process test pins.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from llm2clip_vlm.bad_samples import load_or_replace
from llm2clip_vlm.data.captions import record_index, set_parts
from llm2clip_vlm.data.images import load_rgb
from llm2clip_vlm.data.records import ImageCaptions
from llm2clip_vlm.data.sets import weighted_epoch
from llm2clip_vlm.data.train_stream import TrainStream
from llm2clip_vlm.vision.augment import random_resized_crop

ImageLoader = Callable[[ImageCaptions], Any]  # record -> PIL RGB image


class CaptionEmbeddings(Protocol):
    """What stage 2 needs from the embedding store (rows = captions in data-set order)."""

    @property
    def dim(self) -> int: ...

    def caption_rows(self, image_index: int, kind: str) -> np.ndarray: ...

    def __getitem__(self, rows: Any) -> np.ndarray: ...


class Stage2TrainData(Dataset):
    """(pixel_values, caption embedding) per ``(epoch, image index)``.

    The caption is drawn from a generator seeded by ``(seed, epoch, index)``: the choice does not
    depend on worker, process count or resume point.
    """

    def __init__(
        self,
        records: Sequence[ImageCaptions],
        embeddings: CaptionEmbeddings,
        image_processor: Any,
        load_image: ImageLoader,
        long_caption_ratio: float,
        seed: int,
        indices: Sequence[int] | None = None,
        crop_scale: Sequence[float] = (),
    ) -> None:
        self.records = records
        # Sampler positions -> record indices (the usable images when bad ones were skipped).
        self.indices = list(indices) if indices is not None else range(len(records))  # no list at 10M
        self.embeddings = embeddings
        self.image_processor = image_processor
        self.load_image = load_image
        self.long_ratio = long_caption_ratio
        self.seed = seed
        # RandomResizedCrop's area range (the reference: 0.9-1.0); empty = the processor alone.
        self.crop_scale = tuple(float(x) for x in crop_scale)
        if self.crop_scale and not (
            len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1
        ):
            raise ValueError(
                f"stage2.random_resized_crop must be [] or [min, max] in (0, 1], not {list(crop_scale)}"
            )

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def weighted(self) -> bool:
        """Whether the records are a list of sets with sampling weights other than 1."""
        return any(p.weight != 1.0 for p in set_parts(self.records))

    def epoch_positions(self, epoch: int) -> np.ndarray | None:
        """See :func:`weighted_positions`."""
        return weighted_positions(self.records, self.indices, self.seed, epoch)

    def epoch_size(self) -> int:
        """Samples per epoch (the usable images, or their weighted count)."""
        return epoch_size(self.records, self.indices, self.seed)

    def caption_row(self, epoch: int, index: int) -> int:
        rng = np.random.default_rng((self.seed, epoch, index))
        short = self.embeddings.caption_rows(index, "short")
        long = self.embeddings.caption_rows(index, "long")
        if len(short) == 0 and len(long) == 0:
            raise ValueError(f"{self.records[index].source or self.records[index].key}: image has no caption")
        # Draw the coin even when one kind is missing so the stream of draws stays aligned.
        use_long = rng.random() < self.long_ratio
        rows = long if (use_long and len(long)) or not len(short) else short
        return int(rows[rng.integers(len(rows))])

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, str]:
        """``(pixel_values, caption embedding, failures)``: an unreadable image is replaced by a
        deterministic other one and reported in ``failures`` (see :mod:`llm2clip_vlm.bad_samples`)."""
        epoch, position = item
        image, index, failures = load_or_replace(
            self.load_image, self.records, self.indices, position, epoch, self.seed
        )
        row = self.caption_row(epoch, index)
        emb = torch.from_numpy(np.asarray(self.embeddings[[row]], dtype=np.float32)[0])
        return self.train_pixels(image, epoch, index), emb, failures

    def train_pixels(self, image: Any, epoch: int, index: int) -> torch.Tensor:
        """``[3, H, W]`` of a training image: randomly cropped first when ``crop_scale`` is set."""
        if self.crop_scale:
            size = image_size(self.image_processor)
            image = random_resized_crop(image, size, self.crop_scale, (self.seed, epoch, index))
        return pixel_values(self.image_processor, image)


def image_size(image_processor: Any) -> int:
    """The square side the processor produces (its crop size, else its resize size)."""
    crop = getattr(image_processor, "crop_size", None) or image_processor.size
    return int(crop.get("height") or crop.get("shortest_edge"))


def weighted_positions(
    records: Sequence[ImageCaptions], indices: Sequence[int], seed: int, epoch: int
) -> np.ndarray | None:
    """The sampler positions of one epoch of a weighted list of sets (None: every position once).

    A set of weight ``w`` gives ``w`` times its usable images (see
    :func:`~llm2clip_vlm.data.sets.weighted_epoch`); positions index ``indices`` (sorted record
    ids of the usable images).
    """
    parts = set_parts(records)
    if not any(p.weight != 1.0 for p in parts):
        return None
    ids = np.asarray(indices, dtype=np.int64)
    # Per set, the positions whose record lies in it (its usable images), renumbered.
    cuts = np.searchsorted(ids, [p.start for p in parts] + [parts[-1].start + parts[-1].records])
    ranges = [
        dataclasses.replace(p, start=int(cuts[k]), records=int(cuts[k + 1] - cuts[k]))
        for k, p in enumerate(parts)
    ]
    return weighted_epoch(ranges, epoch, seed)


def epoch_size(records: Sequence[ImageCaptions], indices: Sequence[int], seed: int) -> int:
    """Samples per stage-2 epoch: the usable images, or their weighted count."""
    positions = weighted_positions(records, indices, seed, 0)
    return len(indices) if positions is None else len(positions)


def pixel_values(image_processor: Any, image: Any) -> torch.Tensor:
    """``[3, H, W]`` float tensor of one PIL image through the backbone's own processor."""
    return image_processor(images=image, return_tensors="pt")["pixel_values"][0]


class ImageList(Dataset):
    """Pixel values of a list of records (held-out images, in order)."""

    def __init__(self, records: Sequence[ImageCaptions], processor: Any, load_image: ImageLoader) -> None:
        self.records, self.processor, self.load_image = records, processor, load_image

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> torch.Tensor:
        return pixel_values(self.processor, self.load_image(self.records[i]))


class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields this rank's slice of global batch ``step`` for ``step in [start_step, total_steps)``.

    Epoch ``e`` is a permutation drawn from ``seed + e``; the last incomplete batch of an epoch is
    dropped (contrastive batches should be full). ``epoch_positions(e)`` (a weighted list of sets)
    gives the positions of epoch ``e`` (with repeats) instead of ``0 .. n-1``; ``n`` is then its length.
    """

    def __init__(
        self,
        n: int,
        global_batch: int,
        rank: int,
        world: int,
        seed: int,
        start_step: int,
        total_steps: int,
        epoch_positions: Callable[[int], np.ndarray | None] | None = None,
    ) -> None:
        if global_batch % world:
            raise ValueError(f"stage2.batch_size {global_batch} is not divisible by the {world} processes")
        if n < global_batch:
            raise ValueError(f"stage2.batch_size {global_batch} is larger than the {n} training images")
        self.n, self.batch, self.rank, self.world = n, global_batch, rank, world
        self.seed, self.start, self.total = seed, start_step, total_steps
        self.steps_per_epoch = n // global_batch
        self.epoch_positions = epoch_positions

    def __len__(self) -> int:
        return max(0, self.total - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        local = self.batch // self.world
        perm, perm_epoch = None, -1
        for step in range(self.start, self.total):
            epoch, k = divmod(step, self.steps_per_epoch)
            if epoch != perm_epoch:
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
                items = self.epoch_positions(epoch) if self.epoch_positions is not None else None
                if items is not None:  # a weighted list of sets: the epoch's positions, shuffled
                    perm = torch.from_numpy(items)[perm]
                perm_epoch = epoch
            batch = perm[k * self.batch : (k + 1) * self.batch]
            mine = batch[self.rank * local : (self.rank + 1) * local]
            yield [(epoch, int(i)) for i in mine]


class StreamSample:
    """Stage 2's sample hook for the shared stream: (epoch, record id, image bytes) -> (pixel
    values, caption embedding); the caption drawn as in the map-style path
    (:meth:`Stage2TrainData.caption_row`, by ``(seed, epoch, record)``); picklable."""

    def __init__(self, dataset: Stage2TrainData) -> None:
        self.dataset = dataset

    def __call__(self, epoch: int, rid: int, data: bytes) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.dataset
        image = load_rgb(data, self.where(rid))
        row = d.caption_row(epoch, rid)
        emb = torch.from_numpy(np.asarray(d.embeddings[[row]], dtype=np.float32)[0])
        return d.train_pixels(image, epoch, rid), emb

    def where(self, rid: int) -> str:
        index = record_index(self.dataset.records)
        return index.describe(rid) if index is not None else str(rid)


def train_loader(
    dataset: Stage2TrainData,
    *,
    batch_size: int,
    rank: int,
    world: int,
    start_step: int,
    total_steps: int,
    num_workers: int,
    pin_memory: bool,
    shuffle_buffer: int = 0,
    saved: dict[str, Any] | None = None,
    skip_bad: bool = False,
    max_bad_fraction: float = 0.01,
) -> Iterable[tuple[torch.Tensor, torch.Tensor, Any]]:
    """This rank's ``(pixel_values, caption embeddings, failures)`` batches from ``start_step`` on.

    ``shuffle_buffer`` 0: map-style, global batch ``k`` a function of ``(seed, k)``
    (:class:`GlobalBatchSampler`). Otherwise the records are streamed (``data.stream``): each rank
    and worker reads its own shards through a shuffle buffer of that many records
    (the stream every stage uses, :class:`~llm2clip_vlm.data.train_stream.TrainStream`, with
    stage 2's :class:`StreamSample`), resuming from ``saved`` (the stream state a checkpoint
    stored); bad images are then found, and stopped at or skipped, while reading. A streamed
    batch's third field holds, per sample, the ``[record, reason]`` pairs skipped before it (JSON,
    "" when none), as a map-style batch's holds the images replaced (:func:`load_or_replace`).
    Set weights apply to both: map-style draws records by weight, the stream draws shards.
    """
    if shuffle_buffer > 0:
        index = record_index(dataset.records)
        if index is None:
            raise ValueError("data.stream needs a data set read from disk (a manifest or webdataset shards)")
        if batch_size % world:
            raise ValueError(f"stage2.batch_size {batch_size} is not divisible by the {world} processes")
        # A weighted list of sets draws its shards by the sets' weights (open_clip's upsampling).
        parts, weighted = set_parts(dataset.records), dataset.weighted
        return TrainStream(
            index, len(dataset.records), StreamSample(dataset), default_collate, saved or {},
            option="data", what="stage 2", batch_size=batch_size, num_workers=num_workers,
            seed=dataset.seed, shuffle_buffer=shuffle_buffer, skip_bad=skip_bad,
            max_bad_fraction=max_bad_fraction, rank=rank, world=world, pin_memory=pin_memory,
            set_weights=[(p.start, p.weight) for p in parts] if weighted else (),
            note="; shards drawn by set weight " + ", ".join(f"{p.name} x{p.weight:g}" for p in parts)
            if weighted else "",
        )  # fmt: skip
    sampler = GlobalBatchSampler(
        dataset.epoch_size(), batch_size, rank, world, dataset.seed, start_step, total_steps,
        epoch_positions=dataset.epoch_positions if dataset.weighted else None,
    )  # fmt: skip
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory)


@dataclass
class HeldoutSet:
    """A retrieval set: images, one stage-1 embedding per caption, and each caption's image."""

    records: Sequence[ImageCaptions]
    text_embeddings: torch.Tensor  # [n_captions, text_dim]
    caption_image: torch.Tensor  # [n_captions] long

    def subset(self, images: Sequence[int]) -> HeldoutSet:
        """The set restricted to ``images`` (e.g. without the images that failed to decode)."""
        keep = torch.tensor(list(images), dtype=torch.long)
        new_index = torch.full((len(self.records),), -1, dtype=torch.long)
        new_index[keep] = torch.arange(len(keep))
        rows = new_index[self.caption_image] >= 0
        return HeldoutSet(
            [self.records[i] for i in images], self.text_embeddings[rows], new_index[self.caption_image[rows]]
        )
