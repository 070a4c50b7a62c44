"""The cached columnar index behind every image-caption set: built once, reused, O(1) RAM per record."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
import tracemalloc
from pathlib import Path

import pytest
from PIL import Image

from llm2clip_vlm.data.captions import index_caption_set, load_caption_set
from llm2clip_vlm.data.config import CaptionSetConfig
from llm2clip_vlm.identity import file_stamp


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LLM2CLIP_VLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _manifest(tmp_path: Path, n: int) -> Path:
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    m = tmp_path / "m.jsonl"
    with open(m, "w") as f:
        for i in range(n):
            f.write(json.dumps({"image": "a.png", "key": f"k{i}", "short_captions": [f"cap {i}"]}) + "\n")
    return m


def test_second_open_reuses_the_index_and_a_changed_file_rebuilds(tmp_path: Path, _cache: Path) -> None:
    m = _manifest(tmp_path, 50)
    cfg = CaptionSetConfig(path=str(m), key_column="key")
    first = index_caption_set(cfg)
    built = (first.directory / "meta.json").stat().st_mtime_ns
    second = index_caption_set(cfg)
    assert second.directory == first.directory
    assert (second.directory / "meta.json").stat().st_mtime_ns == built  # not rewritten
    assert len(list((_cache / "index").iterdir())) == 1
    # Other reader settings -> another index; another file content -> another index.
    index_caption_set(CaptionSetConfig(path=str(m), key_column=""))
    with open(m, "a") as f:
        f.write(json.dumps({"image": "a.png", "key": "new", "short_captions": ["x"]}) + "\n")
    assert len(index_caption_set(cfg)) == 51
    assert len(list((_cache / "index").iterdir())) == 3
    ident = file_stamp(m)
    assert set(ident) == {"path", "size", "mtime_ns", "sample_sha256"}


def test_records_are_built_on_access_and_hold_no_python_memory_per_record(tmp_path: Path) -> None:
    m = _manifest(tmp_path, 20000)
    cfg = CaptionSetConfig(path=str(m), key_column="key")
    index_caption_set(cfg)  # build once
    tracemalloc.start()
    cs = load_caption_set(cfg)
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(cs) == 20000 and cs[12345].key == "k12345" and cs[12345].short == ["cap 12345"]
    assert cs[-1].source.endswith("m.jsonl:20000")
    # Python objects of a loaded set: a fixed amount, far below one byte per record.
    assert current < 20000, current
    # Picklable (DataLoader workers under spawn) without copying the records.
    again = pickle.loads(pickle.dumps(cs.records))
    assert again[7].key == "k7" and len(pickle.dumps(cs.records)) < 2000


def test_shard_index_reads_no_image_bytes_and_serves_them_by_seek(tmp_path: Path) -> None:
    shard = tmp_path / "s-000.tar"
    images = {}
    with tarfile.open(shard, "w") as tar:
        for i in range(5):
            buf = io.BytesIO()
            Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(buf, format="PNG")
            images[f"k{i}"] = buf.getvalue()
            for name, data in (
                (f"k{i}.png", buf.getvalue()),
                (f"k{i}.json", json.dumps({"short_captions": [f"c{i}"]}).encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    index = index_caption_set(CaptionSetConfig(path=str(shard)))
    assert index.bytes_on_disk() < shard.stat().st_size  # no image bytes in the index
    assert [index[i].image for i in range(5)] == [images[f"k{i}"] for i in range(5)]
    assert index[3].source.endswith("s-000.tar:k3") and index[3].short == ["c3"]


def test_max_images_counts_only_the_bad_records_before_the_cut(tmp_path: Path) -> None:
    m = _manifest(tmp_path, 10)
    lines = m.read_text().splitlines()
    lines.insert(8, "{broken")
    m.write_text("\n".join(lines) + "\n")
    cs = load_caption_set(CaptionSetConfig(path=str(m), key_column="key", max_images=5))
    assert len(cs) == 5 and not cs.skipped  # the broken line 9 is never reached
    from llm2clip_vlm.data import DataError

    with pytest.raises(DataError, match=r"m\.jsonl:9: broken JSON line"):
        load_caption_set(CaptionSetConfig(path=str(m), key_column="key", max_images=9))


def test_repeated_keys_are_bad_rows_of_the_index(tmp_path: Path) -> None:
    m = _manifest(tmp_path, 10)  # every record names a.png: without key_column the key repeats
    index = index_caption_set(CaptionSetConfig(path=str(m)))
    assert len(index) == 1
    bad = index.bad()
    assert [b.position for b in bad] == list(range(1, 10))
    assert bad[0].reason == f"{m}:2: duplicate key 'a.png' (first at {m}:1)"
    from llm2clip_vlm.data import DataError

    with pytest.raises(DataError, match=r"m\.jsonl:2: duplicate key 'a\.png' \(first at .*m\.jsonl:1\)"):
        load_caption_set(CaptionSetConfig(path=str(m)))
    cs = load_caption_set(CaptionSetConfig(path=str(m), max_images=1))  # no repeat before the cut
    assert len(cs) == 1 and not cs.skipped
    cs = load_caption_set(CaptionSetConfig(path=str(m)), skip_bad=True, max_bad_fraction=0.95)
    assert len(cs) == 1 and len(cs.skipped) == 9


def test_embedding_reads_captions_of_shards_without_image_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llm2clip_vlm.data.captions import caption_counts
    from llm2clip_vlm.data.index import RecordIndex
    from llm2clip_vlm.data.records import keep_captions
    from llm2clip_vlm.store import format as fmt

    shard = tmp_path / "s-000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(6):
            caps = {"short_captions": [f"s{i}", f"t{i}"], "long_captions": [f"long {i}"]}
            for name, data in ((f"k{i}.jpg", b"x" * 100), (f"k{i}.json", json.dumps(caps).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    records = keep_captions(load_caption_set(CaptionSetConfig(path=str(shard))), 1)

    def no_bytes(self: RecordIndex, i: int) -> bytes:
        raise AssertionError("an image was read")

    monkeypatch.setattr(RecordIndex, "read_image", no_bytes)
    table = fmt.caption_table(records)
    assert table.num_rows == 12 and table.texts[2:5] == ["s1", "long 1", "s2"]
    assert caption_counts(records).tolist() == [2] * 6
    assert (
        caption_counts(keep_captions(load_caption_set(CaptionSetConfig(path=str(shard))), 0)).tolist()
        == [3] * 6
    )


def test_image_paths_match_the_general_resolver(tmp_path: Path) -> None:
    from llm2clip_vlm.data.captions import DataError, ImagePaths, safe_image_path

    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(b"x")
    (tmp_path / "outside.png").write_bytes(b"x")
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    (root / "inlink.png").symlink_to(root / "sub" / "a.png")
    (root / "dirlink").symlink_to(tmp_path)
    resolve = ImagePaths(root)
    for rel in ("sub/a.png", "sub/../sub/a.png", "inlink.png", "missing.png", "sub/.."):
        path, is_file = resolve(rel, "m:1")
        assert path == safe_image_path(root, rel, "m:1") and is_file == path.is_file(), rel
    for rel in ("../outside.png", "link.png", "dirlink/outside.png", "/etc/passwd"):
        with pytest.raises(DataError, match="leaves the image root"):
            resolve(rel, "m:1")
