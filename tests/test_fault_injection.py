"""Every case of tests/fault_injection.py (through the CLI), plus fast in-process checks of its parts."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import fault_injection as fi
import pytest
import torch


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    yield fi.World(tmp_path_factory.mktemp("fault-injection"))


@pytest.mark.slow  # each case is 1-4 CLI processes on tiny data: ~2 min for all on 2 busy cores
@pytest.mark.parametrize(("name", "fn"), [(n, f) for n, _, f in fi.CASES], ids=[n for n, _, _ in fi.CASES])
def test_fault_injection_case(world: object, name: str, fn: object) -> None:
    ok, outcome, _ = fi.run_case(world, fn)
    assert ok, outcome


# -- fast checks of the pieces -------------------------------------------------------------------
def test_checkpoint_with_flipped_bytes_is_refused_naming_the_file(tmp_path: Path) -> None:
    from llm2clip_vlm.training.checkpoint import Checkpointer, CheckpointError

    ckpt = Checkpointer(tmp_path)
    path = ckpt.save(1, weights={"w": torch.arange(64, dtype=torch.float32)}, state={"step": 1})
    assert len(json.loads((path / "checkpoint.json").read_text())["sha256"]) == 2  # weights + rng
    assert ckpt.load() is not None
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{f} is corrupt"):
        ckpt.load()


def test_config_changes_ignore_speed_settings() -> None:
    from llm2clip_vlm.run_dir import config_changes

    old = {
        "stage2": {"lr": 1e-3, "num_workers": 2, "backbone": {"hidden_size": 32}},
        "runtime": {"threads": 1},
    }
    new = {
        "stage2": {"lr": 2e-3, "num_workers": 0, "backbone": {"hidden_size": 64}},
        "runtime": {"threads": 2},
    }
    assert config_changes(old, new, ("stage2", "runtime")) == [
        "stage2.backbone.hidden_size: 32 -> 64",
        "stage2.lr: 0.001 -> 0.002",
    ]


def test_file_identity_sees_an_edit_of_the_same_size(tmp_path: Path) -> None:
    import os

    from llm2clip_vlm.identity import file_identity

    f = tmp_path / "m.jsonl"
    f.write_bytes(b"a" * 300_000)
    st = f.stat()
    before = {m: file_identity(f, m) for m in ("sampled", "full")}
    f.write_bytes(b"a" * 150_000 + b"b" + b"a" * 149_999)  # the middle block changes
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the mtime is restored
    assert file_identity(f, "sampled") != before["sampled"]
    assert file_identity(f, "full") != before["full"]


def test_replacement_of_a_bad_image_is_deterministic() -> None:
    from llm2clip_vlm.bad_samples import load_or_replace
    from llm2clip_vlm.data.errors import DataError

    def load(r: int) -> int:
        if r in (3, 5):
            raise DataError(f"record {r}: cannot read image")
        return r

    records = list(range(10))
    a = load_or_replace(load, records, records, 3, epoch=1, seed=0)
    b = load_or_replace(load, records, records, 3, epoch=1, seed=0)
    assert a == b and a[0] not in (3, 5) and "record 3" in a[2]
    assert load_or_replace(load, records, records, 4, epoch=1, seed=0) == (4, 4, "")


def test_bad_fraction_counts_every_phase(tmp_path: Path) -> None:
    from llm2clip_vlm.data.errors import BadRecords, DataError

    earlier = [("m.jsonl:1", "broken"), ("m.jsonl:2", "broken")]
    policy = BadRecords(True, 0.1, name="train images", earlier=earlier)
    policy.add("img-3", DataError("img-3: unreadable"))
    policy.add("img-4", DataError("img-4: unreadable"))
    with pytest.raises(DataError, match=r"4 of 32 records are bad \(2 when reading, 2 here\)"):
        policy.check(30)
