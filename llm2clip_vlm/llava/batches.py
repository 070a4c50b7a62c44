"""How a LLaVA phase's batches are cut: modality batches of map-style records, or a shard stream.

- map-style (the default; a JSON file, or shards read at random by seeking):
  :class:`~llm2clip_vlm.llava.data.ModalityBatchSampler` cuts global batch ``k`` from ``(seed, k)``
  alone, so the step is the data position and a resumed run needs nothing else;
- streamed (``llava.<phase>.data.stream``, webdataset shards only): :class:`LlavaStream` reads
  through :mod:`llm2clip_vlm.data.stream`, as stage 2 does (:mod:`llm2clip_vlm.vision.stream`):
  each process and DataLoader worker reads its own shards in order, mixes them in a bounded
  shuffle buffer (only the buffered images' bytes are in memory; nothing caches them), and each
  rank takes ``batch_size / world`` samples per step, which the step splits into micro batches
  as before. The stream position goes into every checkpoint (the loop's ``data_state``), so a
  killed run resumes to the uninterrupted run's batches. Batches mix image and text-only records:
  grouping by modality needs the whole data set's order, which a stream does not have.

A streamed sample that cannot be built (an image that does not decode, a conversation whose image
tokens do not fit ``max_length``) stops the run with one line naming ``shard.tar:key``, or under
``skip_bad`` is skipped (the stream takes the next record), counted, and listed in the report
(its ``[record, reason]`` rides with the next batch of its worker, and is gathered over ranks into
the checkpoint); the run stops once more than ``max_bad_fraction`` of what a rank read was bad.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from llm2clip_vlm.data.conversations import LlavaRecords
from llm2clip_vlm.data.errors import DataError
from llm2clip_vlm.data.index import RecordIndex
from llm2clip_vlm.data.stream import ShardStream, StreamLoader
from llm2clip_vlm.llava.config import LlavaPhaseConfig
from llm2clip_vlm.llava.data import Batch, Collator, LlavaDataset, ModalityBatchSampler, Sample
from llm2clip_vlm.llava.grouping import LengthGroupedBatchSampler, modality_lengths
from llm2clip_vlm.logging import get_logger

log = get_logger(__name__)


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
    """This rank's batches from ``start_step`` on: a DataLoader, or a :class:`LlavaStream` whose
    ``state_dict`` the loop stores with every checkpoint (``saved``: what the resumed one stored)."""
    pad = dataset.tokenizer.pad_token_id
    if p.data.stream:
        return LlavaStream(
            records, dataset, saved or {}, option=f"llava.{phase}.data", batch_size=p.batch_size,
            num_workers=p.num_workers, seed=p.seed, shuffle_buffer=p.data.shuffle_buffer,
            skip_bad=p.data.skip_bad, max_bad_fraction=p.data.max_bad_fraction, rank=rank, world=world,
            pin_memory=pin_memory, pad_token_id=pad,
        )  # fmt: skip
    sampler = map_sampler(records, p, rank, world, start_step, total_steps, deepspeed)
    return DataLoader(
        dataset, batch_sampler=sampler, num_workers=p.num_workers, collate_fn=Collator(pad),
        pin_memory=pin_memory,
    )  # fmt: skip


class _StreamSample:
    """(epoch, table row, image bytes) -> (sample, failures); picklable into DataLoader workers.

    ``failures`` is a JSON list of the ``[record, reason]`` pairs skipped in this worker since its
    previous sample ("" when none).
    """

    def __init__(self, dataset: LlavaDataset, records: LlavaRecords) -> None:
        self.dataset, self.records = dataset, records
        self.pending: list[list[str]] = []  # filled by _OnBad in the same worker

    def __call__(self, epoch: int, row: int, data: bytes) -> tuple[Sample, str]:
        # A text-only record's "image" is the stream's 0-byte read: no image then.
        rec = self.records.build(row, data if self.records.has_image_at(row) else None)
        sample = self.dataset.sample(rec)
        failures = json.dumps(self.pending) if self.pending else ""
        self.pending = []
        return sample, failures


class _OnBad:
    """A bad streamed record: stop naming it, or (``skip_bad``) log it, hand it on, go on."""

    def __init__(self, skip_bad: bool, option: str, sample: _StreamSample) -> None:
        self.skip_bad, self.option = skip_bad, option
        self.sample = sample  # pickled with it into the worker: one shared pending list

    def __call__(self, where: str, error: Exception) -> None:
        text = str(error)
        message = text if text.startswith(where) else f"{where}: {text}"
        if not self.skip_bad:
            raise DataError(f"{message} (set {self.option}.skip_bad=true to skip bad records)") from error
        log.warning("skipped bad record %s", message)
        self.sample.pending.append([where, text])


class _StreamCollate:
    """The samples of a streamed batch, padded as map-style ones, with the skipped records."""

    def __init__(self, pad_token_id: int) -> None:
        self.collator = Collator(pad_token_id)

    def __call__(self, items: list[tuple[Sample, str]]) -> Batch:
        batch = self.collator([sample for sample, _ in items])
        batch.skipped = [f for _, failures in items if failures for f in json.loads(failures)]
        return batch


class LlavaStream:
    """The streamed batches of one rank (see the module docstring).

    Args:
        records: the phase's records, read from shards without the up-front image check (the
            stream's record ids are the index's rows, all of them kept).
        dataset: turns a record into a sample (tokens, labels, pixels).
        saved: the stream state of the checkpoint resumed from (``{}`` for a fresh run).
        option: the config prefix named in messages (``llava.pretrain.data``).
        batch_size: the global batch (each rank takes ``batch_size / world``).
        num_workers, seed, shuffle_buffer: DataLoader workers, shuffle seed, buffer size in records.
        skip_bad, max_bad_fraction: the bad-record policy, applied while reading.
        rank, world, pin_memory, pad_token_id: this process, the process count, pinned host
            batches, the tokenizer's padding id.
    """

    def __init__(
        self,
        records: LlavaRecords,
        dataset: LlavaDataset,
        saved: dict[str, Any],
        *,
        option: str,
        batch_size: int,
        num_workers: int,
        seed: int,
        shuffle_buffer: int,
        skip_bad: bool,
        max_bad_fraction: float,
        rank: int,
        world: int,
        pin_memory: bool,
        pad_token_id: int,
    ) -> None:
        if not records.shards or records.directory is None:
            raise ValueError(
                f"{option}.stream needs webdataset shards (a folder of .tar, or a shard pattern)"
            )
        if not np.array_equal(records.rows, np.arange(len(records))):
            raise ValueError(f"{option}.stream streams every indexed record: read them without verify_images")
        self.world, self.max_bad_fraction = world, max_bad_fraction
        positions, bad, first = StreamLoader.positions_for(
            saved, world=world, workers=num_workers, seed=seed, buffer=shuffle_buffer, records=len(records)
        )
        sample = _StreamSample(dataset, records)
        stream = ShardStream(
            RecordIndex(records.directory), len(records), sample, rank=rank, world=world,
            workers=num_workers, seed=seed, buffer=shuffle_buffer, positions=positions, bad=bad,
            first_worker=first, on_bad=_OnBad(skip_bad, option, sample),
        )  # fmt: skip
        self.first_batches = int(saved.get("batches", 0)) if saved else 0
        # Every rank's skipped records up to the resumed checkpoint, then this rank's own.
        self.skipped: list[list[str]] = [list(x) for x in saved.get("skipped", [])] if saved else []
        self.mine: list[list[str]] = []
        self.loader = StreamLoader(
            stream,
            batch_size // world,
            num_workers,
            pin_memory=pin_memory,
            collate=_StreamCollate(pad_token_id),
        )
        plan = stream.plan
        log.info(
            "%s streams %d records from %d shard(s): %d unit(s) (%d process(es) x %d worker(s)), "
            "shuffle buffer %d; batches mix image and text-only records",
            option, len(records), plan.num_shards, plan.units, world, max(1, num_workers), plan.buffer,
        )  # fmt: skip

    def __iter__(self) -> Iterator[Batch]:
        for (batch,) in self.loader:
            self.mine += batch.skipped
            self.loader.check_bad_share(self.max_bad_fraction, first=self.mine[0][1] if self.mine else "")
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """The stream position of every rank and the records skipped so far (a collective: every
        rank calls it at each save)."""
        state = self.loader.state_dict(self.first_batches)
        mine: list[Any] = [self.mine]
        if self.world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            mine = [None] * self.world
            torch.distributed.all_gather_object(mine, self.mine)
        state["skipped"] = self.skipped + [x for rank in mine for x in rank]
        return state
