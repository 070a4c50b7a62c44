"""Caption Retrieval Accuracy (CRA), the check of stage 1 (LLM2CLIP, Table 1).

Two captions per held-out image; each of the 2N captions retrieves among all other 2N-1 captions
by cosine similarity, and counts as correct when its top-1 is the other caption of its image.
Reported in percent. Captions are embedded bare (no instruction), as the embedding store embeds
them for stage 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

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
