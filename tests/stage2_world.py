"""A tiny image-caption world for the stage-2 tests: coloured squares, typed captions, and an
in-memory stand-in for the embedding store whose vectors encode each caption's content."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from llm2clip_vlm.data.records import Caption, ImageCaptions

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
PLACES = {"top left": (0, 0), "top right": (0, 1), "bottom left": (1, 0), "bottom right": (1, 1)}


def make_world(folder: Path, n: int, size: int = 32, seed: int = 0) -> list[ImageCaptions]:
    """``n`` PNGs of one coloured square on grey, with 2 short captions and 1 long one each."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    colours, places = list(COLOURS), list(PLACES)
    for i in range(n):
        c, p = colours[i % 4], places[(i // 4 + rng.integers(2)) % 4]
        img = np.full((size, size, 3), 128, dtype=np.uint8)
        r, q = PLACES[p]
        h = size // 2
        img[r * h : (r + 1) * h, q * h : (q + 1) * h] = COLOURS[c]
        img = np.clip(img.astype(int) + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)
        path = folder / f"{i:04d}.png"
        Image.fromarray(img).save(path)
        captions = [
            Caption(f"a {c} square", "short"),
            Caption(f"{c} square at the {p}", "short"),
            Caption(f"a photo of a single {c} square in the {p} corner of a grey picture", "long"),
        ]
        records.append(ImageCaptions(key=f"{i:04d}", image=str(path), captions=captions, source=f"{path}"))
    return records


def load_image(record: ImageCaptions) -> Image.Image:
    return Image.open(record.image).convert("RGB")


class FakeStore:
    """Embedding-store interface over an array: rows are captions in data-set order."""

    def __init__(self, records: list[ImageCaptions], dim: int = 24, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        words = sorted({w for r in records for c in r.captions for w in c.text.split()})
        table = {w: rng.normal(size=dim) for w in words}
        self.rows: list[dict[str, list[int]]] = []
        vectors = []
        for r in records:
            kinds: dict[str, list[int]] = {"short": [], "long": []}
            for c in r.captions:
                kinds[c.kind].append(len(vectors))
                vectors.append(sum(table[w] for w in c.text.split()) + 0.1 * rng.normal(size=dim))
            self.rows.append(kinds)
        self.array = np.asarray(vectors, dtype=np.float16)

    @property
    def dim(self) -> int:
        return self.array.shape[1]

    def caption_rows(self, image_index: int, kind: str) -> np.ndarray:
        return np.asarray(self.rows[image_index][kind], dtype=np.int64)

    def __getitem__(self, rows: object) -> np.ndarray:
        return self.array[rows]
