"""Streaming a weighted list of sets: shards drawn by set weight, exact resume, weight 1 unchanged.

The anchor is open_clip's ``--train-data-upsampling-factors`` for webdataset
(mlfoundations/open_clip ``src/open_clip_train/data.py``: ``expand_urls`` gives every shard of a
source that source's weight, ``ResampledShards2.__iter__`` draws shards with replacement by
``self.rng.choices(self.urls, weights=self.weights, k=1)``, reseeding the generator with the epoch
when ``deterministic``; ``params.py``: "upsample specific data sources", ``1::2::0.5``). Our
stream draws each epoch's shards the same way, seeded by ``(seed, epoch)``, so a unit's position
alone still places a resumed run.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from llm2clip_vlm.data.captions import load_caption_set, load_caption_sets, record_index, set_parts
from llm2clip_vlm.data.config import CaptionSetConfig
from llm2clip_vlm.data.stream import ShardStream, StreamLoader, StreamPlan


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM2CLIP_VLM_CACHE", str(tmp_path / "cache"))


def write_run(folder: Path, shards: int, per_shard: int, tag: str) -> Path:
    """An img2dataset-like run: keys from 000000000 (they collide across runs), image = tag+key."""
    folder.mkdir(parents=True, exist_ok=True)
    i = 0
    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for _ in range(per_shard):
                for name, data in (
                    (f"{i:09d}.jpg", f"{tag}{i}".encode()),
                    (f"{i:09d}.json", json.dumps({"short_captions": [f"{tag} {i}"]}).encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                i += 1
    return folder


@pytest.fixture
def runs(tmp_path: Path) -> tuple[Path, Path]:
    """Set a: 10 shards x 6 records; set b: 5 shards x 6 records."""
    return write_run(tmp_path / "a", 10, 6, "a"), write_run(tmp_path / "b", 5, 6, "b")


def _sets(runs: tuple[Path, Path], wa: float, wb: float):
    a, b = runs
    return load_caption_sets(
        [CaptionSetConfig(path=str(a), weight=wa), CaptionSetConfig(path=str(b), weight=wb)]
    )


def _set_weights(train) -> list[tuple[int, float]]:
    return [(p.start, p.weight) for p in set_parts(train)]


def _transform(epoch: int, rid: int, data: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(rid), torch.tensor(0 if data.startswith(b"a") else 1)


def test_each_set_gets_its_weighted_share_of_the_shards(runs) -> None:
    train = _sets(runs, 1.0, 3.0)
    index = record_index(train)
    plan = StreamPlan.of_index(index, len(train), seed=0, units=2, buffer=4, set_weights=_set_weights(train))
    assert plan.shard_weights == (1.0,) * 10 + (3.0,) * 5  # each shard carries its set's weight
    # open_clip's count: round(sum of the shards' weights) draws per epoch (10 x 1 + 5 x 3).
    assert all(len(plan.epoch_shards(e)) == 25 for e in range(3))
    assert plan.epoch_shards(0).tolist() != plan.epoch_shards(1).tolist()
    from_b, total = 0, 0
    for e in range(200):
        ids = np.concatenate([plan.epoch_ids(e, u) for u in range(2)])
        from_b += int((ids >= 60).sum())
        total += len(ids)
    # b: 30 records x 3 = 90 of 150 per epoch (0.6); a: 60 x 1 = 60 (0.4). 5000 draws: sd ~0.007.
    assert abs(from_b / total - 0.6) < 0.03 and abs(total / 200 - 150) < 5
    # A set of weight 0 is never read.
    zero = _sets(runs, 1.0, 0.0)
    plan0 = StreamPlan.of_index(record_index(zero), len(zero), 0, 2, 4, _set_weights(zero))
    assert all((plan0.epoch_ids(e, u) < 60).all() for e in range(20) for u in range(2))


def test_the_stream_emits_the_weighted_share(runs) -> None:
    train = _sets(runs, 0.5, 2.0)  # a: 60 x 0.5 = 30, b: 30 x 2 = 60 per epoch (b: 2/3)
    stream = ShardStream(
        record_index(train), len(train), _transform, rank=0, world=1, workers=1, seed=1, buffer=5,
        set_weights=_set_weights(train),
    )  # fmt: skip
    got = [int(s[1]) for s, _ in zip(stream.unit_samples(0), range(3000), strict=False)]
    assert abs(np.mean(got) - 2 / 3) < 0.06  # 500 shard draws: sd ~0.02


def _take(loader: StreamLoader, batches: int) -> list[list[int]]:
    out = []
    for ids, _set in loader:
        out.append(ids.tolist())
        if len(out) == batches:
            break
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_weighted_stream_emits_exactly_the_uninterrupted_batches(runs, workers: int) -> None:
    train = _sets(runs, 0.5, 2.0)
    index, weights = record_index(train), _set_weights(train)

    def make(positions=None, bad=None, first=0) -> StreamLoader:
        stream = ShardStream(
            index, len(train), _transform, rank=0, world=1, workers=workers, seed=5, buffer=7,
            positions=positions, bad=bad, first_worker=first, set_weights=weights,
        )  # fmt: skip
        return StreamLoader(stream, local_batch=4, num_workers=workers)

    straight = _take(make(), 60)  # 240 samples: more than 2 epochs of ~90
    ids = [i for b in straight for i in b]
    assert len(set(ids)) < len(ids)  # drawn with replacement: repeats
    for cut in (7, 31):  # mid-epoch, and a later epoch
        first = make()
        head = _take(first, cut)
        state = first.state_dict()
        assert state["weights"] == [0.5, 2.0]  # the weights ride in the resume state
        positions, bad, first_worker = StreamLoader.positions_for(
            state, world=1, workers=workers, seed=5, buffer=7, records=90, weights=[0.5, 2.0]
        )
        assert head + _take(make(positions, bad, first_worker), 60 - cut) == straight
    with pytest.raises(ValueError, match=r"cut differently \(weights \[0.5, 2.0\] -> \[1.0, 2.0\]\)"):
        StreamLoader.positions_for(
            state, world=1, workers=workers, seed=5, buffer=7, records=90, weights=[1, 2]
        )
    with pytest.raises(ValueError, match=r"weights \[0.5, 2.0\] -> None"):
        StreamLoader.positions_for(state, world=1, workers=workers, seed=5, buffer=7, records=90)


def test_a_list_of_one_set_of_weight_one_streams_as_before(runs) -> None:
    a, _ = runs
    plain = load_caption_set(CaptionSetConfig(path=str(a)))
    listed = load_caption_sets([CaptionSetConfig(path=str(a), weight=1.0)])
    assert _set_weights(listed) in ([], [(0, 1.0)])

    def run(train) -> tuple[list[list[int]], dict]:
        stream = ShardStream(
            record_index(train), len(train), _transform, rank=0, world=1, workers=0, seed=5, buffer=7,
            set_weights=_set_weights(train),
        )  # fmt: skip
        loader = StreamLoader(stream, local_batch=4, num_workers=0)
        return _take(loader, 40), loader.state_dict()

    (b1, s1), (b2, s2) = run(plain), run(listed)
    assert b1 == b2 and s1 == s2 and "weights" not in s1
    # The unweighted epoch is the permutation of every shard the stream always used.
    plan = StreamPlan.of_index(record_index(plain), len(plain), 5, 1, 7, [(0, 1.0)])
    assert plan.shard_weights == ()
    assert plan.epoch_shards(3).tolist() == np.random.default_rng((5, 3)).permutation(10).tolist()
