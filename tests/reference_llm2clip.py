"""Oracle: the reference adaptor, copied from microsoft/LLM2CLIP (MIT License, Copyright (c)
Microsoft Corporation), ``llm2clip/eva_clip/model.py:217-253`` (``LinearBlock``, ``TextProj``) and
``llm2clip/eva_clip/transformer.py:52-58`` (``LayerNorm``). Pure torch; only the lock/checkpointing
helpers are left out. Importing the reference package itself needs apex/xformers/timm."""

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.LayerNorm):
    """Subclass torch's LayerNorm (with cast back to input dtype)."""

    def forward(self, x: torch.Tensor):
        orig_type = x.dtype
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.to(orig_type)


class LinearBlock(nn.Module):
    def __init__(self, dim, expansion_factor=4, dropout=0.0, norm_layer=LayerNorm):
        super().__init__()
        self.fn = nn.Sequential(
            nn.Linear(dim, int(expansion_factor * dim)),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(int(expansion_factor * dim), dim),
        )
        self.ln = norm_layer(dim)

    def forward(self, x):
        return x + self.fn(self.ln(x))


class TextProj(nn.Module):
    def __init__(self, embedding_dim=4096, output_dim=512, expansion_factor=2, num_layers_text=4, proj_bias=True, dropout=0, norm_layer=LayerNorm):  # fmt: skip
        super().__init__()
        self.embedding_dim = embedding_dim
        self.text_adaptor = nn.Sequential(
            *[LinearBlock(embedding_dim, expansion_factor, dropout) for _ in range(num_layers_text)],
            nn.LayerNorm(embedding_dim),
            nn.Linear(embedding_dim, output_dim, bias=proj_bias),
        )

    def forward(self, text, return_all_features: bool = False, l2_norm: bool = True):
        if l2_norm:
            text = torch.nn.functional.normalize(text, p=2, dim=-1)
        x = self.text_adaptor(text)
        return x


# microsoft/LLM2CLIP llm2clip/training/optim.py:18-45 at commit
# cba3b45ba3d9bdaaf8ad640156dedbdbcb60353a (MIT License, Microsoft): the layer id of a parameter
# for layer-wise lr decay, copied unchanged.
import re  # noqa: E402


def get_num_layer_for_transformer(param_name, num_max_layer):
    layer_0 = {
        "patch_embed",
        "pos_embed",
        "cls_token",
        "mask_token",
        "conv1",
        "positional_embedding",
        "token_embedding",
        "transformer.embeddings.word_embeddings",
        "transformer.embeddings.position_embeddings",
        "transformer.embeddings.token_type_embeddings",
    }

    if any(l in param_name for l in layer_0):  # noqa: E741
        return 0

    block_regex = re.compile(r"blocks\.([0-9]+)\.")
    match_block = block_regex.search(param_name)

    # huggingface->text.transformer.encoder.layer
    layer_regex = re.compile(r"layer\.([0-9]+)\.")
    match_layer = layer_regex.search(param_name)
    if match_block is not None:
        return int(match_block.group(1)) + 1
    elif match_layer is not None:
        return int(match_layer.group(1)) + 1
    else:
        return num_max_layer - 1
