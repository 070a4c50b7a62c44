"""A third synthetic world, drawn to a description nobody tuned the demo recipe to: "posters".

Issue 28 reported a world of this kind on which stage 2 of the demo recipe learned nothing; this
module draws one from that description, so the failure can be reproduced and the fix checked:

- 96 px images with **one to three letters or digits**, each in a cell of a 3x3 grid and
  **jittered** inside it (not centred as in the glyph world);
- **twelve saturated colours** (hues 30 degrees apart, full saturation), **three sizes**, and about
  a third of the glyphs **tilted 12-35 degrees** to the left or the right;
- **grounds in saturated colours**: plain, striped (horizontal, vertical or diagonal, stripes
  4-8 px wide) or checkered (6-12 px squares), two colours each, none of them a glyph's colour.
  Stripes and checks are high-frequency detail that says nothing the short captions name.
- two **short** captions naming the glyphs (one with their cells), two **long** captions stating
  every glyph's colour, size, cell and tilt, and the ground.

Written in the glyph world's on-disk formats (``docs/DATA.md``): ``images/<split>/<key>.png``,
``train.jsonl`` / ``heldout.jsonl`` (``key``, ``image``, ``short_captions``, ``long_captions``),
webdataset shards of the training split, ``dataset.json`` (``"world": "posters"``). Scenes are drawn
independently (no families). Deterministic per seed.
"""

from __future__ import annotations

import colorsys
import json
import random
import string
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from llm2clip_vlm.data.synthetic import NUMBER_WORDS, POSITIONS, SUPERSAMPLE, png_bytes
from llm2clip_vlm.data.synthetic_glyphs import write_world_splits

GLYPHS = tuple(string.ascii_uppercase + string.digits)


def _hue(deg: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(deg / 360, 1.0, 1.0 if deg < 200 or deg > 260 else 0.9)
    return int(r * 255), int(g * 255), int(b * 255)


# Twelve fully saturated hues, 30 degrees apart.
COLOURS = {
    name: _hue(30 * k)
    for k, name in enumerate(
        ("red", "orange", "yellow", "lime", "green", "spring green",
         "cyan", "azure", "blue", "violet", "magenta", "rose")
    )
}  # fmt: skip
SIZES = {"small": 0.45, "medium": 0.65, "large": 0.85}  # glyph height / cell side
GROUNDS = ("plain", "horizontal stripes", "vertical stripes", "diagonal stripes", "checks")
MAX_GLYPHS = 3
TILT_SHARE = 0.35
TILT_RANGE = (12, 35)
CAPTIONS_PER_KIND = 2


@dataclass(frozen=True)
class PosterGlyph:
    char: str
    colour: str
    size: str
    cell: int  # index into POSITIONS
    tilt: int  # degrees, positive = counter-clockwise (to the left), 0 = upright
    dx: float  # jitter inside the cell, as a share of the free room (-1..1)
    dy: float


@dataclass(frozen=True)
class Poster:
    ground: str
    colours: tuple[str, str]  # ground colour(s): the second is unused for a plain ground
    period: int  # stripe width / check side in pixels at the output size
    glyphs: tuple[PosterGlyph, ...]


def random_poster(rng: random.Random) -> Poster:
    ground = rng.choice(GROUNDS)
    colours = rng.sample(list(COLOURS), 2)
    period = rng.randint(6, 12) if ground == "checks" else rng.randint(4, 8)
    free = [c for c in COLOURS if c not in colours]
    glyphs = []
    for cell in rng.sample(range(len(POSITIONS)), rng.randint(1, MAX_GLYPHS)):
        tilt = 0
        if rng.random() < TILT_SHARE:
            tilt = rng.randint(*TILT_RANGE) * rng.choice((-1, 1))
        glyphs.append(
            PosterGlyph(rng.choice(GLYPHS), rng.choice(free), rng.choice(list(SIZES)), cell, tilt,
                        rng.uniform(-1, 1), rng.uniform(-1, 1))
        )  # fmt: skip
    return Poster(ground, (colours[0], colours[1]), period, tuple(glyphs))


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)  # Pillow's bundled font: no system font needed


def _ground(poster: Poster, big: int, scale: int) -> Image.Image:
    a, b = COLOURS[poster.colours[0]], COLOURS[poster.colours[1]]
    img = Image.new("RGB", (big, big), a)
    if poster.ground == "plain":
        return img
    draw = ImageDraw.Draw(img)
    p = poster.period * scale
    if poster.ground == "horizontal stripes":
        for y in range(0, big, 2 * p):
            draw.rectangle([0, y, big, y + p - 1], fill=b)
    elif poster.ground == "vertical stripes":
        for x in range(0, big, 2 * p):
            draw.rectangle([x, 0, x + p - 1, big], fill=b)
    elif poster.ground == "diagonal stripes":
        # Bands of constant (x + y) // p: stripes running from bottom left to top right.
        for k in range(0, 2 * big // p + 2, 2):
            c0, c1 = k * p, (k + 1) * p
            draw.polygon([(c0, 0), (c1, 0), (0, c1), (0, c0)], fill=b)
    else:  # checks
        for r in range(0, big // p + 1):
            for c in range(r % 2, big // p + 1, 2):
                draw.rectangle([c * p, r * p, (c + 1) * p - 1, (r + 1) * p - 1], fill=b)
    return img


def draw_poster(poster: Poster, image_size: int = 96) -> Image.Image:
    """Render ``poster`` as an RGB image of ``image_size`` x ``image_size`` pixels."""
    big = image_size * SUPERSAMPLE
    img = _ground(poster, big, SUPERSAMPLE)
    cell = big / 3
    for g in poster.glyphs:
        side = int(cell * SIZES[g.size])
        # Draw the glyph on its own transparent tile, rotate it, paste it jittered into its cell.
        tile = Image.new("RGBA", (2 * side, 2 * side), (0, 0, 0, 0))
        ImageDraw.Draw(tile).text(
            (side, side), g.char, fill=(*COLOURS[g.colour], 255), font=_font(side), anchor="mm",
            stroke_width=SUPERSAMPLE, stroke_fill=(*COLOURS[g.colour], 255),
        )  # fmt: skip
        if g.tilt:
            tile = tile.rotate(g.tilt, resample=Image.Resampling.BICUBIC)
        box = tile.getbbox() or (0, 0, 1, 1)
        tile = tile.crop(box)
        row, col = divmod(g.cell, 3)
        room_x, room_y = max(0.0, cell - tile.width) / 2, max(0.0, cell - tile.height) / 2
        x = (col + 0.5) * cell - tile.width / 2 + g.dx * room_x * 0.9
        y = (row + 0.5) * cell - tile.height / 2 + g.dy * room_y * 0.9
        img.paste(tile, (int(x), int(y)), tile)
    return img.resize((image_size, image_size), Image.Resampling.BOX)


def _name(char: str) -> str:
    return f"the digit {char}" if char.isdigit() else f"the letter {char}"


def _tilt(g: PosterGlyph) -> str:
    if not g.tilt:
        return "upright"
    return f"tilted {abs(g.tilt)} degrees to the {'left' if g.tilt > 0 else 'right'}"


def _ground_phrase(poster: Poster) -> str:
    a, b = poster.colours
    if poster.ground == "plain":
        return f"a plain {a} background"
    if poster.ground == "checks":
        return f"a background checkered in {a} and {b}"
    return f"a background of {a} and {b} {poster.ground}"


def _and(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def short_poster_captions(poster: Poster, rng: random.Random) -> list[str]:
    """Two short captions: the glyphs by name, and the glyphs with their cells (order shuffled)."""
    glyphs = list(poster.glyphs)
    rng.shuffle(glyphs)
    first = _and([_name(g.char) for g in glyphs])
    rng.shuffle(glyphs)
    second = ", ".join(f"{g.char} at the {POSITIONS[g.cell]}" for g in glyphs)
    return [first, second]


def long_poster_captions(poster: Poster, rng: random.Random) -> list[str]:
    """Two detailed captions: the ground, then every glyph's colour, size, cell and tilt."""
    n = len(poster.glyphs)
    noun = "character" if n == 1 else "characters"
    ground = _ground_phrase(poster)
    glyphs = list(poster.glyphs)
    rng.shuffle(glyphs)
    body = " ".join(
        f"In the {POSITIONS[g.cell]} cell, {_name(g.char)} is {g.size}, {g.colour} and {_tilt(g)}."
        for g in glyphs
    )
    first = f"On {ground}, a three by three grid holds {NUMBER_WORDS[n]} {noun}. {body}"
    rng.shuffle(glyphs)
    parts = "; ".join(
        f"a {g.size} {g.colour} {g.char} at the {POSITIONS[g.cell]}, {_tilt(g)}" for g in glyphs
    )
    second = f"{NUMBER_WORDS[n].capitalize()} {noun} on {ground}: {parts}."
    return [first, second]


def poster_spec(seed: int, train_images: int, heldout_images: int, image_size: int) -> dict[str, object]:
    return {
        "world": "posters",
        "seed": seed,
        "train_images": train_images,
        "heldout_images": heldout_images,
        "image_size": image_size,
        "version": 1,
    }


def write_poster_dataset(
    out: str | Path, seed: int = 0, train_images: int = 1500, heldout_images: int = 500, image_size: int = 96
) -> str:
    """Write the poster world into ``out``; returns a one-line summary."""
    out = Path(out)
    rng = random.Random(seed)
    splits = {
        "train": [random_poster(rng) for _ in range(train_images)],
        "heldout": [random_poster(rng) for _ in range(heldout_images)],
    }
    write_world_splits(
        out, splits, f"posters-{seed}",
        lambda poster, srng: (
            short_poster_captions(poster, srng),
            long_poster_captions(poster, srng),
            png_bytes(draw_poster(poster, image_size)),
        ),
    )  # fmt: skip
    info = {
        **poster_spec(seed, train_images, heldout_images, image_size),
        "splits": {s: len(v) for s, v in splits.items()},
        "captions_per_image": {s: {"short": CAPTIONS_PER_KIND, "long": CAPTIONS_PER_KIND} for s in splits},
    }
    (out / "dataset.json").write_text(json.dumps(info, indent=2))
    return (
        f"wrote {train_images + heldout_images} poster images to {out} "
        f"(train {train_images}, heldout {heldout_images})"
    )
