"""Which stage-2 parameters are exempt from weight decay, as in the reference trainer.

The reference (microsoft/LLM2CLIP ``llm2clip/training/optim.py:97``) decays a parameter unless
``param.ndim <= 1``, its name ends in ``.bias``, or the tower lists it in ``no_weight_decay()``;
EVA's tower lists ``{'pos_embed', 'cls_token'}`` (``llm2clip/eva_clip/eva_vit_model.py:550-551``).
The same embeddings carry other names in the other backbones we train: transformers' CLIP and
SigLIP call them ``embeddings.position_embedding`` (a 2-d ``nn.Embedding`` weight) and
``embeddings.class_embedding``.
"""

from __future__ import annotations

from torch import nn

# Module / parameter names (one dotted component) of positional and class embeddings.
EMBEDDING_NAMES = frozenset({"pos_embed", "cls_token", "position_embedding", "class_embedding"})


def exempt_from_weight_decay(name: str, param: nn.Parameter) -> bool:
    """True for biases, norm scales and other 0/1-d parameters, and positional/class embeddings."""
    if param.ndim <= 1 or name.endswith(".bias"):
        return True
    return any(part in EMBEDDING_NAMES for part in name.split("."))
