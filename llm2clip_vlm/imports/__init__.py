"""The released LLM2CLIP models as inputs: converters that read tensors and configs only.

- :mod:`.tower`: a released tower checkpoint (``LLM2CLIP-Openai-*``) -> a transformers
  ``CLIPVisionModel`` directory + a stage-2 checkpoint (image head, text adaptor, logit scale);
- :mod:`.encoder`: a llm2vec-style stage-1 LLM (a merged checkpoint, or a base plus PEFT adapters
  merged in order) -> a ``CaptionEncoder`` directory;
- :mod:`.sidecar`: the official ``*_text_embeddings.tar`` side-cars -> an embedding store.

[IMPORTANT] Nothing here runs a checkpoint's code: no ``trust_remote_code``, no pickle. Tensors
come from safetensors files, settings from JSON; anything unexpected is refused with
:class:`~llm2clip_vlm.imports.checkpoint.ImportRefused`, naming the tensor or key.
"""
