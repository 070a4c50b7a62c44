"""Shards as the field's tools write them: img2dataset's webdataset and ``files`` output, LLM2CLIP's
side-cars beside the shards, members scattered by a plain ``tar cf``, and damaged shards.

Replicas are built from the tools' own source (see ``tests/img2dataset_replica.py``):
rom1504/img2dataset ``img2dataset/writer.py`` + ``img2dataset/downloader.py`` + ``img2dataset/logger.py``,
microsoft/LLM2CLIP ``llm2clip/data/download_dataset.sh`` + ``llm2clip/data/extract_embedding.py``.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from img2dataset_replica import (
    CAPTION_COLUMNS,
    samples,
    solid_images,
    write_img2dataset,
    write_sidecars,
)

from llm2clip_vlm.data.captions import load_caption_set, open_image
from llm2clip_vlm.data.config import CaptionSetConfig
from llm2clip_vlm.data.errors import BadRecords, DataError


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM2CLIP_VLM_CACHE", str(tmp_path / "cache"))


def _cfg(path: Path | str, **kw) -> CaptionSetConfig:
    return CaptionSetConfig(path=str(path), caption_columns=dict(CAPTION_COLUMNS), **kw)


def test_a_folder_of_shards_with_sidecars_reads_the_image_shards_only(tmp_path: Path) -> None:
    items = samples(solid_images(10))
    shards = write_img2dataset(tmp_path / "cc3m", items, per_shard=4, failed_every=5)
    write_sidecars(shards, dim=16)
    assert len(list((tmp_path / "cc3m").glob("*_text_embeddings.tar"))) == 3
    for path in [tmp_path / "cc3m", tmp_path / "cc3m" / "*.tar", tmp_path / "cc3m" / "{00000..00002}.tar"]:
        cs = load_caption_set(_cfg(path))
        # 10 samples, every 5th failed to download (no files): 8 records, none from a side-car.
        assert len(cs) == 8 and not cs.skipped
        assert all(".tar:" in r.source and "_text_embeddings" not in r.source for r in cs)
    first = cs[0]
    assert first.key == "000000"  # compute_key: 10**1 * shard 0 + 0, 6 digits
    assert first.short == ["short SV caption of image 0"] and first.long[0].startswith("long SV caption")
    assert open_image(first).size == (32, 32)
    # A glob over side-cars only names what it found.
    with pytest.raises(DataError, match=r"no webdataset \.tar shards found \(only 3 LLM2CLIP side-car"):
        load_caption_set(_cfg(tmp_path / "cc3m" / "*_text_embeddings.tar"))


def test_the_raw_caption_of_the_txt_member_reads_as_a_short_caption(tmp_path: Path) -> None:
    write_img2dataset(tmp_path / "d", samples(solid_images(3)), per_shard=4)
    cs = load_caption_set(CaptionSetConfig(path=str(tmp_path / "d"), caption_columns={"caption": "short"}))
    assert [r.short for r in cs] == [["raw caption 0"], ["raw caption 1"], ["raw caption 2"]]


def test_files_output_reads_as_a_caption_set(tmp_path: Path) -> None:
    items = samples(solid_images(7, seed=1))
    write_img2dataset(tmp_path / "files", items, per_shard=4, output_format="files", failed_every=3)
    assert (tmp_path / "files" / "00000" / "000000.jpg").is_file()
    cs = load_caption_set(_cfg(tmp_path / "files"))
    assert len(cs) == 5 and [r.key for r in cs] == ["000000", "000001", "000003", "000010", "000012"]
    assert cs[2].short == ["short SV caption of image 3"]
    assert isinstance(cs[2].image, str) and cs[2].image.endswith("00000/000003.jpg")
    assert np.asarray(open_image(cs[0])).shape == (32, 32, 3)
    # The same records as the webdataset output of the same samples.
    write_img2dataset(tmp_path / "wds", items, per_shard=4, failed_every=3)
    wds = load_caption_set(_cfg(tmp_path / "wds"))
    assert [(r.key, r.captions) for r in wds] == [(r.key, r.captions) for r in cs]


def _scattered_tar(path: Path, folder: str, files: dict[str, bytes]) -> None:
    """A tar whose members are in the order a plain ``tar cf`` of nested folders may store them
    (directory order, here: all images, then all JSON, then all text)."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for d in [folder, *(f"{folder}/{sub}" for sub in ("a",))]:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for ext in ("jpg", "json", "txt"):
            for name in sorted(files):
                if name.endswith("." + ext):
                    info = tarfile.TarInfo(f"{folder}/{name}")
                    info.size = len(files[name])
                    tar.addfile(info, io.BytesIO(files[name]))


def test_members_of_a_key_are_grouped_when_they_are_not_adjacent(tmp_path: Path) -> None:
    # The files output tarred by hand: `tar cf shard.tar 00000/` stores files in directory order.
    write_img2dataset(tmp_path / "files", samples(solid_images(4)), per_shard=4, output_format="files")
    files = {p.name: p.read_bytes() for p in (tmp_path / "files" / "00000").iterdir()}
    (tmp_path / "tarred").mkdir()
    _scattered_tar(tmp_path / "tarred" / "shard.tar", "00000", files)
    with tarfile.open(tmp_path / "tarred" / "shard.tar") as t:
        names = [m.name for m in t if m.isfile()]
    assert names[:2] == ["00000/000000.jpg", "00000/000001.jpg"]  # a key's members apart
    cs = load_caption_set(_cfg(tmp_path / "tarred"))
    assert [r.key for r in cs] == [f"00000/00000{i}" for i in range(4)]
    assert cs[3].short == ["short SV caption of image 3"] and open_image(cs[3]).size == (32, 32)


@pytest.fixture()
def one_shard(tmp_path: Path) -> Path:
    """One img2dataset shard of 8 samples and its stats file, in a folder of its own."""
    write_img2dataset(tmp_path / "d", samples(solid_images(8)), per_shard=8)
    return tmp_path / "d" / "00000.tar"


def _members(shard: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(shard) as t:
        return t.getmembers()


def test_a_truncated_shard_is_named_or_its_readable_records_kept(
    one_shard: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    members = _members(one_shard)
    data = one_shard.read_bytes()
    # img2dataset killed while writing the 6th sample's image (members: jpg, json, txt per key).
    cut = members[15].offset_data + members[15].size // 2
    one_shard.write_bytes(data[:cut])
    with pytest.raises(DataError) as e:
        load_caption_set(_cfg(one_shard.parent))
    line = str(e.value)
    assert "\n" not in line and str(one_shard) in line and "cut off" in line and "damaged" in line
    assert "data.skip_bad" in line
    cs = load_caption_set(_cfg(one_shard.parent), skip_bad=True, max_bad_fraction=0.5)
    # 5 whole records kept; the stats file says 8 were written: 3 counted bad, none dropped silently.
    assert [r.key for r in cs] == [f"00000{i}" for i in range(5)] and len(cs.skipped) == 3
    assert all(str(one_shard) in reason for _, reason in cs.skipped)
    # Without the stats file the lost tail still counts (as one bad record).
    one_shard.with_name("00000_stats.json").unlink()
    monkeypatch.setenv("LLM2CLIP_VLM_CACHE", str(one_shard.parent / "other-cache"))
    cs = load_caption_set(_cfg(one_shard.parent), skip_bad=True, max_bad_fraction=0.5)
    assert len(cs) == 5 and len(cs.skipped) == 1


@pytest.mark.parametrize("cut", ["after a whole sample", "inside a header"])
def test_a_shard_cut_between_members_is_not_taken_for_a_shorter_one(one_shard: Path, cut: str) -> None:
    members = _members(one_shard)
    end_of_sample_3 = members[8].offset_data + -(-members[8].size // 512) * 512
    at = end_of_sample_3 if cut == "after a whole sample" else end_of_sample_3 + 200
    one_shard.write_bytes(one_shard.read_bytes()[:at])
    with pytest.raises(DataError, match=r"00000\.tar: .*damaged"):
        load_caption_set(_cfg(one_shard.parent))
    cs = load_caption_set(_cfg(one_shard.parent), skip_bad=True, max_bad_fraction=0.9)
    # The sample at the cut may lack members: it belongs to the lost tail.
    assert len(cs) + len(cs.skipped) == 8 and len(cs) >= 2


@pytest.mark.parametrize("member", [1, 4, 9, 13])
@pytest.mark.parametrize("at", [0, 100, 124, 148, 257, 345])
def test_flipped_bytes_in_a_member_header_name_the_shard(one_shard: Path, member: int, at: int) -> None:
    header = _members(one_shard)[member].offset
    data = bytearray(one_shard.read_bytes())
    data[header + at : header + at + 8] = bytes(b ^ 0xFF for b in data[header + at : header + at + 8])
    one_shard.write_bytes(bytes(data))
    with pytest.raises(DataError) as e:
        load_caption_set(_cfg(one_shard.parent))
    assert "\n" not in str(e.value) and str(one_shard) in str(e.value) and "bug" not in str(e.value)
    cs = load_caption_set(_cfg(one_shard.parent), skip_bad=True, max_bad_fraction=1.0)
    assert len(cs) + len(cs.skipped) >= 8 - 1  # every record is kept or counted


def test_garbage_named_tar_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "00000.tar").write_bytes(b"PAR1" + bytes(range(256)) * 8)
    with pytest.raises(DataError, match=r"00000\.tar: no readable tar header"):
        load_caption_set(_cfg(tmp_path / "d"))


def test_stats_counts_are_read_from_img2dataset_stats(one_shard: Path) -> None:
    stats = json.loads(one_shard.with_name("00000_stats.json").read_text())
    assert stats["successes"] == 8 and stats["count"] == 8


# ----------------------------------------------------------------------------------------------
# Side-cars offered to stage 2
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from store_driver import make_encoder_dir

    return make_encoder_dir(tmp_path_factory.mktemp("sidecar-encoder"))


def _stage2(folder: Path, store: Path, encoder: Path, out: Path) -> dict:
    from fault_driver import stage2_cfg

    from llm2clip_vlm.commands import run_stage2

    cfg = stage2_cfg([
        f"data.train.path={folder}", "data.train.caption_columns={shortSV_captions: short, longSV_captions: long}",
        "stage2.loop.max_steps=2", "stage2.batch_size=4",
    ])  # fmt: skip
    return run_stage2(cfg, out, store_dir=store, encoder_dir=encoder)


def test_sidecars_the_encoder_reproduces_become_the_stage2_store(
    tmp_path: Path, tiny_encoder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from llm2clip_vlm.store.store import EmbeddingStore
    from llm2clip_vlm.text.encoder import CaptionEncoder, encoder_identity

    enc = CaptionEncoder.from_pretrained(tiny_encoder)
    shards = write_img2dataset(tmp_path / "cc3m", samples(solid_images(12)), per_shard=4)
    write_sidecars(shards, enc.hidden_size, encode=lambda texts: enc.encode(texts).numpy())
    caplog.set_level("INFO")
    metrics = _stage2(tmp_path / "cc3m", tmp_path / "store", tiny_encoder, tmp_path / "s2")
    lines = [r.getMessage() for r in caplog.records if "LLM2CLIP side-cars" in r.getMessage()]
    assert len(lines) == 1 and "3 side-cars" in lines[0] and "imported as the stage-2 store" in lines[0]
    store = EmbeddingStore.open(tmp_path / "store" / "train")
    assert store.num_images == 12 and store.encoder_identity == encoder_identity(tiny_encoder)
    assert metrics["train"]["steps"] == 2


def test_sidecars_of_another_model_are_ignored_in_one_line(
    tmp_path: Path, tiny_encoder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from llm2clip_vlm.imports.sidecar import offer_sidecars
    from llm2clip_vlm.text.encoder import read_encoder_meta

    dim = int(read_encoder_meta(tiny_encoder)["dim"])
    shards = write_img2dataset(tmp_path / "a", samples(solid_images(4)), per_shard=4)
    write_sidecars(shards, dim)  # the same width, other vectors
    train = _cfg(tmp_path / "a")
    assert offer_sidecars(train, tmp_path / "store", tiny_encoder) is None
    shards = write_img2dataset(tmp_path / "b", samples(solid_images(4)), per_shard=4)
    write_sidecars(shards, dim + 8)
    assert offer_sidecars(_cfg(tmp_path / "b"), tmp_path / "store", tiny_encoder) is None
    no_columns = CaptionSetConfig(path=str(tmp_path / "b"))
    assert offer_sidecars(no_columns, tmp_path / "store", tiny_encoder) is None
    lines = [r.getMessage() for r in caplog.records if "LLM2CLIP side-cars" in r.getMessage()]
    assert len(lines) == 3 and all("ignored" in line for line in lines)
    assert "does not reproduce them" in lines[0]
    assert f"they are {dim + 8}-d and the encoder" in lines[1]
    assert "set data.train.caption_columns to {shortSV_captions: short, longSV_captions: long}" in lines[2]
    assert not (tmp_path / "store").exists()


def test_a_truncated_llava_shard_is_named_or_its_readable_records_kept(tmp_path: Path) -> None:
    from llm2clip_vlm.data.conversations import load_llava_records
    from llm2clip_vlm.data.llava_shards import write_llava_shards
    from llm2clip_vlm.data.synthetic_llava import write_llava_demo

    write_llava_demo(
        tmp_path / "llava", pretrain_images=8, instruct_images=2, heldout_images=2, image_size=16
    )
    records = load_llava_records(tmp_path / "llava" / "llava_pretrain.json")
    (shard,) = write_llava_shards(records, tmp_path / "shards", per_shard=8)
    members = _members(shard)
    shard.write_bytes(shard.read_bytes()[: members[9].offset_data + 10])  # inside sample 4's image
    with pytest.raises(DataError) as e:
        load_llava_records(tmp_path / "shards")
    assert "\n" not in str(e.value) and "llava-000000.tar" in str(e.value) and "cut off" in str(e.value)
    bad = BadRecords(True, 0.5, name="shards")
    kept = load_llava_records(tmp_path / "shards", skip_bad=True, max_bad_fraction=0.5, bad=bad)
    # 4 whole samples kept; llava-shards.json says the shard held 8: the other 4 count as bad.
    assert [r.id for r in kept] == [r.id for r in records][:4] and len(bad.skipped) == 4


def _main(args: list[str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    """The console script's entry point (``llm2clip_vlm.cli.main``: its one-line error handling
    included), in this process: ``(exit status, stderr)``."""
    import sys

    from llm2clip_vlm.cli import main

    monkeypatch.setattr(sys, "argv", ["llm2clip-vlm", *args])
    monkeypatch.setenv("COLUMNS", "250")
    with pytest.raises(SystemExit) as e:
        main()
    return int(e.value.code or 0), capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncated mid-member", "8 flipped header bytes"])
def test_the_cli_names_a_damaged_shard_and_counts_its_loss(
    tmp_path: Path,
    tiny_encoder: Path,
    damage: str,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Issue 27 item 4, through the console entry point: no exit 0 with fewer records and no word,
    # no "this is a bug"; under skip_bad the readable records are embedded and the loss reported.
    shards = write_img2dataset(tmp_path / "d", samples(solid_images(16)), per_shard=8)
    members = _members(shards[1])
    data = bytearray(shards[1].read_bytes())
    if damage == "truncated mid-member":
        data = data[: members[10].offset_data + 100]
    else:
        at = members[6].offset + 100
        data[at : at + 8] = bytes(b ^ 0xFF for b in data[at : at + 8])
    shards[1].write_bytes(bytes(data))
    base = [
        "embed", "-o", str(tmp_path / "store"), "--set", f"embed.encoder={tiny_encoder}",
        "--set", f"data.train.path={tmp_path / 'd'}",
        "--set", "data.train.caption_columns={shortSV_captions: short, longSV_captions: long}",
    ]  # fmt: skip
    code, err = _main(base, capsys, monkeypatch)
    assert code == 1 and "Traceback" not in err and "this is a bug" not in err
    last = err.strip().splitlines()[-1]
    assert "00001.tar" in last and "damaged" in last and "data.skip_bad=true" in last
    skip = ["--set", "data.skip_bad=true", "--set", "data.max_bad_fraction=0.5"]
    code, err = _main(base + skip, capsys, monkeypatch)
    assert code == 0, err[-2000:]
    report = json.loads((tmp_path / "store" / "bad_records.json").read_text())["train"]
    kept = 8 + (3 if damage == "truncated mid-member" else 1)  # the sample at the damage is lost too
    assert report["records"] == 16 and len(report["skipped"]) == 16 - kept
    assert any("bad records skipped" in r.getMessage() for r in caplog.records)
