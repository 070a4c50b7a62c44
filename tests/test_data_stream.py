"""Streamed shards: disjoint units per rank/worker, exact resume mid-epoch, a bounded buffer."""

from __future__ import annotations

import io
import json
import tarfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from llm2clip_vlm.data.captions import index_caption_set
from llm2clip_vlm.data.config import CaptionSetConfig
from llm2clip_vlm.data.index import RecordIndex
from llm2clip_vlm.data.stream import ShardStream, StreamLoader, StreamPlan


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM2CLIP_VLM_CACHE", str(tmp_path / "cache"))


def write_shards(
    folder: Path, shards: int, per_shard: int, image_bytes: int = 64, bad: set[int] = frozenset()
) -> Path:
    """Shards whose 'image' of record i is ``i`` as text padded to ``image_bytes`` (or b'BAD')."""
    folder.mkdir(parents=True, exist_ok=True)
    i = 0
    for s in range(shards):
        with tarfile.open(folder / f"s-{s:03d}.tar", "w") as tar:
            for _ in range(per_shard):
                img = b"BAD" if i in bad else str(i).encode().ljust(image_bytes, b" ")
                for name, data in (
                    (f"{i:06d}.jpg", img),
                    (f"{i:06d}.json", json.dumps({"short_captions": [f"c{i}"]}).encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                i += 1
    return folder


def _index(folder: Path) -> RecordIndex:
    return index_caption_set(CaptionSetConfig(path=str(folder)))


def _transform(epoch: int, rid: int, data: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    if data == b"BAD":
        raise ValueError("bad image")
    assert int(data.strip()) == rid  # the bytes are the record's own
    return torch.tensor(rid), torch.tensor(epoch)


def _stream(index: RecordIndex, rank: int = 0, world: int = 1, workers: int = 0, **kw) -> ShardStream:
    return ShardStream(
        index, len(index), _transform, rank=rank, world=world, workers=workers, seed=5, buffer=7, **kw
    )


def _take(loader: StreamLoader, batches: int) -> list[list[int]]:
    out = []
    for ids, _epochs in loader:
        out.append(ids.tolist())
        if len(out) == batches:
            break
    return out


@pytest.mark.parametrize(("shards", "workers"), [(6, 0), (6, 2), (8, 2), (1, 2)])
def test_ranks_and_workers_read_disjoint_records_covering_the_epoch(
    tmp_path: Path, shards: int, workers: int
) -> None:
    per_shard = 24 // shards
    index = _index(write_shards(tmp_path / "d", shards, per_shard))
    seen: list[int] = []
    for rank in range(2):  # two simulated ranks
        stream = _stream(index, rank, 2, workers)
        for w in range(max(1, workers)):
            unit = stream.unit_of(w)
            ids = [
                int(s[0])
                for s, _ in zip(
                    stream.unit_samples(unit), range(stream.plan.epoch_length(0, unit)), strict=False
                )
            ]
            assert len(ids) == len(set(ids))
            seen += ids
    assert sorted(seen) == list(range(24))  # disjoint, and together one epoch
    if shards >= 4:  # whole shards per unit: a unit's records come from its own shards only
        unit_ids = _stream(index, 1, 2, workers).plan.epoch_ids(0, 1)
        assert len({i // per_shard for i in unit_ids}) == len(unit_ids) // per_shard


def test_the_buffer_shuffles_within_a_unit_and_epochs_differ(tmp_path: Path) -> None:
    index = _index(write_shards(tmp_path / "d", 4, 10))
    plan = StreamPlan.of_index(index, len(index), seed=1, units=2, buffer=5)
    order0, read_order = plan.epoch_order(0, 0)
    assert read_order.tolist() == plan.epoch_ids(0, 0).tolist()
    cursor = np.array([plan.read_cursor(t, len(order0)) for t in range(len(order0))])
    assert sorted(order0.tolist()) == sorted(plan.epoch_ids(0, 0).tolist())
    assert order0.tolist() != plan.epoch_ids(0, 0).tolist()
    assert plan.epoch_order(1, 0)[0].tolist() != order0.tolist()
    assert (np.diff(cursor) >= 0).all() and cursor[-1] == len(order0) and cursor[0] == 6  # buffer 5 + 1
    # An id is never emitted before it was read.
    read = plan.epoch_ids(0, 0).tolist()
    assert all(read.index(i) < c for i, c in zip(order0.tolist(), cursor.tolist(), strict=False))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_and_across_epochs_emits_exactly_the_same_batches(
    tmp_path: Path, workers: int
) -> None:
    index = _index(write_shards(tmp_path / "d", 6, 9, bad={4, 30}))
    skipped: list[str] = []

    def make(positions=None, bad=None, first=0) -> StreamLoader:
        stream = _stream(
            index,
            0,
            1,
            workers,
            positions=positions,
            bad=bad,
            first_worker=first,
            on_bad=lambda w, e: skipped.append(w),
        )
        return StreamLoader(stream, local_batch=4, num_workers=workers)

    straight_loader = make()
    straight = _take(straight_loader, 30)
    assert straight_loader.skipped >= 2  # 120 samples: more than 2 epochs of 52 good records
    assert {i for b in straight[:13] for i in b} <= set(range(54)) - {4, 30}
    for cut in (5, 17):  # mid-epoch, and in the second epoch
        first = make()
        head = _take(first, cut)
        state = first.state_dict()
        positions, bad, first_worker = StreamLoader.positions_for(
            state, world=1, workers=workers, seed=5, buffer=7, records=54
        )
        again = make(positions, bad, first_worker)
        resumed = _take(again, 30 - cut)
        assert head + resumed == straight
        assert again.skipped == straight_loader.skipped  # the count carries over the resume
    if workers == 0:  # (in worker processes the callback runs there)
        assert skipped and all(s.endswith(("000004", "000030")) for s in skipped)
    with pytest.raises(ValueError, match="cut differently .*workers"):
        StreamLoader.positions_for(state, world=1, workers=workers + 3, seed=5, buffer=7, records=54)


def test_only_the_shuffle_buffer_holds_image_bytes(tmp_path: Path) -> None:
    image = 50_000
    index = _index(write_shards(tmp_path / "d", 4, 50, image_bytes=image))
    stream = ShardStream(
        index, len(index), lambda e, i, d: (torch.tensor(i),), rank=0, world=1, workers=0, seed=0, buffer=8
    )
    tracemalloc.start()
    n = sum(1 for _ in zip(stream.unit_samples(0), range(200), strict=False))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert n == 200
    # 200 images of 50 kB passed through; at most the buffer (+ the one in hand) was held at once.
    assert peak < 12 * image, peak
