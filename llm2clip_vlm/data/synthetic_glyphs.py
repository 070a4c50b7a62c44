"""A second synthetic world, different in kind from the demo world: glyphs on patterned grounds.

The demo world (:mod:`llm2clip_vlm.data.synthetic`) draws coloured geometric shapes on plain
backgrounds at 64 px. This one draws 1-4 **letters and digits** (outlines, not filled areas: what
tells "B" from "8" is a few pixels) in a 3x3 grid at 96 px, in one of four ink colours, over a
**plain, striped or checkered** background in one of three tints. It checks that the demo's
stage 2 learns what an image shows rather than fitting one drawing style.

- Short captions name each glyph and its cell ("the letter K at the top left and the digit 7 in
  the centre"); long captions add the ink colours, the background pattern and tint, and counts of
  letters and digits.
- Half of the held-out images come in families of 4 that differ in exactly one glyph, one cell
  or the count (what short captions say, so no two images share a caption), so word overlap
  alone does not solve retrieval.

Written in the demo world's on-disk formats (``docs/DATA.md``): ``images/<split>/<key>.png``,
``<split>.jsonl`` (``key``, ``image``, ``short_captions``, ``long_captions``), webdataset shards of
the training split, ``dataset.json``. Splits: ``train`` and ``heldout`` (2 short + 2 long captions
per image in both). Deterministic per seed.
"""

from __future__ import annotations

import json
import random
import string
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from llm2clip_vlm.data.synthetic import (
    NUMBER_WORDS,
    POSITIONS,
    SUPERSAMPLE,
    add_tar_member,
    indefinite_article,
    png_bytes,
)

GLYPHS = tuple(string.ascii_uppercase + string.digits)
INKS = {"black": (25, 25, 25), "red": (200, 30, 30), "blue": (30, 60, 200), "green": (20, 130, 40)}
TINTS = {"white": (245, 245, 240), "yellow": (240, 225, 150), "grey": (185, 185, 185)}
PATTERNS = ("plain", "striped", "checkered")
MAX_GLYPHS = 4
FAMILY_SIZE = 4
TRAIN_SHARD_SIZE = 1000
CAPTIONS_PER_KIND = 2


@dataclass(frozen=True)
class Glyph:
    char: str
    ink: str
    cell: int  # index into POSITIONS


@dataclass(frozen=True)
class GlyphScene:
    pattern: str
    tint: str
    glyphs: tuple[Glyph, ...]


def _name(char: str) -> str:
    return f"the digit {char}" if char.isdigit() else f"the letter {char}"


def random_glyph_scene(rng: random.Random) -> GlyphScene:
    cells = rng.sample(range(len(POSITIONS)), rng.randint(1, MAX_GLYPHS))
    glyphs = tuple(Glyph(rng.choice(GLYPHS), rng.choice(list(INKS)), c) for c in cells)
    return GlyphScene(rng.choice(PATTERNS), rng.choice(list(TINTS)), glyphs)


def vary_glyph_scene(scene: GlyphScene, rng: random.Random) -> GlyphScene:
    """A copy of ``scene`` with exactly one glyph, one glyph's cell, or the count changed."""
    glyphs = list(scene.glyphs)
    free = [c for c in range(len(POSITIONS)) if c not in {g.cell for g in glyphs}]
    i = rng.randrange(len(glyphs))
    what = rng.choice(("glyph", "glyph", "cell", "count"))
    if what == "glyph":
        glyphs[i] = replace(glyphs[i], char=rng.choice([c for c in GLYPHS if c != glyphs[i].char]))
    elif what == "cell":
        glyphs[i] = replace(glyphs[i], cell=rng.choice(free))
    elif len(glyphs) < MAX_GLYPHS and (len(glyphs) == 1 or rng.random() < 0.5):
        glyphs.append(Glyph(rng.choice(GLYPHS), rng.choice(list(INKS)), rng.choice(free)))
    else:
        glyphs.pop(i)
    return replace(scene, glyphs=tuple(glyphs))


def _short_content(scene: GlyphScene) -> frozenset[tuple[str, int]]:
    return frozenset((g.char, g.cell) for g in scene.glyphs)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    # Pillow's bundled font at a given size (no system font needed).
    return ImageFont.load_default(size=size)


def draw_glyph_scene(scene: GlyphScene, image_size: int = 96) -> Image.Image:
    """Render ``scene`` as an RGB image of ``image_size`` x ``image_size`` pixels."""
    big = image_size * SUPERSAMPLE
    tint = TINTS[scene.tint]
    dark = tuple(int(v * 0.8) for v in tint)
    img = Image.new("RGB", (big, big), tint)
    draw = ImageDraw.Draw(img)
    stripe = big // 12
    if scene.pattern == "striped":
        for k in range(0, 12, 2):
            draw.rectangle([0, k * stripe, big, (k + 1) * stripe - 1], fill=dark)
    elif scene.pattern == "checkered":
        for r in range(12):
            for c in range(12):
                if (r + c) % 2:
                    draw.rectangle(
                        [c * stripe, r * stripe, (c + 1) * stripe - 1, (r + 1) * stripe - 1], fill=dark
                    )
    cell = big / 3
    font = _font(int(cell * 0.7))
    for g in scene.glyphs:
        row, col = divmod(g.cell, 3)
        cx, cy = (col + 0.5) * cell, (row + 0.5) * cell
        draw.text((cx, cy), g.char, fill=INKS[g.ink], font=font, anchor="mm", stroke_width=SUPERSAMPLE)
    return img.resize((image_size, image_size), Image.Resampling.BOX)


def short_glyph_captions(scene: GlyphScene, rng: random.Random, n: int) -> list[str]:
    """``n`` paraphrases naming every glyph and its cell (order shuffled)."""
    templates = (
        lambda ps: " and ".join(f"{_name(g.char)} at the {POSITIONS[g.cell]}" for g in ps),
        lambda ps: ", ".join(f"{g.char} ({POSITIONS[g.cell]})" for g in ps),
        lambda ps: "; ".join(f"{POSITIONS[g.cell]}: {_name(g.char)}" for g in ps),
        lambda ps: "characters: " + ", ".join(f"{g.char} in the {POSITIONS[g.cell]}" for g in ps),
    )
    out = []
    for t in rng.sample(range(len(templates)), n):
        glyphs = list(scene.glyphs)
        rng.shuffle(glyphs)
        out.append(templates[t](glyphs))
    return out


def long_glyph_captions(scene: GlyphScene, rng: random.Random, n: int) -> list[str]:
    """``n`` detailed descriptions: background, counts, and every glyph's ink and cell."""
    letters = sum(not g.char.isdigit() for g in scene.glyphs)
    digits = len(scene.glyphs) - letters
    counts = " and ".join(
        f"{NUMBER_WORDS[k]} {word}{'s' if k > 1 else ''}"
        for k, word in ((letters, "letter"), (digits, "digit"))
        if k
    )
    ground = f"{indefinite_article(scene.pattern)} {scene.pattern} {scene.tint} background"
    out = []
    for t in rng.sample(range(2), n):
        glyphs = list(scene.glyphs)
        rng.shuffle(glyphs)
        if t == 0:
            body = " ".join(
                f"In the {POSITIONS[g.cell]} cell, {_name(g.char)} is written in {g.ink}." for g in glyphs
            )
            out.append(f"A grid of three by three cells on {ground} holds {counts}. {body}")
        else:
            body = "; ".join(f"a {g.ink} {g.char} sits at the {POSITIONS[g.cell]}" for g in glyphs)
            verb = "is" if len(glyphs) == 1 else "are"
            out.append(f"On {ground} there {verb} {counts}: {body}.")
    return out


def _scenes(rng: random.Random, n: int, family_share: float) -> list[GlyphScene]:
    scenes: list[GlyphScene] = []
    while len(scenes) < n:
        if rng.random() < family_share:
            family = [random_glyph_scene(rng)]
            while len(family) < FAMILY_SIZE:
                v = vary_glyph_scene(family[0], rng)
                if _short_content(v) not in {_short_content(f) for f in family}:
                    family.append(v)
            scenes.extend(family)
        else:
            scenes.append(random_glyph_scene(rng))
    return scenes[:n]


def glyph_spec(seed: int, train_images: int, heldout_images: int, image_size: int) -> dict[str, object]:
    return {
        "world": "glyphs",
        "seed": seed,
        "train_images": train_images,
        "heldout_images": heldout_images,
        "image_size": image_size,
        "version": 1,
    }


def write_world_splits(
    out: Path,
    splits: dict[str, list[Any]],
    rng_prefix: str,
    render: Callable[[Any, random.Random], tuple[list[str], list[str], bytes]],
) -> None:
    """Write a synthetic world's splits in the real-data formats: ``images/<split>/KEY.png``,
    ``<split>.jsonl`` and, for ``train``, webdataset shards of :data:`TRAIN_SHARD_SIZE` images.

    ``render(item, rng)`` gives an item's short captions, long captions and PNG bytes; ``rng`` is
    seeded ``"<rng_prefix>-<split>-<i>"`` per image, so each image's captions do not depend on the
    others. Shared by the glyph and poster worlds.
    """
    (out / "shards").mkdir(parents=True, exist_ok=True)
    for split, items in splits.items():
        img_dir = out / "images" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        tar = None
        lines = []
        for i, item in enumerate(items):
            key = f"{split}-{i:06d}"
            short, long, png = render(item, random.Random(f"{rng_prefix}-{split}-{i}"))
            record = {
                "key": key,
                "image": f"images/{split}/{key}.png",
                "short_captions": short,
                "long_captions": long,
            }
            (img_dir / f"{key}.png").write_bytes(png)
            lines.append(json.dumps(record))
            if split == "train":
                if i % TRAIN_SHARD_SIZE == 0:
                    if tar is not None:
                        tar.close()
                    name = out / "shards" / f"train-{i // TRAIN_SHARD_SIZE:05d}.tar"
                    tar = tarfile.open(name, "w", format=tarfile.USTAR_FORMAT)
                meta = {k: record[k] for k in ("key", "short_captions", "long_captions")}
                add_tar_member(tar, f"{key}.png", png)
                add_tar_member(tar, f"{key}.json", json.dumps(meta).encode())
                add_tar_member(tar, f"{key}.txt", short[0].encode())
        if tar is not None:
            tar.close()
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


def write_glyph_dataset(
    out: str | Path, seed: int = 0, train_images: int = 1500, heldout_images: int = 500, image_size: int = 96
) -> str:
    """Write the glyph world into ``out``; returns a one-line summary."""
    out = Path(out)
    rng = random.Random(seed)
    splits = {"train": _scenes(rng, train_images, 0.3), "heldout": _scenes(rng, heldout_images, 0.5)}
    write_world_splits(
        out, splits, f"glyphs-{seed}",
        lambda scene, srng: (
            short_glyph_captions(scene, srng, CAPTIONS_PER_KIND),
            long_glyph_captions(scene, srng, CAPTIONS_PER_KIND),
            png_bytes(draw_glyph_scene(scene, image_size)),
        ),
    )  # fmt: skip
    info = {
        **glyph_spec(seed, train_images, heldout_images, image_size),
        "splits": {s: len(v) for s, v in splits.items()},
        "captions_per_image": {s: {"short": CAPTIONS_PER_KIND, "long": CAPTIONS_PER_KIND} for s in splits},
        "family_size": FAMILY_SIZE,
    }
    (out / "dataset.json").write_text(json.dumps(info, indent=2))
    return f"wrote {train_images + heldout_images} glyph images to {out} (train {train_images}, heldout {heldout_images})"
