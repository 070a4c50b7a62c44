"""Stage 2 on a streamed data set: the loader the trainer uses when ``data.stream`` is on.

Each rank reads its own shards (:mod:`llm2clip_vlm.data.stream`) and cuts local batches of
``stage2.batch_size / world`` from them; the caption is drawn exactly as in the map-style path
(:meth:`Stage2TrainData.caption_row`, by ``(seed, epoch, record)``). Bad images are found while
training: stopped at with a message naming the record, or with ``data.skip_bad`` skipped and
counted (the run stops once more than ``data.max_bad_fraction`` of what it read was bad). A
skipped record also rides, as ``[record, reason]``, with the next sample of its worker to the
trainer, which lists it in ``bad_records.json`` as for a map-style run
(:class:`~llm2clip_vlm.bad_samples.MidRunBadImages`). The
loader's :meth:`~llm2clip_vlm.data.stream.StreamLoader.state_dict` goes into the checkpoint. A
weighted list of sets draws its shards by the sets' weights (open_clip's upsampling factors; see
:mod:`llm2clip_vlm.data.stream`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from llm2clip_vlm.data.captions import record_index, set_parts
from llm2clip_vlm.data.errors import DataError
from llm2clip_vlm.data.images import load_rgb
from llm2clip_vlm.data.records import ImageCaptions
from llm2clip_vlm.data.stream import ShardStream, StreamLoader
from llm2clip_vlm.logging import get_logger

log = get_logger(__name__)


class _Sample:
    """(epoch, record, image bytes) -> (pixel values, caption embedding, failures); picklable.

    ``failures`` is a JSON list of the ``[record, reason]`` pairs skipped in this worker since its
    previous sample ("" when none): the format :func:`~llm2clip_vlm.bad_samples.load_or_replace`
    reports, so the trainer applies one policy and one report to both loaders.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset  # a Stage2TrainData: caption choice, embeddings, processor
        self.pending: list[list[str]] = []  # filled by _OnBad in the same worker

    def __call__(self, epoch: int, rid: int, data: bytes) -> tuple[torch.Tensor, torch.Tensor, str]:
        d = self.dataset
        image = load_rgb(data, self.where(rid))
        row = d.caption_row(epoch, rid)
        emb = torch.from_numpy(np.asarray(d.embeddings[[row]], dtype=np.float32)[0])
        pv = d.train_pixels(image, epoch, rid)
        failures = json.dumps(self.pending) if self.pending else ""
        self.pending = []
        return pv, emb, failures

    def where(self, rid: int) -> str:
        index = record_index(self.dataset.records)
        return index.describe(rid) if index is not None else str(rid)


class _OnBad:
    """A bad record in a worker: stop naming it, or (``skip_bad``) log it, hand it on, go on."""

    def __init__(self, skip_bad: bool, sample: _Sample) -> None:
        self.skip_bad = skip_bad
        self.sample = sample  # pickled with it into the worker: one shared pending list

    def __call__(self, where: str, error: Exception) -> None:
        if not self.skip_bad:
            raise DataError(f"{where}: {error} (set data.skip_bad=true to skip bad records)") from error
        log.warning("skipped bad record %s: %s", where, error)
        self.sample.pending.append([where, str(error)])


class Stage2Stream:
    """The streamed stage-2 loader of one rank; iterate for ``(pixel_values, embeddings, failures)``.

    Args:
        dataset: the :class:`~llm2clip_vlm.vision.data.Stage2TrainData` of the records (its
            records must come from an index: a manifest or webdataset shards read from disk).
        saved: the stream state of the checkpoint resumed from (``{}`` for a fresh run).
        batch_size: the global batch (each rank takes ``batch_size / world``).
        num_workers, seed, shuffle_buffer: DataLoader workers, shuffle seed, buffer size in records.
        skip_bad, max_bad_fraction: the bad-image policy (``data.*``), applied while reading.
        rank, world, pin_memory: this process, the process count, pinned host batches.
    """

    def __init__(
        self,
        dataset: Any,
        saved: dict[str, Any],
        *,
        batch_size: int,
        num_workers: int,
        seed: int,
        shuffle_buffer: int,
        skip_bad: bool,
        max_bad_fraction: float,
        rank: int,
        world: int,
        pin_memory: bool,
    ) -> None:
        records: Sequence[ImageCaptions] = dataset.records
        index = record_index(records)
        if index is None:
            raise ValueError("data.stream needs a data set read from disk (a manifest or webdataset shards)")
        if batch_size % world:
            raise ValueError(f"stage2.batch_size {batch_size} is not divisible by the {world} processes")
        self.max_bad_fraction = max_bad_fraction
        # A weighted list of sets draws its shards by the sets' weights (open_clip's upsampling).
        parts = set_parts(records)
        weighted = any(p.weight != 1.0 for p in parts)
        set_weights = [(p.start, p.weight) for p in parts] if weighted else []
        positions, bad, first = StreamLoader.positions_for(
            saved, world=world, workers=num_workers, seed=seed, buffer=shuffle_buffer, records=len(records),
            weights=[p.weight for p in parts] if weighted else None,
        )  # fmt: skip
        sample = _Sample(dataset)
        stream = ShardStream(
            index, len(records), sample, rank=rank, world=world, workers=num_workers, seed=seed,
            buffer=shuffle_buffer, positions=positions, bad=bad, first_worker=first,
            on_bad=_OnBad(skip_bad, sample), set_weights=set_weights,
        )  # fmt: skip
        self.first_batches = int(saved.get("batches", 0)) if saved else 0
        self.loader = StreamLoader(stream, batch_size // world, num_workers, pin_memory=pin_memory)
        plan = stream.plan
        log.info(
            "stage 2 streams %d records from %d shard(s): %d unit(s) (%d process(es) x %d worker(s)), "
            "shuffle buffer %d%s",
            len(records), plan.num_shards, plan.units, world, max(1, num_workers), plan.buffer,
            "; shards drawn by set weight " + ", ".join(f"{p.name} x{p.weight:g}" for p in parts)
            if weighted else "",
        )  # fmt: skip

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        for pv, emb, failures in self.loader:
            self.loader.check_bad_share(self.max_bad_fraction, prefix="stage 2: ")
            yield pv, emb, failures

    def state_dict(self) -> dict[str, Any]:
        """The stream position of every rank (a collective: every rank calls it at each save)."""
        return self.loader.state_dict(self.first_batches)
