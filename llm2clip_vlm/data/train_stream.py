"""One rank's streamed training batches, for every stage: the shard stream plus a per-stage sample hook.

Stage 2 and LLaVA stream their shards the same way (:mod:`llm2clip_vlm.data.stream`): each
process and DataLoader worker reads its own shards in order through a bounded shuffle buffer, and
each rank takes ``batch_size / world`` samples per step. What differs between the stages is only
how one record becomes a sample (stage 2: augmented pixels + the caption's embedding; LLaVA:
tokens, labels and pixels) and how samples become a batch (stacked, or padded), which is what a
stage gives :class:`TrainStream`: ``sample(epoch, record id, bytes) -> tuple`` and a ``collate``.

Bad records, one policy for both stages (:class:`~llm2clip_vlm.data.config.DataPolicy`): a
record whose sample cannot be built (an image that does not decode, a conversation whose image
tokens do not fit) stops the run with one line naming it (``shard.tar:key``), or under
``skip_bad`` is skipped (the stream takes the next record), logged and counted; its
``[record, reason]`` rides with the next sample of its worker as a JSON string ("" when none),
so the stage's collate sees it (stage 2's step hands it to its mid-run ledger) and this stream
keeps it in its ledger (:attr:`TrainStream.skipped`, gathered over ranks into every checkpoint).
The run stops once more than ``max_bad_fraction`` of what a rank read was bad.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from llm2clip_vlm.data.errors import BadRecords, DataError
from llm2clip_vlm.data.index import RecordIndex
from llm2clip_vlm.data.stream import ShardStream, StreamLoader
from llm2clip_vlm.logging import get_logger

log = get_logger(__name__)

# A stage's sample hook: (epoch, record id, the record's bytes) -> the sample's fields.
SampleHook = Callable[[int, int, bytes], tuple[Any, ...]]


class _Sample:
    """The stage's hook, with the failures skipped since this worker's previous sample appended
    (a JSON list of ``[record, reason]``, "" when none); picklable into DataLoader workers."""

    def __init__(self, hook: SampleHook) -> None:
        self.hook = hook
        self.pending: list[list[str]] = []  # filled by _OnBad in the same worker

    def __call__(self, epoch: int, rid: int, data: bytes) -> tuple[Any, ...]:
        fields = self.hook(epoch, rid, data)
        failures = json.dumps(self.pending) if self.pending else ""
        self.pending = []
        return (*fields, failures)


class _OnBad:
    """A bad streamed record: stop naming it, or (``skip_bad``) log it, hand it on, go on."""

    def __init__(self, skip_bad: bool, option: str, sample: _Sample) -> None:
        self.skip_bad, self.option = skip_bad, option
        self.sample = sample  # pickled with it into the worker: one shared pending list

    def __call__(self, where: str, error: Exception) -> None:
        text = str(error)
        message = text if text.startswith(where) else f"{where}: {text}"
        if not self.skip_bad:
            raise DataError(f"{message} (set {self.option}.skip_bad=true to skip bad records)") from error
        log.warning("skipped bad record %s", message)
        self.sample.pending.append([where, text])


class _Collate:
    """The stage's collate over the samples (the failures column included), and the batch's
    skipped records apart, for the stream's ledger; picklable."""

    def __init__(self, collate: Callable[[list[tuple[Any, ...]]], Any]) -> None:
        self.collate = collate

    def __call__(self, items: list[tuple[Any, ...]]) -> tuple[Any, list[list[str]]]:
        skipped = [f for item in items if item[-1] for f in json.loads(item[-1])]
        return self.collate(items), skipped


class TrainStream:
    """The streamed batches of one rank; iterating yields what the stage's ``collate`` makes.

    Args:
        index: the record index the shards were read into (its rows are the record ids).
        n: the number of records streamed.
        sample: the stage's sample hook (see the module docstring).
        collate: the stage's collate over a batch's ``(*sample fields, failures)`` tuples.
        saved: the stream state of the checkpoint resumed from (``{}`` for a fresh run).
        option: the config prefix of the data policy, named in messages (``data``,
            ``llava.pretrain.data``).
        what: the stage, in log lines and messages (``stage 2``, ``llava.pretrain.data``).
        batch_size: the global batch (each rank takes ``batch_size / world``).
        num_workers, seed, shuffle_buffer: DataLoader workers, shuffle seed, buffer size in records.
        skip_bad, max_bad_fraction: the bad-record policy, applied while reading.
        rank, world, pin_memory: this process, the process count, pinned host batches.
        set_weights: ``(first record, weight)`` of each set of a weighted list of sets, whose
            shards are then drawn by weight (:class:`~llm2clip_vlm.data.stream.ShardStream`);
            empty when every weight is 1.
        note: appended to the log line that describes the stream.
    """

    def __init__(
        self,
        index: RecordIndex,
        n: int,
        sample: SampleHook,
        collate: Callable[[list[tuple[Any, ...]]], Any],
        saved: dict[str, Any],
        *,
        option: str,
        what: str,
        batch_size: int,
        num_workers: int,
        seed: int,
        shuffle_buffer: int,
        skip_bad: bool,
        max_bad_fraction: float,
        rank: int,
        world: int,
        pin_memory: bool,
        set_weights: Sequence[tuple[int, float]] = (),
        note: str = "",
    ) -> None:
        self.world, self.max_bad_fraction, self.what = world, max_bad_fraction, what
        positions, bad, first = StreamLoader.positions_for(
            saved,
            world=world,
            workers=num_workers,
            seed=seed,
            buffer=shuffle_buffer,
            records=n,
            weights=[w for _, w in set_weights] if set_weights else None,
        )
        hook = _Sample(sample)
        stream = ShardStream(
            index,
            n,
            hook,
            rank=rank,
            world=world,
            workers=num_workers,
            seed=seed,
            buffer=shuffle_buffer,
            positions=positions,
            bad=bad,
            first_worker=first,
            on_bad=_OnBad(skip_bad, option, hook),
            set_weights=set_weights,
        )
        self.first_batches = int(saved.get("batches", 0)) if saved else 0
        # The ledger of skipped records: every rank's up to the resumed checkpoint, then this rank's.
        self.skipped = BadRecords(True, max_bad_fraction, name=what, option=f"{option}.skip_bad")
        self.skipped.take(saved.get("skipped", []) if saved else [])
        self.restored = len(self.skipped.skipped)
        self.loader = StreamLoader(
            stream, batch_size // world, num_workers, pin_memory=pin_memory, collate=_Collate(collate)
        )
        plan = stream.plan
        log.info(
            "%s streams %d records from %d shard(s): %d unit(s) (%d process(es) x %d worker(s)), "
            "shuffle buffer %d%s",
            what, n, plan.num_shards, plan.units, world, max(1, num_workers), plan.buffer, note,
        )  # fmt: skip

    def __iter__(self) -> Iterator[Any]:
        for ((batch, skipped),) in self.loader:
            self.skipped.take(skipped)
            mine = self.skipped.skipped[self.restored :]
            self.loader.check_bad_share(
                self.max_bad_fraction, prefix=f"{self.what}: ", first=mine[0][1] if mine else ""
            )
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """The stream position of every rank and the records skipped so far (a collective: every
        rank calls it at each save)."""
        state = self.loader.state_dict(self.first_batches)
        restored, mine = self.skipped.skipped[: self.restored], self.skipped.skipped[self.restored :]
        gathered: list[Any] = [mine]
        if self.world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * self.world
            torch.distributed.all_gather_object(gathered, mine)
        state["skipped"] = [list(x) for x in restored] + [list(x) for rank in gathered for x in rank]
        return state
