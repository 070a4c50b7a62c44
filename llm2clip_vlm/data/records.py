"""The in-memory shape every image-caption reader produces and every stage consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
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
