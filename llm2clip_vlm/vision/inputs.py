"""Stage 2's inputs besides its config: held-out sets with caption embeddings, and usable images.

Held-out captions always come from an embedding store: the ``embed`` output's ``heldout-<name>/``
when it has one, else a store this module writes with the same writer (``store.writer``) under the
run directory, one per encoder identity (a replaced encoder gets a fresh store; a restart reuses or
resumes the one there). So there is one way a caption becomes a vector.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from llm2clip_vlm.data.check import check_caption_images
from llm2clip_vlm.data.errors import BadRecords, write_report
from llm2clip_vlm.data.records import ImageCaptions
from llm2clip_vlm.store.config import EmbedConfig
from llm2clip_vlm.store.store import EmbeddingStore
from llm2clip_vlm.store.writer import write_store
from llm2clip_vlm.text.encoder import CaptionEncoder
from llm2clip_vlm.training import dist
from llm2clip_vlm.vision.data import HeldoutSet

UsableFn = Callable[[str, Sequence[ImageCaptions]], "list[int] | None"]


def heldout_sets(
    sets: Mapping[str, Sequence[ImageCaptions]],
    store_dir: Path,
    encoder_dir: Path | None,
    identity: str,
    cache_dir: Path,
    embed: EmbedConfig,
    usable: UsableFn,
) -> dict[str, HeldoutSet]:
    """One :class:`HeldoutSet` per held-out set, restricted to the images ``usable`` keeps.

    A set without a store in ``store_dir`` is embedded with the encoder at ``encoder_dir`` into
    ``cache_dir/<identity>/heldout-<name>`` (the ``embed`` section's dtype, batch size, precision).
    """

    heldout: dict[str, HeldoutSet] = {}
    encoder: CaptionEncoder | None = None
    for name, records in sets.items():
        records = list(records)
        caption_image = torch.tensor([i for i, r in enumerate(records) for _ in r.captions], dtype=torch.long)
        hstore_dir = store_dir / f"heldout-{name}"
        if not hstore_dir.exists():
            if encoder_dir is None:
                raise FileNotFoundError(
                    f"no embedding store for held-out set {name!r} ({hstore_dir}) and no encoder to embed it"
                )
            hstore_dir = cache_dir / identity[:16] / f"heldout-{name}"
            # Under several processes the main one writes it (resuming or reusing one already
            # there) while the others wait, then every process opens it.
            state = dist.process_state()
            if state.is_main_process:
                encoder = encoder or CaptionEncoder.from_pretrained(encoder_dir)
                write_store(encoder, records, hstore_dir, embed)
            state.wait_for_everyone()
        hstore = EmbeddingStore.open(hstore_dir, captions=records, encoder_identity=identity or None)
        emb = torch.from_numpy(np.asarray(hstore[np.arange(len(caption_image))], dtype=np.float32))
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
