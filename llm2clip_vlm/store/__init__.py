"""The caption embedding store: every caption encoded once by the frozen stage-1 LLM.

``from llm2clip_vlm.store.store import EmbeddingStore, write_store`` (the writer needs torch; the
reader only numpy).
"""
