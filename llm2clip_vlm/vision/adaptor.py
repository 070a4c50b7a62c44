"""The text-side adaptor of LLM2CLIP and the new image head.

The adaptor maps a frozen stage-1 caption embedding (width d = the LLM's hidden size) into the
shared CLIP space, exactly as the reference implementation does:

    x = normalize(e)                                          # L2
    x = x + Linear(2d->d)(GELU(Linear(d->2d)(LayerNorm(x))))  # x 4 residual blocks
    y = Linear(d->embed_dim, with bias)(LayerNorm(x))

The image head replaces the encoder's original projection (discarded): a freshly initialised
``Linear(hidden -> embed_dim)`` without bias, CLIP-style.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResidualMLPBlock(nn.Module):
    """``x + Linear(2d->d)(GELU(Linear(d->2d)(LayerNorm(x))))`` (pre-norm, expansion 2)."""

    def __init__(self, dim: int, expansion: int = 2) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, expansion * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(expansion * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class TextAdaptor(nn.Module):
    """L2-normalise, ``num_blocks`` residual MLP blocks, LayerNorm, projection to ``embed_dim``."""

    def __init__(self, text_dim: int, embed_dim: int, num_blocks: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ResidualMLPBlock(text_dim) for _ in range(num_blocks))
        self.norm = nn.LayerNorm(text_dim)
        # With a bias, as the reference: TextProj(..., proj_bias=True) ends in
        # nn.Linear(embedding_dim, output_dim, bias=proj_bias) (microsoft/LLM2CLIP
        # llm2clip/eva_clip/model.py:232,238), so the released adaptor weights load as they are.
        self.proj = nn.Linear(text_dim, embed_dim, bias=True)

    def forward(self, text_embeddings: torch.Tensor) -> torch.Tensor:
        # The LLM embedding's norm carries no meaning (mean pooling); only its direction is used.
        x = F.normalize(text_embeddings, dim=-1)
        for block in self.blocks:
            x = block(x)
        return self.proj(self.norm(x))


def new_image_head(hidden_size: int, embed_dim: int, kind: str = "linear") -> nn.Module:
    """The re-initialised image head on the pooled features.

    ``linear``: ``hidden -> embed_dim`` without bias (OpenAI CLIP's ``proj``; CLIP's init, std
    ``hidden**-0.5``); ``linear_bias``: with a (zero-initialised) bias, as EVA's ``head``
    (microsoft/LLM2CLIP llm2clip/eva_clip/eva_vit_model.py:431, ``nn.Linear(embed_dim, num_classes)``);
    ``none``: the pooled feature itself, as the reference's SigLIP2 tower (timm ``proj: none``,
    llm2clip/eva_clip/model_configs/Llama3.1-8B-Siglip2-So-L-14-224.json; needs
    ``hidden == embed_dim``).
    """
    if kind == "none":
        if hidden_size != embed_dim:
            raise ValueError(
                f"image_head 'none' needs the tower width ({hidden_size}) to equal embed_dim ({embed_dim})"
            )
        return nn.Identity()
    if kind not in ("linear", "linear_bias"):
        raise ValueError(f"image_head must be 'linear', 'linear_bias' or 'none', not {kind!r}")
    head = nn.Linear(hidden_size, embed_dim, bias=kind == "linear_bias")
    nn.init.normal_(head.weight, std=hidden_size**-0.5)
    if head.bias is not None:
        nn.init.zeros_(head.bias)
    return head
