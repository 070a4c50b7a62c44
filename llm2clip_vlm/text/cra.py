"""Caption Retrieval Accuracy (CRA), the check of stage 1 (LLM2CLIP, Table 1).

Two captions per held-out image; each of the 2N captions retrieves among all other 2N-1 captions
by cosine similarity, and counts as correct when its top-1 is the other caption of its image.
Reported in percent. Captions are embedded bare (no instruction), as the embedding store embeds
them for stage 2.

Where the caption pairs come from (:func:`choose_cra_source`): the held-out set named by
``stage1.cra_set``; by default the first held-out set with two or more short captions per image
(COCO and Flickr30k have five, the demo's ``short`` set three); when there is none, a
deterministic slice of the training data (its last images with two short captions), which is then
left out of stage-1 training so CRA still measures captions the model never trained on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from llm2clip_vlm.data.captions import DataError
from llm2clip_vlm.data.records import ImageCaptions

if TYPE_CHECKING:
    from llm2clip_vlm.text.encoder import CaptionEncoder


def caption_pairs(
    records: Sequence[ImageCaptions], max_captions: int = 1000, kind: str = "short"
) -> list[tuple[str, str]]:
    """The first two captions of ``kind`` of each image that has two, up to ``max_captions`` captions."""
    pairs = []
    for r in records:
        texts = r.of_kind(kind)  # type: ignore[arg-type]
        if len(texts) >= 2:
            pairs.append((texts[0], texts[1]))
        if 2 * len(pairs) >= max_captions > 0:
            break
    if not pairs:
        raise ValueError(f"no held-out image has two {kind} captions: CRA cannot be computed")
    return pairs


# A held-out slice of the training data keeps at most this share of it (a small set must still train).
MAX_TRAIN_SHARE = 0.1
TRAIN_SLICE = "train"  # the name CRA reports when the pairs come from the training data


def has_caption_pairs(records: Sequence[ImageCaptions], kind: str = "short") -> bool:
    """Whether CRA can be computed on ``records``: at least two images with two ``kind`` captions.

    (With a single image both captions would always find each other: 100 %, meaning nothing.)
    """
    found = 0
    for r in records:
        found += len(r.of_kind(kind)) >= 2  # type: ignore[arg-type]
        if found >= 2:
            return True
    return False


@dataclass
class CRASource:
    """Where stage 1's CRA pairs come from, and the training records left after taking them."""

    name: str  # a held-out set's name, or TRAIN_SLICE
    records: list[ImageCaptions]  # the images CRA reads (their first two short captions)
    train_records: list[ImageCaptions]  # what stage 1 trains on
    from_training_data: bool = False
    held_out_keys: list[str] = field(default_factory=list)  # only for a training-data slice

    def describe(self) -> dict[str, Any]:
        """The part of ``metrics.json`` that says where CRA was measured."""
        out: dict[str, Any] = {"cra_set": self.name, "cra_from_training_data": self.from_training_data}
        if self.from_training_data:
            out["cra_held_out_of_training"] = len(self.held_out_keys)
        return out


def choose_cra_source(
    train: Sequence[ImageCaptions],
    heldout: Mapping[str, Sequence[ImageCaptions]],
    name: str = "",
    max_captions: int = 1000,
) -> CRASource:
    """Pick the CRA caption source of a stage-1 run (see the module docstring).

    Args:
        train: the training records.
        heldout: the held-out sets by name, in the config's order.
        name: ``stage1.cra_set``; empty = the first held-out set with short-caption pairs.
        max_captions: ``stage1.cra_captions`` (sizes a training-data slice; 0 = no cap).

    Raises:
        DataError: the named set does not exist or has no pairs, or no source has pairs at all.
    """
    if name:
        if name not in heldout:
            known = ", ".join(heldout) or "none"
            raise DataError(f"stage1.cra_set: no held-out set named {name!r} (held-out sets: {known})")
        if not has_caption_pairs(heldout[name]):
            raise DataError(
                f"stage1.cra_set: held-out set {name!r} has no two images with two or more short "
                "captions each; CRA needs two short captions per image"
            )
        return CRASource(name, list(heldout[name]), list(train))
    for set_name, records in heldout.items():
        if has_caption_pairs(records):
            return CRASource(set_name, list(records), list(train))
    return _training_slice(train, max_captions)


def _training_slice(train: Sequence[ImageCaptions], max_captions: int) -> CRASource:
    """The last training images with two short captions, at most ``MAX_TRAIN_SHARE`` of the set."""
    eligible = [i for i, r in enumerate(train) if len(r.short) >= 2]
    want = max(2, int(MAX_TRAIN_SHARE * len(train)))
    if max_captions > 0:
        want = min(want, max(2, max_captions // 2))
    taken = eligible[-want:]
    if len(taken) < 2 or len(train) - len(taken) < 1:
        raise DataError(
            "stage 1 needs caption pairs for CRA: no held-out set (data.heldout) has two or more "
            "short captions per image, and the training data has too few such images to hold some out"
        )
    held = set(taken)
    return CRASource(
        TRAIN_SLICE,
        [train[i] for i in taken],
        [r for i, r in enumerate(train) if i not in held],
        from_training_data=True,
        held_out_keys=[train[i].key for i in taken],
    )


def cra_from_embeddings(a: torch.Tensor, b: torch.Tensor) -> float:
    """CRA in percent, given embeddings of the first (``a[i]``) and second (``b[i]``) caption of image i."""
    if a.shape != b.shape:
        raise ValueError(f"caption embeddings differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    n = a.shape[0]
    x = F.normalize(torch.cat([a, b]).float(), dim=1)
    sim = x @ x.T
    sim.fill_diagonal_(float("-inf"))  # a caption never retrieves itself
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return 100.0 * (sim.argmax(dim=1) == partner).float().mean().item()


def caption_retrieval_accuracy(
    encoder: CaptionEncoder, pairs: Sequence[tuple[str, str]], batch_size: int = 64
) -> float:
    """CRA (percent) of a :class:`~llm2clip_vlm.text.encoder.CaptionEncoder` on caption pairs."""
    emb = encoder.encode(
        [a for a, _ in pairs] + [b for _, b in pairs], batch_size=batch_size, show_progress=True
    )
    return cra_from_embeddings(emb[: len(pairs)], emb[len(pairs) :])
