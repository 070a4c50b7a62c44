"""Streaming an indexed data set: each rank and DataLoader worker reads its own shards, in order.

The alternative to map-style random access for data sets too large to shuffle globally. Every
(rank, worker) pair is a *unit*; with ``U = world * workers`` units:

- epoch ``e`` permutes the shards with ``(seed, e)``; unit ``u`` reads shards ``perm[u::U]`` one
  after the other, each from its first record to its last (sequential reads of the tar). With
  fewer shards than units, every unit walks all shards and keeps records ``u::U`` instead, so the
  units still see disjoint records;
- a bounded shuffle buffer (``buffer`` records, seeded by ``(seed, e, u)``) mixes the records the
  unit reads: only the buffered images' bytes are ever in memory;
- the unit's *position* is the number of records it has emitted since the run started (epochs
  follow one another). From it alone, the unit recomputes the epoch, its shards, the buffer's
  content and the read cursor: the shuffle is simulated on record ids only (no bytes read), the
  records still in the buffer are re-read by seeking, and reading goes on sequentially. So a
  checkpoint stores one integer per unit (:meth:`StreamLoader.state_dict`) and a resumed run
  emits exactly the records the uninterrupted one would have.

Weighted sets (``data.train[i].weight`` other than 1, a list of sets): as open_clip's
``--train-data-upsampling-factors`` (``src/open_clip_train/data.py``, ``ResampledShards2``: each
shard is drawn with replacement by ``rng.choices(urls, weights=...)``, every shard carrying its
source's weight, the generator reseeded by the epoch), epoch ``e`` *draws* its shard sequence with
replacement instead of permuting the shards: ``round(sum of the shards' set weights)`` draws, shard
``s`` with probability proportional to ``weight(set of s) x records(s)`` (open_clip's weights when
shards are equally full; with unequal shards, a set still gets ``weight x records`` in expectation,
as the map-style :func:`~llm2clip_vlm.data.sets.weighted_epoch`). The draw is seeded by
``(seed, e)`` and the units cut it as a permutation, so the position alone still places a resumed
unit; the weights are part of the stream's state (a resume with other weights is refused).

A sample that fails (a bad image) is skipped under ``skip_bad`` and counted; it still advances
the position, so the resumed stream stays aligned. Without ``skip_bad`` it raises, naming the
record.

The DataLoader takes batches from its workers in turn (0, 1, ...). A resumed loader restarts that
turn at worker 0, so worker ``i`` plays logical worker ``(i + batches) % workers``: the batch
after the resume point comes from the same unit as in the uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from llm2clip_vlm.data.errors import DataError
from llm2clip_vlm.data.index import RecordIndex
from llm2clip_vlm.logging import get_logger

log = get_logger(__name__)

# Below this many records read, a share of bad ones says little: the limit is applied after it.
MIN_RECORDS_FOR_BAD_SHARE = 200

# sample transform: (epoch, record id, encoded image bytes) -> a tuple of tensors
Transform = Callable[[int, int, bytes], tuple[Any, ...]]


@dataclass(frozen=True)
class StreamPlan:
    """Which records each unit reads in which order; a pure function of the plan's fields.

    Args:
        shard_starts: first record id of each shard, ascending (``len = shards + 1``; the last is N).
        seed: shuffle seed.
        units: ``world * workers``.
        buffer: shuffle-buffer size in records (1 = no shuffle within a unit).
        shard_weights: each shard's set weight (a weighted list of sets; see the module
            docstring); empty = every shard once per epoch, in a random order.
    """

    shard_starts: tuple[int, ...]
    seed: int
    units: int
    buffer: int
    shard_weights: tuple[float, ...] = ()

    @classmethod
    def of_index(
        cls,
        index: RecordIndex,
        n: int,
        seed: int,
        units: int,
        buffer: int,
        set_weights: Sequence[tuple[int, float]] = (),
    ) -> StreamPlan:
        """The plan of the first ``n`` records of an index (shards as the index records them).

        Args:
            set_weights: ``(first record, weight)`` of each set of a joined index, in order; no
                weighting when empty or when every weight is 1.
        """
        if index.meta["kind"] == "shards" or len(index.sources) > 1:  # (joined sets: one unit per source)
            shard = index.column("shard")[:n]
            # Records of one shard are contiguous in the index, shards in order.
            cuts = np.flatnonzero(np.diff(shard)) + 1
            starts = (0, *(int(c) for c in cuts), n)
        else:
            starts = (0, n)
        weights: tuple[float, ...] = ()
        if any(w != 1.0 for _, w in set_weights):
            firsts = np.array([s for s, _ in set_weights], dtype=np.int64)
            # A shard belongs to the set its first record lies in (sets hold whole shards).
            k = np.searchsorted(firsts, np.asarray(starts[:-1], dtype=np.int64), side="right") - 1
            weights = tuple(float(set_weights[int(j)][1]) for j in k)
        return cls(starts, seed, units, max(1, buffer), weights)

    @property
    def num_shards(self) -> int:
        return len(self.shard_starts) - 1

    def epoch_ids(self, epoch: int, unit: int) -> np.ndarray:
        """The record ids unit ``unit`` reads in epoch ``epoch``, in reading order.

        int32 while the ids fit (13M records need 4 bytes each, not 8): this array and the
        emission order are what the stream holds per record of its unit.
        """
        dtype = np.int32 if self.shard_starts[-1] < 2**31 else np.int64
        starts = np.asarray(self.shard_starts, dtype=np.int64)
        perm = self.epoch_shards(epoch)
        if len(perm) >= self.units:
            mine = perm[unit :: self.units]
            total = int(sum(starts[s + 1] - starts[s] for s in mine))
            ids = np.empty(total, dtype=dtype)
            at = 0
            for s in mine:  # filled in place: no per-shard temporaries to concatenate
                size = int(starts[s + 1] - starts[s])
                ids[at : at + size] = np.arange(starts[s], starts[s + 1], dtype=dtype)
                at += size
            return ids
        ids = np.concatenate([np.arange(starts[s], starts[s + 1], dtype=dtype) for s in perm])
        return ids[unit :: self.units]

    def epoch_shards(self, epoch: int) -> np.ndarray:
        """The shards epoch ``epoch`` reads, in order (the units then take every ``units``-th).

        Unweighted: a permutation of all shards. Weighted: shards drawn with replacement, as
        open_clip's ``ResampledShards2`` (see the module docstring).
        """
        rng = np.random.default_rng((self.seed, epoch))
        if not self.shard_weights:
            return rng.permutation(self.num_shards)
        w = np.asarray(self.shard_weights, dtype=np.float64)
        p = w * np.diff(np.asarray(self.shard_starts, dtype=np.int64))
        draws = max(1, int(round(float(w.sum()))))
        return rng.choice(self.num_shards, size=draws, replace=True, p=p / p.sum())

    def epoch_length(self, epoch: int, unit: int) -> int:
        return len(self.epoch_ids(epoch, unit))

    def epoch_order(self, epoch: int, unit: int) -> tuple[np.ndarray, np.ndarray]:
        """``(ids in emission order, ids in reading order)`` of one unit's epoch.

        The shuffle buffer fills with the first ``buffer`` ids; each later id read replaces a
        uniformly drawn buffered one, which is emitted; at the end the rest leave in random order.
        When emission ``t`` happens, :meth:`read_cursor` ``(t, n)`` ids of the reading order have
        been read (a formula, so no per-record array holds it).
        """
        ids = self.epoch_ids(epoch, unit)
        n, b = len(ids), min(self.buffer, len(ids))
        rng = np.random.default_rng((self.seed, epoch, unit, 1))
        out = np.empty(n, dtype=ids.dtype)
        buf = ids[:b].copy()
        draws = rng.integers(b, size=max(0, n - b)) if b else np.zeros(0, np.int64)
        for t in range(n - b):  # ids only: cheap enough (~0.3 us per record) to redo at each epoch
            j = draws[t]
            out[t] = buf[j]
            buf[j] = ids[b + t]
        out[n - b :] = buf[rng.permutation(b)]
        return out, ids

    def read_cursor(self, t: int, n: int) -> int:
        """How many ids of an ``n``-id epoch were read when emission ``t`` happened."""
        return min(min(self.buffer, n) + t + 1, n)

    def locate(self, unit: int, position: int) -> tuple[int, int]:
        """``(epoch, emission within the epoch)`` of a unit's ``position``-th emission overall."""
        if self.epoch_length(0, unit) == 0:
            raise ValueError(
                f"stream unit {unit} has no records ({self.shard_starts[-1]} records, {self.units} units)"
            )
        epoch = 0
        while True:
            length = self.epoch_length(epoch, unit)
            if position < length:
                return epoch, position
            position -= length
            epoch += 1


class _ByteReader:
    """Reads records' image bytes, keeping the current shard's file open (sequential reads)."""

    def __init__(self, index: RecordIndex) -> None:
        self.index = index
        self.shards = index.meta["kind"] != "manifest"  # "mixed": joined manifests and shards
        self._file: Any = None
        self._shard = -1
        self._cols = (
            (index.column("shard"), index.column("offset"), index.column("size")) if self.shards else None
        )

    def read(self, i: int) -> bytes:
        path = self.index.table.column("image")[i].as_py() if self.index.meta["kind"] != "shards" else None
        if path is not None:
            with open(path, "rb") as f:
                return f.read()
        shard_col, offset_col, size_col = self._cols  # type: ignore[misc]
        shard = int(shard_col[i])
        if shard != self._shard:
            if self._file is not None:
                self._file.close()
            self._file, self._shard = open(self.index.sources[shard], "rb"), shard
        self._file.seek(int(offset_col[i]))
        size = int(size_col[i])
        data = self._file.read(size)
        if len(data) != size:
            raise OSError(f"{self.index.sources[shard]}: member of record {i} is truncated")
        return data

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class ShardStream(IterableDataset):
    """The samples of one rank, worker by worker, from its units' positions onwards (endless).

    Each item is ``(*transform(epoch, id, bytes), unit, position after it, bad records so far)``;
    :class:`StreamLoader` strips the last three and keeps them as the stream's state.

    Args:
        index: the data set's index; records ``0 .. n-1`` are streamed.
        n: how many records (``max_images``).
        transform: ``(epoch, record id, image bytes) -> tuple`` (raises for a bad record).
        rank, world, workers: this process, the process count, DataLoader workers per process.
        seed, buffer: shuffle seed and buffer size.
        positions: unit -> emissions already done (a resumed run); missing units start at 0.
        bad: unit -> bad records skipped so far (a resumed run).
        first_worker: the logical worker DataLoader worker 0 plays (see the module docstring).
        on_bad: called as ``on_bad(source, error)`` for a bad record; it may raise to stop.
        set_weights: ``(first record, weight)`` per set of a weighted list of sets (see
            :meth:`StreamPlan.of_index`); empty = every shard once per epoch.
    """

    def __init__(
        self,
        index: RecordIndex,
        n: int,
        transform: Transform,
        *,
        rank: int,
        world: int,
        workers: int,
        seed: int,
        buffer: int,
        positions: dict[int, int] | None = None,
        bad: dict[int, int] | None = None,
        first_worker: int = 0,
        on_bad: Callable[[str, Exception], None] | None = None,
        set_weights: Sequence[tuple[int, float]] = (),
    ) -> None:
        self.index, self.n, self.transform = index, n, transform
        self.rank, self.world, self.workers = rank, world, max(1, workers)
        self.plan = StreamPlan.of_index(index, n, seed, world * self.workers, buffer, set_weights)
        # What a checkpoint records of the weights (None = unweighted, the key is then left out).
        self.weights = [float(w) for _, w in set_weights] if self.plan.shard_weights else None
        self.positions = dict(positions or {})
        self.bad = dict(bad or {})
        self.first_worker = first_worker % self.workers
        self.on_bad = on_bad

    def unit_of(self, worker: int) -> int:
        return self.rank * self.workers + (worker + self.first_worker) % self.workers

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        info = get_worker_info()
        unit = self.unit_of(info.id if info is not None else 0)
        yield from self.unit_samples(unit)

    def unit_samples(self, unit: int) -> Iterator[tuple[Any, ...]]:
        """One unit's endless samples from its stored position."""
        position = self.positions.get(unit, 0)
        bad = self.bad.get(unit, 0)
        epoch, t = self.plan.locate(unit, position)
        reader = _ByteReader(self.index)
        try:
            while True:
                ids, read_order = self.plan.epoch_order(epoch, unit)
                n = len(ids)
                buffered: dict[int, bytes] = {}
                # Resuming mid-epoch: what was read before ``t`` and is still buffered is fetched
                # by seek when emitted; reading continues at the cursor.
                r = self.plan.read_cursor(t - 1, n) if t > 0 else 0
                for k in range(t, n):
                    while r < self.plan.read_cursor(k, n):
                        buffered[int(read_order[r])] = reader.read(int(read_order[r]))
                        r += 1
                    rid = int(ids[k])
                    data = buffered.pop(rid, None)
                    position += 1
                    try:
                        if data is None:
                            data = reader.read(rid)
                        sample = self.transform(epoch, rid, data)
                    except Exception as e:  # a bad record: the policy decides (skip, or stop)
                        if self.on_bad is None:
                            raise
                        self.on_bad(self.describe(rid), e)
                        bad += 1
                        continue
                    yield (*sample, unit, position, bad)
                epoch, t = epoch + 1, 0
        finally:
            reader.close()

    def describe(self, rid: int) -> str:
        return self.index.describe(rid)


class _Collate:
    """A stage's own collate over the samples (e.g. padding token sequences of different lengths),
    with the stream's unit/position/bad columns stacked as the default collate would; picklable."""

    def __init__(self, collate: Callable[[list[tuple[Any, ...]]], Any]) -> None:
        self.collate = collate

    def __call__(self, items: list[tuple[Any, ...]]) -> tuple[Any, ...]:
        data = self.collate([item[:-3] for item in items])
        return (data, *(torch.tensor([item[k] for item in items]) for k in (-3, -2, -1)))


class StreamLoader:
    """A DataLoader over a :class:`ShardStream` that keeps the stream position of every unit.

    Iterating yields the batches without their unit/position columns; :meth:`state_dict` is what a
    checkpoint stores (gathered over ranks), :meth:`positions_for` what a resumed run passes back.
    ``collate`` (default: torch's) turns a batch's samples, without those columns, into one object;
    the batch is then ``(that object,)``.
    """

    def __init__(
        self,
        stream: ShardStream,
        local_batch: int,
        num_workers: int,
        pin_memory: bool = False,
        collate: Callable[[list[tuple[Any, ...]]], Any] | None = None,
    ) -> None:
        self.stream = stream
        self.batches = 0
        self.positions: dict[int, int] = dict(stream.positions)
        self.bad: dict[int, int] = dict(stream.bad)
        self.loader = DataLoader(
            stream,
            batch_size=local_batch,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=False,
            collate_fn=_Collate(collate) if collate is not None else None,
        )

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        for batch in self.loader:
            *data, units, positions, bad = batch
            # One batch comes from one worker, i.e. one unit; its last position is the largest.
            self.positions[int(units[0])] = int(positions.max())
            self.bad[int(units[0])] = int(bad.max())
            self.batches += 1
            yield tuple(data)

    def state_dict(self, first_batches: int = 0) -> dict[str, Any]:
        """This rank's stream state, merged with every other rank's (a collective when distributed).

        Args:
            first_batches: batches this rank had taken before this loader started (a resume).
        """
        s = self.stream
        mine = {str(u): [p, self.bad.get(u, 0)] for u, p in self.positions.items()}
        merged = dict(mine)
        if s.world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            everyone: list[Any] = [None] * s.world
            torch.distributed.all_gather_object(everyone, mine)
            merged = {k: v for d in everyone for k, v in d.items()}
        state = {
            "units": merged,
            "batches": first_batches + self.batches,
            "world": s.world,
            "workers": s.workers,
            "seed": s.plan.seed,
            "buffer": s.plan.buffer,
            "records": s.n,
        }
        if s.weights is not None:  # a weighted stream: its shards are drawn by these weights
            state["weights"] = s.weights
        return state

    @staticmethod
    def positions_for(
        state: dict[str, Any],
        *,
        world: int,
        workers: int,
        seed: int,
        buffer: int,
        records: int,
        weights: Sequence[float] | None = None,
    ) -> tuple[dict[int, int], dict[int, int], int]:
        """``(unit positions, bad counts, first worker)`` to resume from a saved :meth:`state_dict`.

        Args:
            weights: the sets' weights when any is not 1 (None: unweighted).

        Raises:
            ValueError: the saved stream was cut for another process/worker count, seed, buffer,
                data set or set weights: the same position would mean other records.
        """
        if not state:
            return {}, {}, 0
        want = {
            "world": world,
            "workers": max(1, workers),
            "seed": seed,
            "buffer": max(1, buffer),
            "records": records,
            "weights": [float(w) for w in weights] if weights is not None else None,
        }
        got = {k: state.get(k) for k in want}
        if got != want:
            diff = ", ".join(f"{k} {got[k]} -> {want[k]}" for k in want if got[k] != want[k])
            raise ValueError(
                f"the checkpoint's data stream was cut differently ({diff}); resume with the same settings"
            )
        units = {int(u): (int(v[0]), int(v[1])) for u, v in state["units"].items()}
        return (
            {u: p for u, (p, _) in units.items()},
            {u: b for u, (_, b) in units.items()},
            int(state["batches"]) % max(1, workers),
        )

    @property
    def skipped(self) -> int:
        """Bad records this rank's units skipped so far (since the run started)."""
        return sum(self.bad.values())

    def check_bad_share(self, max_bad_fraction: float, prefix: str = "", first: str = "") -> None:
        """Stop (:class:`DataError`) once more than ``max_bad_fraction`` of what this rank read was
        bad; applied after :data:`MIN_RECORDS_FOR_BAD_SHARE` records, below which a share says little.

        Args:
            prefix: what the message starts with (the stage).
            first: the first skipped record, named at the end of the message ("" = none).
        """
        seen, bad = sum(self.positions.values()), self.skipped
        if seen >= MIN_RECORDS_FOR_BAD_SHARE and bad > max_bad_fraction * seen:
            raise DataError(
                f"{prefix}{bad} of the {seen} records read so far are bad ({100 * bad / seen:.1f}% > "
                f"max_bad_fraction {100 * max_bad_fraction:.1f}%)" + (f"; first: {first}" if first else "")
            )
