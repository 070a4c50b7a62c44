"""Stage 2 of the demo recipe without the LLM pass: a quick check of what the ViT generalises.

Runs ``train_stage2`` with the embedded demo recipe (plus ``--set`` overrides), the real images
and held-out sets of a world, and hashed bag-of-words caption vectors in place of the embedding
store. ``--vectors content`` keeps only content words (glyphs/colours/shapes, cells, grounds,
counts) and their neighbour pairs: caption vectors that ignore the template, like a trained
stage-1 encoder's (their CRA is 39 on the glyph world, 67 on the demo world); ``--vectors all``
hashes every word, bigram and trigram (template-dominated: CRA 0.1 / 1.0).

    python scripts/stage2_probe.py demo DATA_DIR OUT [--vectors content] [--set KEY=VALUE ...]
    python scripts/stage2_probe.py glyphs DATA_DIR OUT ...   (DATA_DIR from demo-data --world glyphs)
    python scripts/stage2_probe.py posters DATA_DIR OUT ...  (DATA_DIR from demo-data --world posters)

Prints the held-out R@1 (I2T, T2I) of every set; the run's metrics.json is in OUT.
"""

from __future__ import annotations

import argparse
import hashlib
import string
import time

import numpy as np
import torch

from llm2clip_vlm import config_io
from llm2clip_vlm.cli import demo_recipe_path
from llm2clip_vlm.data import open_image, resolve_data
from llm2clip_vlm.data.records import keep_captions
from llm2clip_vlm.recipe import RunConfig
from llm2clip_vlm.vision.data import HeldoutSet
from llm2clip_vlm.vision.train import Stage2Data, train_stage2

DIM = 256
CONTENT = (
    set(string.ascii_lowercase)
    | set(string.digits)
    | set(
        "top bottom left right centre black red blue green white yellow grey gray beige plain striped "
        "checkered one two three four letter letters digit digits circle square triangle star diamond "
        "cross purple orange pink cyan small large larger "
        # the poster world (``demo-data --world posters``)
        "lime spring azure violet magenta rose medium upright tilted horizontal vertical diagonal stripes "
        "checks checkered".split()
    )
)


def _words(text: str) -> list[str]:
    for ch in ",;.:()":
        text = text.replace(ch, " ")
    return text.lower().split()


def _hashed(tokens: list[str]) -> np.ndarray:
    v = np.zeros(DIM)
    for tok in tokens:
        seed = int.from_bytes(hashlib.sha256(tok.encode()).digest()[:4], "little")
        v += np.random.default_rng(seed).normal(size=DIM)
    return v / (np.linalg.norm(v) + 1e-9)


def vector(text: str, kind: str) -> np.ndarray:
    w = _words(text)
    if kind == "content":
        w = [t for t in w if t in CONTENT and t != "a"]
        return _hashed(w + ["_".join(sorted(p)) for p in zip(w, w[1:], strict=False)])
    grams = [f"{a}_{b}" for a, b in zip(w, w[1:], strict=False)] + [
        f"{a}_{b}_{c}" for a, b, c in zip(w, w[1:], w[2:], strict=False)
    ]
    return _hashed(w + grams)


class VectorStore:
    """The embedding-store interface over hashed caption vectors (rows in caption order)."""

    dim = DIM

    def __init__(self, records: list, kind: str) -> None:
        self.rows: list[dict[str, list[int]]] = []
        vectors = []
        for r in records:
            kinds: dict[str, list[int]] = {"short": [], "long": []}
            for c in r.captions:
                kinds[c.kind].append(len(vectors))
                vectors.append(vector(c.text, kind))
            self.rows.append(kinds)
        self.array = np.asarray(vectors, dtype=np.float32)

    def caption_rows(self, image_index: int, kind: str) -> np.ndarray:
        return np.asarray(self.rows[image_index][kind], dtype=np.int64)

    def __getitem__(self, rows: object) -> np.ndarray:
        return self.array[rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("world", choices=["demo", "glyphs", "posters"])
    ap.add_argument("data_dir")
    ap.add_argument("out")
    ap.add_argument("--vectors", choices=["content", "all"], default="content")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    torch.set_num_threads(1)
    over = list(args.overrides)
    if args.world == "demo":
        over.append(f"data.demo_dir={args.data_dir}")
    else:
        held = f"{args.data_dir}/heldout.jsonl"
        over += [
            f"data.train.path={args.data_dir}/train.jsonl",
            f"data.heldout.short.path={held}",
            "data.heldout.short.caption_columns={short_captions: short}",
            f"data.heldout.long.path={held}",
            "data.heldout.long.caption_columns={long_captions: long}",
        ]
    cfg = config_io.load(RunConfig, demo_recipe_path(), over)
    train_set, heldout_sets = resolve_data(cfg.data, args.out)
    train = keep_captions(train_set, cfg.embed.train_captions_per_kind)
    heldout = {}
    for name, records in heldout_sets.items():
        records = list(records)
        caption_image = torch.tensor([i for i, r in enumerate(records) for _ in r.captions], dtype=torch.long)
        emb = torch.tensor(np.asarray([vector(c.text, args.vectors) for r in records for c in r.captions]))
        heldout[name] = HeldoutSet(records, emb.float(), caption_image)
    start = time.time()
    data = Stage2Data(train, VectorStore(train, args.vectors), heldout, open_image)
    metrics = train_stage2(cfg.stage2, args.out, data)
    for name, m in metrics["eval"]["after"].items():
        print(
            f"{args.world} {name}: I2T R@1 {m['i2t_r1']:.1f}  T2I R@1 {m['t2i_r1']:.1f}  ({time.time() - start:.0f} s)"
        )


if __name__ == "__main__":
    main()
