"""The data layer: the synthetic world, every reader format, and the bad-record policy."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from llm2clip_vlm.data import DataError, load_caption_set, open_image, resolve_data
from llm2clip_vlm.data.config import CaptionSetConfig, DataConfig
from llm2clip_vlm.data.synthetic import write_demo_dataset
from llm2clip_vlm.data.text_corpus import load_text_corpus


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    write_demo_dataset(out, seed=3, train_images=120, heldout_images=80, show_progress=False)
    return out


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_demo_world_is_deterministic_per_seed(tmp_path: Path) -> None:
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        write_demo_dataset(tmp_path / name, seed=seed, train_images=20, heldout_images=8, show_progress=False)
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")
    assert _tree_digest(tmp_path / "a") != _tree_digest(tmp_path / "c")


def test_demo_splits_counts_and_formats(demo: Path) -> None:
    train, heldout = resolve_data(
        DataConfig(demo_dir=str(demo), demo_seed=3, demo_train_images=120, demo_heldout_images=80), demo
    )
    assert len(train) == 120 and set(heldout) == {"short", "long"}
    assert all(len(r.short) == 3 and len(r.long) == 2 for r in train)
    assert all(len(r.short) == 3 and not r.long for r in heldout["short"])
    assert all(len(r.long) == 1 and not r.short for r in heldout["long"])  # 1:1 long set
    img = open_image(train[0])
    assert img.mode == "RGB" and img.size == (64, 64)
    # The webdataset shards hold the same training records as the manifest.
    wds = load_caption_set(CaptionSetConfig(path=str(demo / "shards")))
    assert [r.key for r in wds] == [r.key for r in train]
    assert [r.captions for r in wds] == [r.captions for r in train]
    assert open_image(wds[5]).tobytes() == open_image(train[5]).tobytes()


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def test_long_captions_carry_details_short_ones_lack(demo: Path) -> None:
    train = load_caption_set(CaptionSetConfig(path=str(demo / "train.jsonl")))
    details = {"small", "large", "background", "white", "black", "gray", "beige"}
    for r in train:
        assert not any(details & _words(s) for s in r.short)
        assert all(details & _words(long) for long in r.long)
        assert all(len(long) > max(len(s) for s in r.short) for long in r.long)


def _jaccard(a: str, b: str) -> float:
    wa, wb = _words(a), _words(b)
    return len(wa & wb) / len(wa | wb)


@pytest.mark.parametrize(
    ("split", "column", "kind"), [("short", "short_captions", "short"), ("long", "long_captions", "long")]
)
def test_heldout_captions_are_hard(demo: Path, split: str, column: str, kind: str) -> None:
    """Captions of different held-out images share most words (families of one-attribute changes)."""
    heldout = load_caption_set(
        CaptionSetConfig(path=str(demo / f"heldout_{split}.jsonl"), caption_columns={column: kind})
    )
    family, unrelated, same_words = [], [], 0
    for start in range(0, len(heldout), 4):  # families are aligned runs of 4 scenes
        members = [heldout[i].of_kind(kind) for i in range(start, start + 4)]
        for i in range(4):
            for j in range(i + 1, 4):
                for a, b in zip(members[i], members[j], strict=True):
                    assert a != b, f"images {start + i} and {start + j} have the same caption {a!r}"
                    family.append(_jaccard(a, b))
                    same_words += _words(a) == _words(b)
        unrelated.append(
            _jaccard(heldout[start].of_kind(kind)[0], heldout[(start + 41) % len(heldout)].of_kind(kind)[0])
        )
    mean_family = sum(family) / len(family)
    assert mean_family > 0.7, mean_family
    # Hard because of the family design, not because all captions look alike.
    assert mean_family > sum(unrelated) / len(unrelated) + 0.2
    # Swapped colours/positions: some captions of different images hold exactly the same words.
    assert same_words / len(family) > 0.05, same_words


def test_scenes_hold_one_to_four_objects(demo: Path) -> None:
    train = load_caption_set(CaptionSetConfig(path=str(demo / "train.jsonl")))
    numbers = {"one": 1, "two": 2, "three": 3, "four": 4}
    # "holds/shows N shape(s)" (not the "three by three grid" of one template).
    counts = [numbers[re.search(r"(?:holds|shows) (\w+) shapes?\b", r.long[0]).group(1)] for r in train]
    assert set(counts) == {1, 2, 3, 4}
    # Every short caption names each object once (one colour word per object).
    colours = {"red", "green", "blue", "yellow", "purple", "orange", "pink", "cyan"}
    for n, r in zip(counts, train, strict=True):
        assert all(sum(w in colours for w in re.findall(r"[a-z]+", s)) == n for s in r.short), r.short


def test_jsonl_csv_parquet_and_dreamlip_columns(tmp_path: Path) -> None:
    import pandas as pd

    for i in range(3):
        Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(tmp_path / f"{i}.jpg")
    rows = [
        {"filepath": f"{i}.jpg", "raw_caption": f"raw {i}", "shortSV_captions": f"['short {i}', 'tiny {i}']",
         "longSV_captions": json.dumps([f"a long caption number {i}"])}
        for i in range(3)
    ]  # fmt: skip
    mapping = {"raw_caption": "short", "shortSV_captions": "short", "longSV_captions": "long"}
    pd.DataFrame(rows).to_csv(tmp_path / "dreamlip.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    for name in ("dreamlip.csv", "d.parquet", "d.jsonl"):
        cs = load_caption_set(
            CaptionSetConfig(path=str(tmp_path / name), image_column="filepath", caption_columns=mapping)
        )
        assert len(cs) == 3
        assert cs[1].short == ["raw 1", "short 1", "tiny 1"] and cs[1].long == ["a long caption number 1"]
        assert cs[2].image == str((tmp_path / "2.jpg").resolve())


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        ({"image": "missing.png", "short_captions": ["x"]}, "does not exist"),
        ({"image": "../outside.png", "short_captions": ["x"]}, "leaves the image root"),
        ({"image": "ok.png", "short_captions": ["  "]}, "empty caption"),
        ({"image": "ok.png", "short_captions": [3]}, "not text"),
        ({"image": "ok.png", "short_captions": []}, "no caption"),
    ],
)
def test_bad_records_name_the_record(tmp_path: Path, bad_row: dict, message: str) -> None:
    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "img" / "ok.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    good = []  # one image each: a repeated key (here, the image path) is itself a bad record
    for i in range(19):
        Image.new("RGB", (8, 8)).save(tmp_path / "img" / f"ok{i}.png")
        good.append({"image": f"ok{i}.png", "short_captions": ["a black square"]})
    manifest = tmp_path / "img" / "m.jsonl"
    _write_jsonl(manifest, good[:9] + [bad_row] + good[9:])
    cfg = CaptionSetConfig(path=str(manifest))
    with pytest.raises(DataError, match=rf"m\.jsonl:10\b.*{message}"):
        load_caption_set(cfg)
    cs = load_caption_set(cfg, skip_bad=True, max_bad_fraction=0.1)
    assert len(cs) == 19 and len(cs.skipped) == 1 and cs.skipped[0][0].endswith("m.jsonl:10")
    with pytest.raises(DataError, match="max_bad_fraction"):
        load_caption_set(cfg, skip_bad=True, max_bad_fraction=0.01)


def test_missing_columns_and_broken_files(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "m.jsonl", [{"picture": "a.png", "short_captions": ["x"]}])
    with pytest.raises(DataError, match=r"missing column\(s\) \['image'\]"):
        load_caption_set(CaptionSetConfig(path=str(tmp_path / "m.jsonl")))
    (tmp_path / "broken.jsonl").write_text('{"image": "a.png", "short_captions": [\n')
    with pytest.raises(DataError, match=r"broken.jsonl:1: broken JSON line"):
        load_caption_set(CaptionSetConfig(path=str(tmp_path / "broken.jsonl")))
    with pytest.raises(DataError, match="does not exist"):
        load_caption_set(CaptionSetConfig(path=str(tmp_path / "nope.jsonl")))


def test_webdataset_txt_only_and_broken_image(tmp_path: Path) -> None:
    shard = tmp_path / "s-000.tar"
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 200, 0)).save(buf, format="JPEG")
    with tarfile.open(shard, "w") as tar:
        for key, data in (
            ("k1.jpg", buf.getvalue()),
            ("k1.txt", b"a green square"),
            ("k2.jpg", b"not an image"),
            ("k2.txt", b"broken"),
        ):
            info = tarfile.TarInfo(key)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    cs = load_caption_set(CaptionSetConfig(path=str(shard)))
    assert [r.key for r in cs] == ["k1", "k2"] and cs[0].short == ["a green square"]
    assert open_image(cs[0]).getpixel((4, 4))[1] > 150
    with pytest.raises(DataError, match=r"s-000\.tar:k2: cannot read image"):
        open_image(cs[1])


def test_open_image_converts_modes(tmp_path: Path) -> None:
    from llm2clip_vlm.data.records import ImageCaptions

    for mode in ("RGBA", "P", "L", "CMYK", "I;16"):
        path = tmp_path / f"x-{mode.replace(';', '')}.{'jpg' if mode == 'CMYK' else 'png'}"
        Image.new(mode, (4, 4)).save(path)
        img = open_image(ImageCaptions("k", str(path)))
        assert img.mode == "RGB" and img.size == (4, 4)


def test_text_corpus(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("first line\n\nsecond line\n")
    (tmp_path / "c" / "b.txt").write_text("third\n")
    assert load_text_corpus([str(tmp_path / "c")], min_chars=1) == ["first line", "second line", "third"]
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02")
    with pytest.raises(DataError, match="bin.txt is binary"):
        load_text_corpus([str(tmp_path / "bin.txt")])
    with pytest.raises(DataError, match="does not exist"):
        load_text_corpus([str(tmp_path / "none")])


def test_resolve_data_reuses_or_rewrites_the_demo_world(tmp_path: Path) -> None:
    cfg = DataConfig(demo_seed=5, demo_train_images=12, demo_heldout_images=8)
    train, heldout = resolve_data(cfg, tmp_path)  # default location: <output>/demo-data
    info = tmp_path / "demo-data" / "dataset.json"
    first = info.stat().st_mtime_ns
    assert len(train) == 12 and {k: len(v) for k, v in heldout.items()} == {"short": 8, "long": 8}
    again, _ = resolve_data(cfg, tmp_path)
    assert info.stat().st_mtime_ns == first  # same settings: reused, not rewritten
    assert [r.captions for r in again] == [r.captions for r in train]
    other, _ = resolve_data(DataConfig(demo_seed=6, demo_train_images=12, demo_heldout_images=8), tmp_path)
    assert json.loads(info.read_text())["seed"] == 6
    assert [r.captions for r in other] != [r.captions for r in train]


def test_brace_patterns_tsv_keys_and_broken_lists(demo: Path, tmp_path: Path) -> None:
    from llm2clip_vlm.data.captions import expand_braces

    assert expand_braces("s-{008..010}.tar") == ["s-008.tar", "s-009.tar", "s-010.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    shards = load_caption_set(CaptionSetConfig(path=str(demo / "shards" / "train-{00000..00000}.tar")))
    assert len(shards) == 120 and shards[0].source.endswith("train-00000.tar:train-000000")

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "m.tsv").write_text("id\tpath\tcap\nx7\ta.png\t['one', \"two\"]\ny8\ta.png\t['a', b c]\n")
    cfg = CaptionSetConfig(
        path=str(tmp_path / "m.tsv"), image_column="path", key_column="id", caption_columns={"cap": "long"}
    )
    with pytest.raises(DataError, match=r"m\.tsv:3 column 'cap': caption list .* cannot be parsed"):
        load_caption_set(cfg)
    cs = load_caption_set(cfg, skip_bad=True, max_bad_fraction=0.5)
    assert [(r.key, r.long) for r in cs] == [("x7", ["one", "two"])] and cs[0].source.endswith("m.tsv:2")


def test_demo_data_command(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from llm2clip_vlm.cli import app

    result = CliRunner().invoke(
        app,
        [
            "demo-data",
            str(tmp_path / "d"),
            "--seed",
            "4",
            "--train-images",
            "10",
            "--heldout-images",
            "8",
            "--image-size",
            "32",
        ],
    )
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "d" / "dataset.json").read_text())
    assert info["splits"] == {"train": 10, "heldout_short": 8, "heldout_long": 8} and info["seed"] == 4
    assert Image.open(tmp_path / "d" / "images" / "train" / "train-000003.png").size == (32, 32)
