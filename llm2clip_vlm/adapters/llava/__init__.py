"""LLaVA-1.5 / LLaVA-NeXT: :class:`~llm2clip_vlm.adapters.llava.tower.LLM2CLIPVisionTower` (the
``CLIPVisionTower`` duck type) and :mod:`~llm2clip_vlm.adapters.llava.patch` (routes ``llm2clip:``
tower names through LLaVA's ``build_vision_tower``). See ``adapters/llava/README.md``."""
