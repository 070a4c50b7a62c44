"""The in-memory shape every image-caption reader produces and every stage consumes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

CaptionKind = Literal["short", "long"]


@dataclass(frozen=True)
class Caption:
    text: str
    kind: CaptionKind


@dataclass
class ImageCaptions:
    """One image and its group of captions (several per image allowed, typed short or long).

    ``image`` is an absolute file path, or the encoded bytes of the image (webdataset shards).
    ``source`` names where the record came from (``file:line`` or ``shard.tar:key``) for errors.
    """

    key: str
    image: str | bytes
    captions: list[Caption] = field(default_factory=list)
    source: str = ""

    def of_kind(self, kind: CaptionKind) -> list[str]:
        return [c.text for c in self.captions if c.kind == kind]

    @property
    def short(self) -> list[str]:
        return self.of_kind("short")

    @property
    def long(self) -> list[str]:
        return self.of_kind("long")


def keep_captions(records: Sequence[ImageCaptions], per_kind: int) -> list[ImageCaptions]:
    """The records with at most ``per_kind`` captions of each kind (the first ones, order kept).

    ``per_kind`` 0 keeps everything (the records themselves, not copies).
    """
    if per_kind < 0:
        raise ValueError(f"captions per kind must be >= 0, got {per_kind}")
    if per_kind == 0:
        return list(records)
    out = []
    for r in records:
        seen = {"short": 0, "long": 0}
        kept = []
        for c in r.captions:
            if seen[c.kind] < per_kind:
                seen[c.kind] += 1
                kept.append(c)
        out.append(replace(r, captions=kept))
    return out
