"""The caption embedding store's public interface (stage 2 and ``embed`` import from here).

- :func:`write_store` encodes every caption of a data set once (sharded, resumable, multi-process).
- :class:`EmbeddingStore` opens one memory-mapped, refusing it with :class:`StoreMismatchError`
  when it does not match the data, the embedder or itself.
"""

from __future__ import annotations

from llm2clip_vlm.store.format import StoreInputError
from llm2clip_vlm.store.reader import EmbeddingStore, StoreConflictError, StoreMismatchError
from llm2clip_vlm.store.writer import write_store

# Stores are written from any sequence of ImageCaptions (e.g. the data layer's data.CaptionSet).
__all__ = ["EmbeddingStore", "StoreConflictError", "StoreInputError", "StoreMismatchError", "write_store"]
