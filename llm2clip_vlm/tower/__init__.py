"""The exported tower as a LLaVA vision encoder: ``LLM2CLIPVisionTower`` and the LLaVA shims.

- ``llava_tower``      :class:`LLM2CLIPVisionTower`, LLaVA-1.5's ``CLIPVisionTower`` duck type
- ``backbones``        which model class loads an exported tower directory (a small registry)
- ``image_processor``  a CLIPImageProcessor-compatible view of any tower's image processor
- ``llava_patch``      routes ``llm2clip:`` tower names through LLaVA's ``build_vision_tower``

Nothing here is imported by ``import llm2clip_vlm``; torch/transformers load on first use.
"""
