"""Checking images once: cached by identity, resumable after a kill, split between processes."""

from __future__ import annotations

from pathlib import Path

import pytest

import llm2clip_vlm.data.check as check
from llm2clip_vlm.data.check import check_images
from llm2clip_vlm.data.errors import BadRecords, DataError


class _Loads:
    """A fake decoder: record ``i`` is bad when ``i`` is in ``bad``; counts calls; may be killed."""

    def __init__(self, bad: set[int], kill_at: int = -1) -> None:
        self.bad, self.kill_at, self.calls = bad, kill_at, []

    def __call__(self, i: int) -> None:
        if i == self.kill_at:
            raise KeyboardInterrupt
        self.calls.append(i)
        if i in self.bad:
            raise DataError(f"rec{i}: cannot read image")


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(check, "CHUNK", 10)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def test_second_start_decodes_nothing_and_applies_the_same_policy(tmp_path: Path) -> None:
    records = list(range(45))
    loads = _Loads({7, 31})
    good = check_images(records, BadRecords(True, 0.1), loads, key="k", workers=2, cache_dir=tmp_path)
    assert good == [i for i in records if i not in (7, 31)] and sorted(loads.calls) == records
    again = _Loads({7, 31})
    policy = BadRecords(True, 0.1)
    assert check_images(records, policy, again, key="k", cache_dir=tmp_path) == good
    assert again.calls == [] and [w for w, _ in policy.skipped] == ["7", "31"]
    with pytest.raises(DataError, match=r"rec7: cannot read image.*skip_bad"):  # stop: the first bad one
        check_images(records, BadRecords(False), _Loads(set()), key="k", cache_dir=tmp_path)
    # Another identity (another data set) is checked anew; no key = no cache.
    other = _Loads(set())
    assert check_images(records, BadRecords(), other, key="k2", cache_dir=tmp_path) is None
    assert len(other.calls) == 45


def test_a_killed_check_resumes_at_the_first_missing_chunk(tmp_path: Path) -> None:
    records = list(range(45))
    with pytest.raises(KeyboardInterrupt):
        check_images(records, BadRecords(), _Loads(set(), kill_at=25), key="k", workers=1, cache_dir=tmp_path)
    rest = _Loads(set())
    assert check_images(records, BadRecords(), rest, key="k", workers=1, cache_dir=tmp_path) is None
    assert sorted(rest.calls) == list(range(20, 45))  # chunks 0 and 1 were complete


def test_processes_start_at_their_own_chunk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    records = list(range(40))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(KeyboardInterrupt):  # rank 1 starts at chunk 2 of 4 and is stopped in chunk 3
        check_images(records, BadRecords(), _Loads(set(), kill_at=35), key="k", workers=1, cache_dir=tmp_path)
    monkeypatch.setenv("RANK", "0")
    rank0 = _Loads(set())
    check_images(records, BadRecords(), rank0, key="k", workers=1, cache_dir=tmp_path)
    assert sorted(rank0.calls) == [*range(0, 20), *range(30, 40)]  # chunk 2 was rank 1's


def test_llava_images_are_checked_once_with_the_same_switch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from PIL import Image

    import llm2clip_vlm.data.conversations as llava_data

    monkeypatch.setenv("LLM2CLIP_VLM_CACHE", str(tmp_path / "cache"))
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    (tmp_path / "2.png").write_bytes(b"not a png")
    conv = [{"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": "a square"}]
    data = tmp_path / "d.json"
    data.write_text(
        json.dumps([{"id": str(i), "image": f"{i}.png", "conversations": conv} for i in range(3)])
    )
    calls: list[str] = []
    real = llava_data.load_rgb
    monkeypatch.setattr(llava_data, "load_rgb", lambda p, w="": (calls.append(str(p)), real(p, w))[1])
    with pytest.raises(DataError, match=r"d\.json\[#2\] id=2: cannot read image"):
        llava_data.load_llava_records(data)
    assert len(calls) == 3
    recs = llava_data.load_llava_records(data, skip_bad=True, max_bad_fraction=0.5)
    assert [r.id for r in recs] == ["0", "1"] and len(calls) == 3  # the cached check: nothing decoded
    assert len(llava_data.load_llava_records(data, verify_images=False)) == 3  # the switch
