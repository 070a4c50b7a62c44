"""llm2clip-vlm: train an LLM2CLIP vision tower end to end and use it in LLaVA-1.5-style VLMs.

The pipeline, one subpackage per layer:

- ``data``    image-caption sets, a text corpus, the synthetic demo world
- ``text``    stage 1: a decoder LLM made bidirectional and trained as a caption embedder
- ``store``   the caption embedding store (every caption encoded once, memory-mapped)
- ``vision``  stage 2: a CLIP/SigLIP vision encoder aligned to the frozen LLM; export
- ``training`` the one training loop, checkpoints, schedules and the contrastive losses

Importing the package is light: heavy modules load on first use of the names below.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> module that defines it (imported lazily, so `import llm2clip_vlm` needs no torch).
_LAZY = {
    "CaptionEncoder": "llm2clip_vlm.text.encoder",
    "LLM2CLIP": "llm2clip_vlm.vision.model",
    "LLM2CLIPVisionTower": "llm2clip_vlm.adapters.llava.tower",
    "RunConfig": "llm2clip_vlm.recipe",
}

if TYPE_CHECKING:  # pragma: no cover
    from llm2clip_vlm.adapters.llava.tower import LLM2CLIPVisionTower
    from llm2clip_vlm.recipe import RunConfig
    from llm2clip_vlm.text.encoder import CaptionEncoder
    from llm2clip_vlm.vision.model import LLM2CLIP


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llm2clip_vlm' has no attribute {name!r}")


__all__ = ["CaptionEncoder", "LLM2CLIP", "LLM2CLIPVisionTower", "RunConfig", "__version__"]
