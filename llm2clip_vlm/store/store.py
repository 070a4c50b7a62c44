"""The caption embedding store's public interface (stage 2 and ``embed`` import from here).

- :func:`write_store` encodes every caption of a data set once (sharded, resumable, multi-process).
- :class:`EmbeddingStore` opens one memory-mapped, refusing it with :class:`StoreMismatchError`
  when it does not match the data, the embedder or itself.
"""

from __future__ import annotations

from collections.abc import Sequence

from llm2clip_vlm.data.records import ImageCaptions
from llm2clip_vlm.store.format import StoreInputError
from llm2clip_vlm.store.reader import EmbeddingStore, StoreMismatchError
from llm2clip_vlm.store.writer import write_store

# The data layer's CaptionSet is a sequence of ImageCaptions; any such sequence works here.
CaptionSet = Sequence[ImageCaptions]

__all__ = ["CaptionSet", "EmbeddingStore", "StoreInputError", "StoreMismatchError", "write_store"]
