"""How many captions are longer than a token budget (stage 1's ``max_length``): they are cut, so
a run says how many, in its log and its ``metrics.json``, instead of cutting them silently."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llm2clip_vlm.data.records import ImageCaptions
from llm2clip_vlm.logging import get_logger

log = get_logger(__name__)

# Captions tokenised to count the over-long ones: all of a set up to this many, else a sample.
OVER_LONG_SAMPLE = 100_000


def over_long_captions(tokenizer: Any, records: Sequence[ImageCaptions], max_length: int) -> dict[str, Any]:
    """How many training captions are longer than ``max_length`` tokens (and so are cut): logged
    and kept in ``metrics.json``. Over :data:`OVER_LONG_SAMPLE` captions, evenly spaced images
    are counted and the share is the estimate."""
    n = len(records)
    step = 1
    total_captions = sum(len(r.captions) for r in records) if n <= OVER_LONG_SAMPLE else None
    if total_captions is None or total_captions > OVER_LONG_SAMPLE:
        step = max(1, n // max(1, OVER_LONG_SAMPLE // 2))
    texts = [c.text for i in range(0, n, step) for c in records[i].captions]
    over = 0
    for k in range(0, len(texts), 4096):
        ids = tokenizer(texts[k : k + 4096], truncation=True, max_length=max_length + 1)["input_ids"]
        over += sum(len(x) > max_length for x in ids)
    share = over / max(1, len(texts))
    out = {"count": over, "captions": len(texts), "share": round(share, 6), "sampled": step > 1}
    if over:
        log.warning(
            "stage 1: %d of %d %scaptions (%.2f%%) are longer than stage1.max_length=%d tokens and are "
            "cut to it; raise stage1.max_length to keep them whole",
            over, len(texts), "sampled " if step > 1 else "", 100 * share, max_length,
        )  # fmt: skip
    return out
