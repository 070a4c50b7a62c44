"""The lmms-eval registration of ``llm2clip_llava``, loaded through the ``lmms_eval.models`` entry point.

lmms-eval (>= 0.5) builds its model registry from its own table plus every entry point of the
group ``lmms_eval.models``; a payload may be a ``ModelManifest`` or a callable returning one. A
callable keeps this module free of lmms-eval imports until lmms-eval itself asks. ``@register_model``
alone would not do: lmms-eval resolves ``--model`` names through the manifests, not that decorator.
"""

from __future__ import annotations

from typing import Any

MODEL_ID = "llm2clip_llava"
CLASS_PATH = "llm2clip_vlm.evaluation.lmms_model.LLM2CLIPLlava"


def manifests() -> list[Any]:
    """The manifests lmms-eval registers for this package (called by lmms-eval)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)]


__all__ = ["CLASS_PATH", "MODEL_ID", "manifests"]
