"""The synthetic image-caption world: the embedded demo data set (SPEC section 2).

Procedurally drawn scenes of 1-4 coloured shapes on a 3x3 grid over a coloured background, each
with several paraphrased short captions and long captions, written in the same on-disk formats as
real data (JSONL manifests + PNG files, and webdataset tar shards for the training split). It makes
learning measurable on a CPU:

- Short captions name every object's colour, shape and grid position, in shuffled order and
  varied templates; long captions add what short ones leave out (size, background, the number of
  objects, which object is largest), so reading long text matters.
- Held-out scenes are drawn in *families*: a base scene and variants that change exactly one
  attribute (a colour, a shape, a position, the count, or swap the colours or positions of two
  objects; for the long set also a size or the background). Captions of different images then share most of their words, so word overlap
  alone does not solve retrieval.

Everything is deterministic per seed: the same seed writes byte-identical files.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image, ImageDraw

from llm2clip_vlm.progress import make_progress

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "pink": (240, 120, 190),
    "cyan": (40, 200, 210),
}
BACKGROUNDS = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "beige": (225, 210, 170),
}
SIZES = ("small", "large")
# 3x3 grid cells, row-major.
POSITIONS = (
    "top left",
    "top",
    "top right",
    "left",
    "centre",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
MAX_OBJECTS = 4
SUPERSAMPLE = 4  # draw large, then downsample: anti-aliased edges like a photo's


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    cell: int  # index into POSITIONS


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[SceneObject, ...]


# ----------------------------------------------------------------------------------------------
# Drawing scenes
# ----------------------------------------------------------------------------------------------
def _random_object(rng: random.Random, cell: int) -> SceneObject:
    return SceneObject(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(SIZES), cell)


def random_scene(rng: random.Random) -> Scene:
    n = rng.randint(1, MAX_OBJECTS)
    cells = rng.sample(range(len(POSITIONS)), n)
    return Scene(rng.choice(list(BACKGROUNDS)), tuple(_random_object(rng, c) for c in cells))


def vary_scene(scene: Scene, rng: random.Random, attributes: tuple[str, ...]) -> Scene:
    """A copy of ``scene`` with exactly one attribute (drawn from ``attributes``) changed.

    ``swap_colour`` / ``swap_position`` exchange an attribute between two objects: the captions
    then hold the same bag of words and differ only in which attribute binds to which object, so
    word overlap cannot tell the images apart.
    """
    objs = list(scene.objects)
    free_cells = [c for c in range(len(POSITIONS)) if c not in {o.cell for o in objs}]
    if len(objs) < 2:
        attributes = tuple(a for a in attributes if not a.startswith("swap_"))
    attribute = rng.choice(attributes)
    i = rng.randrange(len(objs))
    if attribute.startswith("swap_"):
        j = rng.choice([k for k in range(len(objs)) if k != i])
        if attribute == "swap_colour":
            objs[i], objs[j] = (
                replace(objs[i], colour=objs[j].colour),
                replace(objs[j], colour=objs[i].colour),
            )
        else:
            objs[i], objs[j] = replace(objs[i], cell=objs[j].cell), replace(objs[j], cell=objs[i].cell)
        return replace(scene, objects=tuple(objs))
    if attribute == "colour":
        objs[i] = replace(objs[i], colour=rng.choice([c for c in COLOURS if c != objs[i].colour]))
    elif attribute == "shape":
        objs[i] = replace(objs[i], shape=rng.choice([s for s in SHAPES if s != objs[i].shape]))
    elif attribute == "position":
        objs[i] = replace(objs[i], cell=rng.choice(free_cells))
    elif attribute == "size":
        objs[i] = replace(objs[i], size="large" if objs[i].size == "small" else "small")
    elif attribute == "background":
        return replace(scene, background=rng.choice([b for b in BACKGROUNDS if b != scene.background]))
    elif attribute == "count":
        if len(objs) < MAX_OBJECTS and (len(objs) == 1 or rng.random() < 0.5):
            objs.append(_random_object(rng, rng.choice(free_cells)))
        else:
            objs.pop(i)
    return replace(scene, objects=tuple(objs))


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    import math

    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.85), (cx - r, cy + r * 0.85)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    if shape == "cross":
        w = r * 0.38
        return [
            (cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w),
            (cx + r, cy + w), (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r),
            (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w),
        ]  # fmt: skip
    raise ValueError(f"unknown shape {shape!r}")


def draw_scene(scene: Scene, image_size: int = 64) -> Image.Image:
    """Render a scene as an RGB image of ``image_size`` x ``image_size`` pixels."""
    big = image_size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    cell = big / 3
    for obj in scene.objects:
        row, col = divmod(obj.cell, 3)
        cx, cy = (col + 0.5) * cell, (row + 0.5) * cell
        r = cell * (0.42 if obj.size == "large" else 0.22)
        colour = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:
            draw.polygon(_shape_points(obj.shape, cx, cy, r), fill=colour)
    return img.resize((image_size, image_size), Image.Resampling.BOX)


# ----------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------
def indefinite_article(word: str) -> str:
    """The indefinite article for ``word`` ("an orange", "a red")."""
    return "an" if word[0] in "aeiou" else "a"


_SHORT_TEMPLATES = (
    lambda parts: " and ".join(f"{indefinite_article(c)} {c} {s} at the {p}" for c, s, p in parts),
    lambda parts: ", ".join(f"{c} {s} ({p})" for c, s, p in parts),
    lambda parts: (
        "a picture of " + " and ".join(f"{indefinite_article(c)} {c} {s} in the {p}" for c, s, p in parts)
    ),
    lambda parts: "; ".join(f"{p}: {indefinite_article(c)} {c} {s}" for c, s, p in parts),
    lambda parts: "shapes: " + ", ".join(f"{c} {s} at {p}" for c, s, p in parts),
)


def short_captions(scene: Scene, rng: random.Random, n: int) -> list[str]:
    """``n`` paraphrases naming every object's colour, shape and position (order shuffled)."""
    templates = rng.sample(range(len(_SHORT_TEMPLATES)), n)
    out = []
    for t in templates:
        parts = [(o.colour, o.shape, POSITIONS[o.cell]) for o in scene.objects]
        rng.shuffle(parts)
        out.append(_SHORT_TEMPLATES[t](parts))
    return out


def _largest_phrase(scene: Scene) -> str:
    large = [o for o in scene.objects if o.size == "large"]
    if not large:
        return "All of the shapes are small."
    if len(large) == len(scene.objects):
        return "All of the shapes are large." if len(large) > 1 else ""
    names = " and the ".join(f"{o.colour} {o.shape}" for o in large)
    return f"The {names} {'is' if len(large) == 1 else 'are'} larger than the rest."


def long_captions(scene: Scene, rng: random.Random, n: int) -> list[str]:
    """``n`` detailed descriptions: count, background, size and exact cell of every object."""
    count = len(scene.objects)
    noun = "shape" if count == 1 else "shapes"
    out = []
    for t in rng.sample(range(2), n):
        objs = list(scene.objects)
        rng.shuffle(objs)
        if t == 0:
            body = " ".join(
                f"In the {POSITIONS[o.cell]} cell there is a {o.size} {o.colour} {o.shape}." for o in objs
            )
            text = f"The image shows {NUMBER_WORDS[count]} {noun} on a {scene.background} background. {body}"
        else:
            body = "; ".join(f"a {o.size} {o.colour} {o.shape} sits at the {POSITIONS[o.cell]}" for o in objs)
            text = (
                f"A {scene.background} square canvas divided into a three by three grid holds "
                f"{NUMBER_WORDS[count]} {noun}: {body}."
            )
        extra = _largest_phrase(scene)
        out.append(f"{text} {extra}".strip())
    return out


# ----------------------------------------------------------------------------------------------
# Writing the data set
# ----------------------------------------------------------------------------------------------
SPLITS = ("train", "heldout_short", "heldout_long")
SHORT_PER_IMAGE = 3
LONG_PER_IMAGE = 2
FAMILY_SIZE = 4
TRAIN_SHARD_SIZE = 1000


def _short_content(scene: Scene) -> frozenset[tuple[str, str, int]]:
    """What a short caption says about a scene: colour, shape and cell of each object."""
    return frozenset((o.colour, o.shape, o.cell) for o in scene.objects)


def _scenes(rng: random.Random, n: int, family_share: float, attributes: tuple[str, ...]) -> list[Scene]:
    """``n`` scenes; ``family_share`` of them in families of near-duplicates (one change each)."""
    scenes: list[Scene] = []
    while len(scenes) < n:
        if rng.random() < family_share:
            base = random_scene(rng)
            family = [base]
            # Members must differ in what their captions can say: without size/background
            # variants (short captions), two scenes that differ only in sizes would share captions.
            describable = (lambda sc: sc) if "size" in attributes else _short_content
            seen = {describable(base)}
            while len(family) < FAMILY_SIZE:
                v = vary_scene(base, rng, attributes)
                if describable(v) not in seen:
                    seen.add(describable(v))
                    family.append(v)
            scenes.extend(family)
        else:
            scenes.append(random_scene(rng))
    return scenes[:n]


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def add_tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # deterministic archives
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def demo_spec(seed: int, train_images: int, heldout_images: int, image_size: int) -> dict[str, int]:
    return {
        "seed": seed,
        "train_images": train_images,
        "heldout_images": heldout_images,
        "image_size": image_size,
        "version": 3,
    }


def write_demo_dataset(
    out: str | Path,
    seed: int = 0,
    train_images: int = 4000,
    heldout_images: int = 1000,
    image_size: int = 64,
    show_progress: bool = True,
) -> str:
    """Write the synthetic world into ``out``; returns a one-line summary.

    Layout: ``images/<split>/<key>.png``, ``<split>.jsonl`` manifests (``key``, ``image``,
    ``short_captions``, ``long_captions``), ``shards/train-NNNNN.tar`` (webdataset: ``<key>.png``,
    ``<key>.json``, ``<key>.txt``), ``text/corpus.txt`` and ``dataset.json``.
    """

    out = Path(out)
    rng = random.Random(seed)
    all_attrs = ("colour", "shape", "position", "count", "swap_colour", "swap_position")
    splits = {
        # Training mixes independent scenes with families, so stage 1 sees hard negatives.
        "train": _scenes(rng, train_images, 0.5, all_attrs),
        # Short captions do not mention size or background, so short-set variants never differ
        # only in those (their captions would be indistinguishable).
        "heldout_short": _scenes(rng, heldout_images, 1.0, all_attrs),
        "heldout_long": _scenes(rng, heldout_images, 1.0, (*all_attrs, "size", "background")),
    }
    (out / "shards").mkdir(parents=True, exist_ok=True)
    total = sum(len(s) for s in splits.values())
    with make_progress(disable=not show_progress) as progress:
        task = progress.add_task("demo-data", total=total, status="", unit="image")
        for split, scenes in splits.items():
            img_dir = out / "images" / split
            img_dir.mkdir(parents=True, exist_ok=True)
            tar = None
            lines = []
            for i, scene in enumerate(scenes):
                key = f"{split}-{i:06d}"
                # Held-out families (aligned runs of FAMILY_SIZE scenes) share one caption stream:
                # caption j of every image in a family uses the same template and object order, so
                # captions of different images differ only in the changed attribute, not in wording.
                stream = i if split == "train" else i // FAMILY_SIZE
                srng = random.Random(f"{seed}-{split}-{stream}")
                n_short = SHORT_PER_IMAGE
                n_long = 1 if split == "heldout_long" else LONG_PER_IMAGE
                record = {
                    "key": key,
                    "image": f"images/{split}/{key}.png",
                    "short_captions": short_captions(scene, srng, n_short) if split != "heldout_long" else [],
                    "long_captions": long_captions(scene, srng, n_long) if split != "heldout_short" else [],
                }
                png = png_bytes(draw_scene(scene, image_size))
                (img_dir / f"{key}.png").write_bytes(png)
                lines.append(json.dumps(record))
                if split == "train":
                    if i % TRAIN_SHARD_SIZE == 0:
                        if tar is not None:
                            tar.close()
                        tar = tarfile.open(
                            out / "shards" / f"train-{i // TRAIN_SHARD_SIZE:05d}.tar",
                            "w",
                            format=tarfile.USTAR_FORMAT,  # plain headers: byte-stable, no pax records
                        )
                    meta = {k: record[k] for k in ("key", "short_captions", "long_captions")}
                    add_tar_member(tar, f"{key}.png", png)
                    add_tar_member(tar, f"{key}.json", json.dumps(meta).encode())
                    add_tar_member(tar, f"{key}.txt", record["short_captions"][0].encode())
                progress.advance(task)
            if tar is not None:
                tar.close()
            (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    _write_text_corpus(out / "text" / "corpus.txt", random.Random(seed + 1))
    spec = demo_spec(seed, train_images, heldout_images, image_size)
    info = {
        **spec,
        "splits": {s: len(v) for s, v in splits.items()},
        "captions_per_image": {
            "train": {"short": SHORT_PER_IMAGE, "long": LONG_PER_IMAGE},
            "heldout_short": {"short": SHORT_PER_IMAGE, "long": 0},
            "heldout_long": {"short": 0, "long": 1},
        },
        "family_size": FAMILY_SIZE,
    }
    (out / "dataset.json").write_text(json.dumps(info, indent=2))
    return (
        f"wrote {total} images to {out} (train {train_images}, heldout_short {heldout_images}, "
        f"heldout_long {heldout_images}; {len(list((out / 'shards').glob('*.tar')))} train shards)"
    )


def _write_text_corpus(path: Path, rng: random.Random, n: int = 400) -> None:
    """A small plain-text corpus (the stand-in for Wikitext-103 in the stage-1 text mix)."""
    facts = [
        "A {s} is a shape that people learn to name as children.",
        "The colour {c} is often used on signs and in paintings.",
        "Artists mix paint to make {c}, and a {s} is easy to draw with a ruler.",
        "In geometry, a {s} can be described by its corners and edges.",
        "Many flags contain the colour {c} together with simple shapes.",
        "A grid of three rows and three columns has nine cells.",
        "Children sort wooden blocks by colour, such as {c}, and by shape, such as {s}.",
    ]
    lines = [rng.choice(facts).format(s=rng.choice(SHAPES), c=rng.choice(list(COLOURS))) for _ in range(n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
