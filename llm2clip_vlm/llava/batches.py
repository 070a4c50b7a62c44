"""How a LLaVA phase's batches are cut: modality batches of map-style records, or a shard stream.

- map-style (the default; a JSON file, or shards read at random by seeking):
  :class:`~llm2clip_vlm.llava.data.ModalityBatchSampler` cuts global batch ``k`` from ``(seed, k)``
  alone, so the step is the data position and a resumed run needs nothing else;
- streamed (``llava.<phase>.data.stream``, webdataset shards only): :func:`llava_stream` is the
  stream every stage uses (:class:`~llm2clip_vlm.data.train_stream.TrainStream`, as stage 2's)
  with LLaVA's sample hook (:class:`StreamSample`) and padding (:class:`StreamCollate`):
  each process and DataLoader worker reads its own shards in order, mixes them in a bounded
  shuffle buffer (only the buffered images' bytes are in memory; nothing caches them), and each
  rank takes ``batch_size / world`` samples per step, which the step splits into micro batches
  as before. The stream position goes into every checkpoint (the loop's ``data_state``), so a
  killed run resumes to the uninterrupted run's batches. Batches mix image and text-only records:
  grouping by modality needs the whole data set's order, which a stream does not have.

A streamed sample that cannot be built (an image that does not decode, a conversation whose image
tokens do not fit ``max_length``) stops the run with one line naming ``shard.tar:key``, or under
``skip_bad`` is skipped (the stream takes the next record), counted in the stream's ledger
(gathered over ranks into the checkpoint), and listed in the report; the run stops once more than
``max_bad_fraction`` of what a rank read was bad.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from torch.utils.data import DataLoader

from llm2clip_vlm.data.conversations import LlavaRecords
from llm2clip_vlm.data.index import RecordIndex
from llm2clip_vlm.data.train_stream import TrainStream
from llm2clip_vlm.llava.config import LlavaPhaseConfig
from llm2clip_vlm.llava.data import Batch, Collator, LlavaDataset, ModalityBatchSampler, Sample
from llm2clip_vlm.llava.grouping import LengthGroupedBatchSampler, modality_lengths


def steps_per_epoch(records: LlavaRecords, p: LlavaPhaseConfig, world: int, deepspeed: bool) -> int:
    """Optimizer steps in one pass over the records (a stream: whole global batches of them)."""
    if p.data.stream:
        steps = len(records) // p.batch_size
        if steps == 0:
            raise ValueError(f"{len(records)} records make no batch of {p.batch_size}")
        return steps
    return map_sampler(records, p, 0, world, 0, 1, deepspeed).steps_per_epoch


def map_sampler(
    records: LlavaRecords,
    p: LlavaPhaseConfig,
    rank: int,
    world: int,
    start_step: int,
    total_steps: int,
    deepspeed: bool,
) -> ModalityBatchSampler | LengthGroupedBatchSampler:
    """The map-style batch sampler: by modality, or (``group_by_length``) LLaVA's length grouping."""
    if p.group_by_length:
        words = records.word_counts()
        lengths = modality_lengths(words, list(records.has_image)) if p.group_by_modality else words
        return LengthGroupedBatchSampler(
            lengths, p.batch_size, p.micro_batch_size, rank, world, p.seed, start_step, total_steps,
            p.group_by_modality, full_batches_only=deepspeed,
        )  # fmt: skip
    return ModalityBatchSampler(
        list(records.has_image), p.batch_size, rank, world, p.seed, start_step, total_steps,
        p.group_by_modality, full_batches_only=deepspeed,
    )  # fmt: skip


def phase_batches(
    records: LlavaRecords,
    dataset: LlavaDataset,
    p: LlavaPhaseConfig,
    phase: str,
    *,
    rank: int,
    world: int,
    start_step: int,
    total_steps: int,
    deepspeed: bool,
    saved: dict[str, Any] | None,
    pin_memory: bool,
) -> Iterable[Batch]:
    """This rank's batches from ``start_step`` on: a DataLoader, or a stream (:func:`llava_stream`)
    whose ``state_dict`` the loop stores with every checkpoint (``saved``: what the resumed one stored)."""
    pad = dataset.tokenizer.pad_token_id
    if p.data.stream:
        return llava_stream(
            records, dataset, p, phase, saved or {}, rank=rank, world=world, pin_memory=pin_memory
        )
    sampler = map_sampler(records, p, rank, world, start_step, total_steps, deepspeed)
    return DataLoader(
        dataset, batch_sampler=sampler, num_workers=p.num_workers, collate_fn=Collator(pad),
        pin_memory=pin_memory,
    )  # fmt: skip


class StreamSample:
    """LLaVA's sample hook for the shared stream: (epoch, table row, image bytes) -> (sample,);
    picklable into DataLoader workers."""

    def __init__(self, dataset: LlavaDataset, records: LlavaRecords) -> None:
        self.dataset, self.records = dataset, records

    def __call__(self, epoch: int, row: int, data: bytes) -> tuple[Sample]:
        # A text-only record's "image" is the stream's 0-byte read: no image then.
        rec = self.records.build(row, data if self.records.has_image_at(row) else None)
        return (self.dataset.sample(rec),)


class StreamCollate:
    """The samples of a streamed batch (``(sample, failures)`` pairs), padded as map-style ones."""

    def __init__(self, pad_token_id: int) -> None:
        self.collator = Collator(pad_token_id)

    def __call__(self, items: list[tuple[Any, ...]]) -> Batch:
        return self.collator([item[0] for item in items])


def llava_stream(
    records: LlavaRecords,
    dataset: LlavaDataset,
    p: LlavaPhaseConfig,
    phase: str,
    saved: dict[str, Any],
    *,
    rank: int,
    world: int,
    pin_memory: bool,
) -> TrainStream:
    """The streamed batches of one rank (see the module docstring): the shared
    :class:`~llm2clip_vlm.data.train_stream.TrainStream` with LLaVA's sample hook and padding,
    under ``llava.<phase>.data``'s policy.

    Args:
        records: the phase's records, read from shards without the up-front image check (the
            stream's record ids are the index's rows, all of them kept).
        dataset: turns a record into a sample (tokens, labels, pixels).
        p, phase: the phase's section (batch size, workers, seed, data policy) and its name.
        saved: the stream state of the checkpoint resumed from (``{}`` for a fresh run).
        rank, world, pin_memory: this process, the process count, pinned host batches.
    """
    option = f"llava.{phase}.data"
    if not records.shards or records.directory is None:
        raise ValueError(f"{option}.stream needs webdataset shards (a folder of .tar, or a shard pattern)")
    if not np.array_equal(records.rows, np.arange(len(records))):
        raise ValueError(f"{option}.stream streams every indexed record: read them without verify_images")
    return TrainStream(
        RecordIndex(records.directory), len(records), StreamSample(dataset, records),
        StreamCollate(dataset.tokenizer.pad_token_id), saved, option=option, what=option,
        batch_size=p.batch_size, num_workers=p.num_workers, seed=p.seed, shuffle_buffer=p.data.shuffle_buffer,
        skip_bad=p.data.skip_bad, max_bad_fraction=p.data.max_bad_fraction, rank=rank, world=world,
        pin_memory=pin_memory, note="; batches mix image and text-only records",
    )  # fmt: skip
