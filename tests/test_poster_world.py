"""The third synthetic world (issue 28: tilted, jittered glyphs on saturated striped/checkered
grounds): formats, determinism, and that the pictures show what the captions say."""

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
from llm2clip_vlm.data.synthetic_posters import (
    COLOURS,
    GROUNDS,
    SIZES,
    Poster,
    PosterGlyph,
    draw_poster,
    long_poster_captions,
    write_poster_dataset,
)


@pytest.fixture(scope="module")
def posters(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("posters") / "w"
    write_poster_dataset(out, seed=3, train_images=60, heldout_images=20)
    return out


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_poster_world_is_deterministic_and_in_the_glyph_world_formats(posters: Path, tmp_path: Path) -> None:
    write_poster_dataset(tmp_path / "again", seed=3, train_images=60, heldout_images=20)
    assert _digest(tmp_path / "again") == _digest(posters)
    info = json.loads((posters / "dataset.json").read_text())
    assert info["world"] == "posters" and info["splits"] == {"train": 60, "heldout": 20}
    train = load_caption_set(CaptionSetConfig(path=str(posters / "train.jsonl")), name="train")
    shards = load_caption_set(CaptionSetConfig(path=str(posters / "shards")), name="shards")
    assert len(train) == len(shards) == 60
    held = load_caption_set(CaptionSetConfig(path=str(posters / "heldout.jsonl")), name="heldout")
    for r in [*train, *held]:
        assert len(r.of_kind("short")) == 2 and len(r.of_kind("long")) == 2  # type: ignore[arg-type]
        assert Image.open(r.image).size == (96, 96)


def test_the_world_has_the_described_variety(posters: Path) -> None:
    rows = [json.loads(line) for line in (posters / "train.jsonl").read_text().splitlines()]
    long = " ".join(c for r in rows for c in r["long_captions"])
    assert len(COLOURS) >= 12 and all(s in long for s in SIZES)
    assert "tilted" in long and "upright" in long
    for ground in ("plain", "horizontal stripes", "vertical stripes", "diagonal stripes", "checkered"):
        assert ground in long
    # Short captions name glyphs only; long ones every glyph's colour, size, cell and tilt.
    first = rows[0]
    assert not any(c in first["short_captions"][0] for c in COLOURS)
    n = first["long_captions"][0].count(" cell, ")
    assert n == len(first["short_captions"][1].split(", ")) and 1 <= n <= 3


def test_posters_are_drawn_as_described() -> None:
    g = PosterGlyph("A", "blue", "large", cell=0, tilt=0, dx=0.0, dy=0.0)
    plain = np.asarray(draw_poster(Poster("plain", ("yellow", "red"), 6, (g,)), 96)).astype(int)
    ink = (
        (np.abs(plain - np.array(COLOURS["yellow"])).sum(axis=2) > 90).reshape(3, 32, 3, 32).sum(axis=(1, 3))
    )
    assert ink[0, 0] > 40 and ink.sum() == ink[0, 0]  # the glyph in its cell, nothing elsewhere
    # Tilting and jitter move the ink; the grounds differ in the direction of their stripes.
    tilted = np.asarray(
        draw_poster(Poster("plain", ("yellow", "red"), 6, (g.__class__(**{**g.__dict__, "tilt": 30}),)), 96)
    )
    moved = np.asarray(
        draw_poster(Poster("plain", ("yellow", "red"), 6, (g.__class__(**{**g.__dict__, "dx": 1.0}),)), 96)
    )
    assert (tilted != plain).any() and (moved != plain).any()
    grounds = {
        k: np.asarray(draw_poster(Poster(k, ("yellow", "red"), 6, ()), 96)).astype(int) for k in GROUNDS
    }
    assert grounds["plain"].std(axis=(0, 1)).max() == 0
    h, v = grounds["horizontal stripes"], grounds["vertical stripes"]

    def spread(line: np.ndarray) -> float:  # over the pixels of a line, per channel
        return float(line.std(axis=0).max())

    assert spread(h[:, 48]) > 20 and spread(h[48, :]) == 0 and spread(v[48, :]) > 20 and spread(v[:, 48]) == 0
    assert spread(grounds["diagonal stripes"][:, 48]) > 20 and spread(grounds["diagonal stripes"][48, :]) > 20
    assert spread(grounds["checks"][48, :]) > 20 and spread(grounds["checks"][:, 48]) > 20


def test_long_captions_state_the_tilt_and_the_ground() -> None:
    import random

    g = PosterGlyph("7", "rose", "small", cell=4, tilt=-20, dx=0.0, dy=0.0)
    text = long_poster_captions(Poster("checks", ("lime", "azure"), 8, (g,)), random.Random(0))
    assert "the digit 7 is small, rose and tilted 20 degrees to the right" in text[0]
    assert "checkered in lime and azure" in text[0] and "at the centre" in text[1]


def test_demo_data_writes_the_poster_world(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "demo-data",
            str(tmp_path / "p"),
            "--world",
            "posters",
            "--train-images",
            "5",
            "--heldout-images",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "p" / "dataset.json").read_text())["world"] == "posters"
    bad = CliRunner().invoke(app, ["demo-data", str(tmp_path / "q"), "--world", "nope"])
    assert bad.exit_code == 2 and "posters" in bad.output
