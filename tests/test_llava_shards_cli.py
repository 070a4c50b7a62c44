"""`llm2clip-vlm llava-shards`: LLaVA JSON + images to shards, resumable, with one-line refusals."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cli_fork
import numpy as np
import pytest
from PIL import Image

from llm2clip_vlm.data.conversations import load_llava_records
from llm2clip_vlm.data.llava_shards import write_llava_shards

QA = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A picture."}]


@dataclass
class Result:
    returncode: int
    out: str  # stdout and stderr together: the console writes results and errors to stderr


def _cli(*args: str, cwd: Path, cache: Path) -> Result:
    # A new process (forked from tests/cli_fork.py's server), COLUMNS=250, its own index cache.
    code, out, err = cli_fork.run(
        ["llava-shards", *args], env=dict(cli_fork.ENV, LLM2CLIP_VLM_CACHE=str(cache)), cwd=cwd
    )
    return Result(code, out + err)


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    """Five photos of different sizes and modes, one text-only record, in LLaVA's JSON layout."""
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    records = []
    for i, (size, mode) in enumerate(
        [((40, 30), "RGB"), ((17, 64), "L"), ((32, 32), "RGBA"), ((50, 20), "RGB"), ((8, 8), "P")]
    ):
        arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).convert(mode).save(tmp_path / "img" / f"{i}.png")
        records.append({"id": f"p{i}", "image": f"img/{i}.png", "conversations": QA, "source": "test"})
    records.insert(
        2,
        {"id": "text", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hi."}]},
    )
    (tmp_path / "data.json").write_text(json.dumps(records))
    return tmp_path


def test_shards_hold_the_records_of_the_json(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    res = _cli("data.json", "-o", "shards", "--per-shard", "4", cwd=data, cache=data / "cache")
    assert res.returncode == 0, res.out
    assert "wrote 6 records in 2 shards to shards" in res.out
    assert "llava.<phase>.data.stream=true" in res.out
    assert "llava shards: record 6/6" in res.out  # a progress line, stderr not being a terminal
    monkeypatch.setenv("LLM2CLIP_VLM_CACHE", str(data / "cache"))
    from_json = load_llava_records(data / "data.json")
    from_shards = load_llava_records(data / "shards")
    assert len(from_shards) == 6
    for a, b in zip(from_json, from_shards, strict=True):
        assert (a.id, a.conversations, a.extra) == (b.id, b.conversations, b.extra)
        assert (a.image.read_bytes() if a.image is not None else None) == b.image


def test_a_killed_run_keeps_its_finished_shards(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM2CLIP_VLM_CACHE", str(data / "cache"))
    records = load_llava_records(data / "data.json")
    source = {"data": "data.json"}
    out = data / "out"
    # The third shard's write dies (as a kill would): the first two are whole, the third absent.
    real_read = Path.read_bytes
    monkeypatch.setattr(
        Path,
        "read_bytes",
        lambda p: (_ for _ in ()).throw(OSError("killed")) if p.name == "4.png" else real_read(p),
    )
    with pytest.raises(OSError, match="killed"):
        write_llava_shards(records, out, per_shard=2, source=source)
    assert sorted(p.name for p in out.glob("*.tar")) == ["llava-000000.tar", "llava-000001.tar"]
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    monkeypatch.setattr(Path, "read_bytes", real_read)
    paths = write_llava_shards(records, out, per_shard=2, source=source)
    assert [p.name for p in paths] == ["llava-000000.tar", "llava-000001.tar", "llava-000002.tar"]
    assert {n: (out / n).stat().st_mtime_ns for n in done} == done  # kept, not rewritten
    assert not list(out.glob("*.tmp"))
    assert [r.id for r in load_llava_records(out)] == [r.id for r in records]


def test_bad_input_is_one_line_and_writes_nothing(data: Path) -> None:
    records = json.loads((data / "data.json").read_text())
    records.append({"id": "gone", "image": "img/missing.png", "conversations": QA})
    (data / "bad.json").write_text(json.dumps(records))
    cache = data / "cache"
    res = _cli("bad.json", "-o", "bad", cwd=data, cache=cache)
    assert res.returncode == 1 and "Traceback" not in res.out
    assert "bad.json" in res.out and "id=gone" in res.out and "missing.png does not exist" in res.out
    assert not (data / "bad").exists()
    # --skip-bad leaves it out and says so.
    res = _cli("bad.json", "-o", "bad", "--skip-bad", "--max-bad-fraction", "0.5", cwd=data, cache=cache)
    assert res.returncode == 0, res.out
    assert "wrote 6 records" in res.out and "1 bad records left out" in res.out
    # Other records into the same folder: refused, the shards there untouched.
    res = _cli("data.json", "-o", "bad", "--per-shard", "3", cwd=data, cache=cache)
    assert res.returncode == 1 and "Traceback" not in res.out
    assert "written from other records or settings" in res.out and "bad.json" in res.out
    for args in (["nope.json", "-o", "x"], ["data.json", "-o", "x", "--per-shard", "0"]):
        res = _cli(*args, cwd=data, cache=cache)
        assert res.returncode == 2 and "Traceback" not in res.out and "llava-shards:" in res.out
