"""Helpers of the store tests: a caption set, a tiny saved encoder, and a writer process.

As a script it writes an embedding store in a separate process (2 ranks, and SIGKILL)::

    python tests/store_driver.py ENCODER_DIR RECORDS_JSON OUT_DIR CONFIG_JSON [SLEEP_PER_BATCH]

Under ``torchrun`` every rank joins a gloo group and writes its share of the shards. A sleep per
batch makes the run slow enough for a test to kill it between shards.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from llm2clip_vlm.data.records import Caption, ImageCaptions
from llm2clip_vlm.store.config import EmbedConfig
from llm2clip_vlm.store.store import write_store
from llm2clip_vlm.text.encoder import CaptionEncoder
from llm2clip_vlm.text.modeling import ModelRef, load_bidirectional, load_tokenizer
from llm2clip_vlm.text.tiny import save_tiny_llm

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "star", "hexagon"]


def make_records(n: int = 23, seed: int = 0) -> list[ImageCaptions]:
    """Images with 1-3 captions each, short and long mixed, lengths from 3 to ~40 tokens."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        caps = []
        for _ in range(int(rng.integers(1, 4))):
            colour, shape = COLOURS[rng.integers(6)], SHAPES[rng.integers(5)]
            if rng.random() < 0.5:
                caps.append(Caption(f"a {colour} {shape}", "short"))
            else:
                extra = " and ".join(
                    f"a {COLOURS[rng.integers(6)]} {SHAPES[rng.integers(5)]}"
                    for _ in range(rng.integers(1, 6))
                )
                caps.append(Caption(f"a photo of a {colour} {shape} on the left of {extra}", "long"))
        records.append(ImageCaptions(f"img-{i:03d}", f"/data/{i}.png", caps, source=f"train.jsonl:{i + 1}"))
    return records


def make_encoder_dir(path: Path, seed: int = 0) -> Path:
    llm = save_tiny_llm(path / "llm", seed=seed)
    ref = ModelRef(str(llm))
    CaptionEncoder(load_bidirectional(ref), load_tokenizer(ref), max_length=64).save_pretrained(path / "enc")
    return path / "enc"


def load_records(path: Path) -> list[ImageCaptions]:
    """Records from the tests' JSON form: ``[{"key": ..., "captions": [[text, kind], ...]}]``."""
    return [
        ImageCaptions(r["key"], "", [Caption(t, k) for t, k in r["captions"]], source=f"{path}:{i}")
        for i, r in enumerate(json.loads(path.read_text()))
    ]


class SlowEncoder:
    """Delegates to a CaptionEncoder, sleeping after every batch."""

    def __init__(self, inner: CaptionEncoder, sleep: float) -> None:
        self.inner, self.sleep = inner, sleep

    def __getattr__(self, name: str):  # noqa: ANN204 - plain delegation
        return getattr(self.inner, name)

    def encode(self, texts: list[str], **kw) -> torch.Tensor:  # noqa: ANN003
        out = self.inner.encode(texts, **kw)
        time.sleep(self.sleep)
        return out


def main() -> None:
    enc_dir, records, out, cfg_json = (Path(a) for a in sys.argv[1:5])
    sleep = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
    torch.set_num_threads(1)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        torch.distributed.init_process_group("gloo")
    encoder = CaptionEncoder.from_pretrained(enc_dir, device="cpu")
    if sleep:
        encoder = SlowEncoder(encoder, sleep)
    cfg = EmbedConfig(**json.loads(cfg_json.read_text()))
    if records.suffix == ".json":
        data = load_records(records)
    else:  # webdataset shards: the captions are read from the shards' index, no image byte
        from llm2clip_vlm.data.captions import load_caption_set
        from llm2clip_vlm.data.config import CaptionSetConfig

        data = load_caption_set(CaptionSetConfig(path=str(records)))
    write_store(encoder, data, out, cfg, rank=rank, world_size=world)
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
