"""LLaVA-1.5 on top of an LLM2CLIP tower, in transformers' own ``LlavaForConditionalGeneration`` format.

- ``assemble``  :func:`~llm2clip_vlm.llava.assemble.build_llava_model`: tower + causal LM -> LLaVA-1.5
"""
