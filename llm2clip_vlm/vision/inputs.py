"""Stage 2's inputs besides its config: held-out sets with caption embeddings, and usable images.

Held-out captions come from the ``embed`` store (``heldout-<name>/``) when it has one, else from
the stage-1 encoder (cached per encoder identity next to the run).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from llm2clip_vlm.data.check import check_caption_images
from llm2clip_vlm.data.errors import BadRecords, write_report
from llm2clip_vlm.data.records import ImageCaptions
from llm2clip_vlm.store.store import EmbeddingStore
from llm2clip_vlm.text.encoder import CaptionEncoder
from llm2clip_vlm.vision.data import HeldoutSet

UsableFn = Callable[[str, Sequence[ImageCaptions]], "list[int] | None"]


def heldout_sets(
    sets: Mapping[str, Sequence[ImageCaptions]],
    store_dir: Path,
    encoder_dir: Path | None,
    identity: str,
    cache_dir: Path,
    batch_size: int,
    usable: UsableFn,
) -> dict[str, HeldoutSet]:
    """One :class:`HeldoutSet` per held-out set, restricted to the images ``usable`` keeps."""

    heldout: dict[str, HeldoutSet] = {}
    for name, records in sets.items():
        records = list(records)
        caption_image = torch.tensor([i for i, r in enumerate(records) for _ in r.captions], dtype=torch.long)
        hstore_dir = store_dir / f"heldout-{name}"
        if hstore_dir.exists():
            hstore = EmbeddingStore.open(hstore_dir, captions=records, encoder_identity=identity or None)
            emb = torch.from_numpy(np.asarray(hstore[np.arange(len(caption_image))], dtype=np.float32))
        elif encoder_dir is not None:
            emb = encode_captions(
                encoder_dir, records, batch_size, cache_dir / f"{name}.safetensors", identity
            )
        else:
            raise FileNotFoundError(
                f"no embedding store for held-out set {name!r} ({hstore_dir}) and no encoder to embed it"
            )
        hs = HeldoutSet(records, emb, caption_image)
        good = usable(name, records)
        heldout[name] = hs if good is None else hs.subset(good)
    return heldout


def usable_images(
    out: Path,
    name: str,
    records: Sequence[ImageCaptions],
    *,
    skip_bad: bool,
    max_bad_fraction: float,
    earlier: Sequence[tuple[str, str]] = (),
    workers: int = 4,
) -> list[int] | None:
    """Decode every image once per data set: indices of the good ones, None if all are.

    The result is cached by the data set's identity (:mod:`llm2clip_vlm.data.check`, ``workers``
    decoding threads): a later start decodes nothing. Bad images stop the run with a message naming
    them, or with ``skip_bad`` are skipped and listed in ``<out>/bad_records.json``.
    """

    policy = BadRecords(skip_bad, max_bad_fraction, name=f"{name} images", earlier=earlier)
    good = check_caption_images(records, policy, workers=workers, description=f"checking {name} images")
    if good is None or not policy.skipped:
        return None
    write_report(out, name, len(records), policy.skipped)
    return good


def encode_captions(
    encoder_dir: Path, records: Sequence[ImageCaptions], batch_size: int, cache: Path, identity: str
) -> torch.Tensor:
    """Held-out caption embeddings from the stage-1 encoder, cached per encoder identity."""

    texts = [c.text for r in records for c in r.captions]
    key = hashlib.sha256(json.dumps([identity, texts]).encode()).hexdigest()
    if cache.is_file():
        cached = load_file(str(cache))
        if "key" in cached and bytes(cached["key"].tolist()).decode() == key:
            return cached["embeddings"]
    emb = CaptionEncoder.from_pretrained(encoder_dir).encode(texts, batch_size=batch_size, show_progress=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {"embeddings": emb.contiguous(), "key": torch.tensor(list(key.encode()), dtype=torch.uint8)},
        str(cache),
    )
    return emb
