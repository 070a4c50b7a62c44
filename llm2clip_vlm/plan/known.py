"""Model configs for planning, with no download: a local directory's ``config.json``, the hub
cache, or the reference models' configs that ship with the package (``plan/known/*.json``).

The shipped files are the hub ``config.json`` of each reference model (for the vision encoders,
their ``vision_config``): Meta-Llama-3-8B(-Instruct), Llama-3.2-1B(-Instruct), Vicuna-7B-v1.5,
OpenAI CLIP ViT-L/14-336 and SigLIP2 so400m/14 at 384 and 224 px (the same weights' shapes). A recipe names a model by hub id or by a local
path (``checkpoints/vicuna-7b-v1.5``); a path that does not exist yet is matched by its last part.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from llm2clip_vlm.text.modeling import resolve_model_ref

# Last path part of a model reference (lower case) -> shipped config file.
KNOWN = {
    "meta-llama-3-8b": "llama-3-8b.json",
    "meta-llama-3-8b-instruct": "llama-3-8b.json",
    "llama-3.2-1b": "llama-3.2-1b.json",
    "llama-3.2-1b-instruct": "llama-3.2-1b.json",
    "vicuna-7b-v1.5": "vicuna-7b-v1.5.json",
    "clip-vit-large-patch14-336": "clip-vit-large-patch14-336.json",
    "siglip2-so400m-patch14-384": "siglip2-so400m-patch14-384.json",
    "siglip2-so400m-patch14-224": "siglip2-so400m-patch14-224.json",
    # The README's `import-encoder` output (Llama-3-8B-Instruct + LLM2Vec's adapters, merged), which
    # the QLoRA stage-1 recipe starts from: Llama-3-8B's architecture.
    "llm2vec-llama3-8b": "llama-3-8b.json",
}
# timm model names the package builds without a config file (timm knows their architecture).
TIMM_PREFIXES = ("eva02_", "vit_")


class UnknownModelError(ValueError):
    """A model whose config is neither local, nor cached, nor shipped."""


def known_config_path(name: str) -> Path | None:
    """The shipped config for a reference model's id or path, None if there is none."""
    key = name.rstrip("/").split("/")[-1].lower()
    if key not in KNOWN:
        return None
    return Path(str(resources.files("llm2clip_vlm") / "plan" / "known" / KNOWN[key]))


def load_config(name: str, *, vision: bool = False) -> Any:
    """A transformers config for ``name`` (local directory, ``.gguf``, builtin, hub id or path).

    Args:
        vision: return the ``vision_config`` of a full CLIP/SigLIP config.

    Raises:
        UnknownModelError: nothing local, cached or shipped describes ``name``.
    """
    from transformers import AutoConfig

    config = None
    path = Path(name).expanduser()
    if name.startswith("builtin:") or name.endswith(".gguf") or (path / "config.json").is_file():
        ref = resolve_model_ref(name)
        config = AutoConfig.from_pretrained(ref.path, **ref.kwargs())
    elif (shipped := known_config_path(name)) is not None:
        raw = json.loads(shipped.read_text())
        config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    else:
        try:  # a hub id already in the local cache
            config = AutoConfig.from_pretrained(name, local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError) as e:
            raise UnknownModelError(
                f"model {name!r}: no config.json there, none in the hub cache, and not one of the "
                f"reference models plan knows ({', '.join(sorted(KNOWN))}); download its config.json "
                "(huggingface-cli download NAME config.json) or point the recipe at a local directory"
            ) from e
    if vision and hasattr(config, "vision_config"):
        config = config.vision_config
    return config


def is_timm_name(name: str) -> bool:
    return name.split(".")[0].startswith(TIMM_PREFIXES)
