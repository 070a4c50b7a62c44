"""The in-memory shape every image-caption reader produces and every stage consumes."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
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


def keep_captions(records: Sequence[ImageCaptions], per_kind: int) -> Sequence[ImageCaptions]:
    """The records with at most ``per_kind`` captions of each kind (the first ones, order kept).

    ``per_kind`` 0 keeps everything (the records themselves, not copies). Otherwise a view that
    cuts each record when it is accessed: a data set of millions of records is not copied.
    """
    if per_kind < 0:
        raise ValueError(f"captions per kind must be >= 0, got {per_kind}")
    if per_kind == 0:
        return records
    return KeptCaptions(records, per_kind)


class KeptCaptions(Sequence[ImageCaptions]):
    """``records`` with at most ``per_kind`` captions of each kind, cut on access."""

    def __init__(self, records: Sequence[ImageCaptions], per_kind: int) -> None:
        self.records, self.per_kind = records, per_kind

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> ImageCaptions:  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]  # type: ignore[return-value]
        r = self.records[i]
        seen = {"short": 0, "long": 0}
        kept = []
        for c in r.captions:
            if seen[c.kind] < self.per_kind:
                seen[c.kind] += 1
                kept.append(c)
        return replace(r, captions=kept)

    def __iter__(self) -> Iterator[ImageCaptions]:
        for i in range(len(self)):
            yield self[i]
