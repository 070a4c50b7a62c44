"""The second synthetic world (letters and digits on patterned grounds): formats and content."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from llm2clip_vlm.cli import app
from llm2clip_vlm.data import load_caption_set
from llm2clip_vlm.data.config import CaptionSetConfig
from llm2clip_vlm.data.synthetic_glyphs import (
    FAMILY_SIZE,
    Glyph,
    GlyphScene,
    draw_glyph_scene,
    write_glyph_dataset,
)


@pytest.fixture(scope="module")
def glyphs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("glyphs") / "w"
    write_glyph_dataset(out, seed=1, train_images=40, heldout_images=24)
    return out


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_glyph_world_is_deterministic_and_in_the_demo_formats(glyphs: Path, tmp_path: Path) -> None:
    write_glyph_dataset(tmp_path / "again", seed=1, train_images=40, heldout_images=24)
    assert _digest(tmp_path / "again") == _digest(glyphs)
    info = json.loads((glyphs / "dataset.json").read_text())
    assert info["world"] == "glyphs" and info["splits"] == {"train": 40, "heldout": 24}
    train = load_caption_set(CaptionSetConfig(path=str(glyphs / "train.jsonl")), name="train")
    shards = load_caption_set(CaptionSetConfig(path=str(glyphs / "shards")), name="shards")
    assert len(train) == len(shards) == 40
    held = load_caption_set(
        CaptionSetConfig(path=str(glyphs / "heldout.jsonl"), caption_columns={"short_captions": "short"}),
        name="heldout",
    )
    for r in [*train, *held]:
        assert len(r.of_kind("short")) == 2  # type: ignore[arg-type]
        assert Image.open(r.image).size == (96, 96)
    long = [c.text for r in train for c in r.captions if c.kind == "long"]
    assert len(long) == 80 and all("background" in t for t in long)


def test_glyphs_are_drawn_where_the_captions_say(glyphs: Path) -> None:
    scene = GlyphScene("plain", "white", (Glyph("A", "black", 0), Glyph("7", "red", 8)))
    img = np.asarray(draw_glyph_scene(scene, 96)).astype(int)
    ink = (np.abs(img - np.array([245, 245, 240])).sum(axis=2) > 60).reshape(3, 32, 3, 32).sum(axis=(1, 3))
    assert ink[0, 0] > 20 and ink[2, 2] > 20 and ink.sum() == ink[0, 0] + ink[2, 2]
    # Different glyphs in the same cell look different; patterns change the ground.
    other = np.asarray(draw_glyph_scene(GlyphScene("plain", "white", (Glyph("B", "black", 0),)), 96))
    assert (np.asarray(draw_glyph_scene(GlyphScene("plain", "white", scene.glyphs[:1]), 96)) != other).any()
    striped = np.asarray(draw_glyph_scene(GlyphScene("striped", "white", ()), 96)).astype(int)
    assert (
        striped[:, 48].std() > 10
        and np.asarray(draw_glyph_scene(GlyphScene("plain", "white", ()), 96)).std(axis=(0, 1)).max() == 0
    )


def test_heldout_families_differ_in_what_short_captions_say(glyphs: Path) -> None:
    rows = [json.loads(line) for line in (glyphs / "heldout.jsonl").read_text().splitlines()]
    captions = [c for r in rows for c in r["short_captions"]]
    assert len(set(captions)) == len(captions)  # no caption fits two images
    # Families of near-duplicates share most words with their neighbours.
    words = [set(r["short_captions"][0].replace(",", " ").split()) for r in rows]
    shared = [len(words[i] & words[i + 1]) / len(words[i] | words[i + 1]) for i in range(0, FAMILY_SIZE - 1)]
    assert max(shared) > 0.3


def test_demo_data_command_writes_the_glyph_world(tmp_path: Path) -> None:
    args = [
        "demo-data",
        str(tmp_path / "g"),
        "--world",
        "glyphs",
        "--train-images",
        "8",
        "--heldout-images",
        "4",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "g" / "images" / "train" / "train-000000.png").size == (96, 96)
    bad = CliRunner().invoke(app, ["demo-data", str(tmp_path / "x"), "--world", "trees"])
    assert bad.exit_code == 2 and "--world must be one of shapes, glyphs, posters" in bad.output
