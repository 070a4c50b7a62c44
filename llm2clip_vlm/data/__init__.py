"""Data: image-caption sets (manifests, webdataset shards), a text corpus, the synthetic demo world."""

from llm2clip_vlm.data.captions import (
    CaptionSet,
    load_caption_set,
    load_caption_sets,
    open_image,
    resolve_data,
)
from llm2clip_vlm.data.errors import DataError
from llm2clip_vlm.data.records import Caption, ImageCaptions

__all__ = [
    "Caption",
    "CaptionSet",
    "DataError",
    "ImageCaptions",
    "load_caption_set",
    "load_caption_sets",
    "open_image",
    "resolve_data",
]
