"""Hugging Face Hub: model cards for exported towers and LLaVA models, and optional uploads.

A directory this package writes (``tower/``, a LLaVA ``model/``) holds a ``README.md`` in the
hub's model-card format (YAML metadata with ``base_model``, ``datasets``, ``license``,
``pipeline_tag``, ``tags`` and a ``model-index`` of the measured metrics), so uploading the
directory as it is makes a proper hub page. ``--push-to-hub REPO`` does that with the user's
own credentials (``hf auth login`` / ``HF_TOKEN``).
"""

from llm2clip_vlm.hub.config import HubConfig

__all__ = ["HubConfig"]
