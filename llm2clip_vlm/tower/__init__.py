"""The exported tower: formats and loaders (LLaVA's shims are in :mod:`llm2clip_vlm.adapters.llava`).

- ``formats``          which model class loads an exported tower directory (a small registry)
- ``image_processor``  a CLIPImageProcessor-compatible view of any tower's image processor
- ``synthetic``        random towers of any format, for tests and benchmarks

Nothing here is imported by ``import llm2clip_vlm``; torch/transformers load on first use.
"""
