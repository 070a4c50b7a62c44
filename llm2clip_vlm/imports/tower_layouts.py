"""Key maps for the released EVA02 and SigLIP2 LLM2CLIP towers (pure tensor renames, no I/O).

Both maps come from the official model code, not from memory:

- **EVA02-CLIP-L-14-336** (``LLM2CLIP-EVA02-L-14-336``, ``LLM2CLIP-Llama-3.2-1B-EVA02-L-14-336``):
  the vision tower is microsoft/LLM2CLIP ``llm2clip/eva_clip/eva_vit_model.py``
  (``EVAVisionTransformer`` with ``subln``, ``naiveswiglu``, ``rope``; built by
  ``eva_clip/model.py:_build_vision_tower`` with ``num_classes=embed_dim`` and
  ``use_mean_pooling=False``, so ``head`` is the image head, a ``Linear`` with bias, and ``norm``
  the final LayerNorm). Its tensors are renamed to timm's ``eva02_large_patch14_clip_336``
  (huggingface/pytorch-image-models ``timm/models/eva.py``: ``eva02_large_patch14_clip_336`` and
  the EVA-CLIP rules of ``checkpoint_filter_fn``: ``mlp.ffn_ln -> mlp.norm``,
  ``attn.inner_attn_ln -> attn.norm``, ``mlp.w1/w2/w3 -> mlp.fc1_g/fc1_x/fc2``, rotary buffers
  dropped because timm recomputes them). timm built that architecture for EVA-CLIP's own
  EVA02-L-14-336 weights, so the map is exact: same widths, SwiGLU with a sub-LayerNorm, the
  attention's inner LayerNorm, k without bias, 2-d RoPE rescaled to a 16x16 reference grid.
  The hub repos store the tower in BAAI's transformers port of EVA-CLIP (``modeling_evaclip.py``:
  ``vision_model.embeddings/encoder.layers/post_layernorm``, ``visual_projection``);
  :func:`eva_hf_to_native` renames those to ``eva_vit_model.py``'s first.
- **SigLIP2 so400m/14 @224** (``LLM2CLIP-Llama3.1-8B-siglip2-so400m-patch14-224``): the reference
  trains timm's ``vit_so400m_patch14_siglip_224.v2_webli`` through ``eva_clip/timm_model.py``
  (``TimmModel``: ``trunk`` = the timm model, ``timm_pool: map``, ``timm_proj: none``; config
  ``model_configs/Llama3.1-8B-Siglip2-So-L-14-224.json``). Its timm ``VisionTransformer``
  (``timm/models/vision_transformer.py``: no class token, ``global_pool='map'``, GELU,
  LayerNorm eps 1e-6) is exactly a transformers ``SiglipVisionModel`` with ``hidden_act="gelu"``:
  the fused ``qkv`` splits into ``q/k/v_proj``, ``pos_embed [1, N, D]`` is the position table,
  ``norm`` is ``post_layernorm``, and timm's ``AttentionPoolLatent`` (``timm/layers/attention_pool.py``:
  ``latent``, ``q``, ``kv``, ``proj``, ``norm``, ``mlp``) is the ``head``
  (``probe``, ``nn.MultiheadAttention`` with ``in_proj = [q; kv]``, ``out_proj``, ``layernorm``,
  ``mlp``). transformers' SigLIP uses tanh-GELU by default; ``hidden_act="gelu"`` is timm's erf
  GELU, so nothing is approximated.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llm2clip_vlm.imports.checkpoint import ImportRefused

# timm/models/eva.py eva02_large_patch14_clip_336: the architecture's own arguments.
EVA_ARCH = "eva02_large_patch14_clip_336"
EVA_DEFAULTS = {"img_size": 336, "patch_size": 14, "embed_dim": 1024, "depth": 24, "num_heads": 16}
EVA_MLP_RATIO = 4 * 2 / 3
# eva_clip/model_configs/EVA02-CLIP-L-14-336.json: head_width 64.
EVA_HEAD_WIDTH = 64
# timm/models/vision_transformer.py vit_so400m_patch14_siglip_224: 16 heads at width 1152.
SIGLIP_ARCH = "vit_so400m_patch14_siglip_224"
SIGLIP_HEADS = {1152: 16}

_ROPE_BUFFER = re.compile(r"(^|\.)rope\.freqs_(cos|sin)$")
# eva_vit_model.py names -> timm eva.py names (checkpoint_filter_fn's EVA-CLIP rules).
_EVA_RENAMES = (
    ("mlp.ffn_ln", "mlp.norm"),
    ("attn.inner_attn_ln", "attn.norm"),
    ("mlp.w1", "mlp.fc1_g"),
    ("mlp.w2", "mlp.fc1_x"),
    ("mlp.w3", "mlp.fc2"),
)


@dataclass
class VisionLayout:
    """One recognised vision tower inside a released checkpoint."""

    family: str  # "eva02" or "siglip"
    prefix: str  # e.g. "visual." or "visual.trunk."
    used: set[str] = field(default_factory=set)  # source tensor names consumed


def find_prefix(state: dict[str, torch.Tensor], suffix: str, also: str, where: Path) -> str | None:
    """The unique prefix ``P`` with ``P + suffix`` and ``P + also`` both in ``state`` (None: no match)."""
    found = sorted(
        name[: -len(suffix)]
        for name in state
        if name.endswith(suffix) and (name[: -len(suffix)] + also) in state
    )
    if len(found) > 1:
        raise ImportRefused(f"{where}: several vision towers ({', '.join(found)}); expected one")
    return found[0] if found else None


def detect_layout(state: dict[str, torch.Tensor], where: Path) -> VisionLayout | None:
    """EVA02 (``eva_vit_model.py`` names) or a timm MAP ViT (SigLIP2), from the tensor names."""
    eva = find_prefix(state, "patch_embed.proj.weight", "blocks.0.mlp.w1.weight", where)
    if eva is not None:
        return VisionLayout("eva02", eva)
    eva_hf = find_prefix(state, "embeddings.class_embedding", "encoder.layers.0.mlp.fc3.weight", where)
    if eva_hf is not None:
        return VisionLayout("eva02_hf", eva_hf)
    siglip = find_prefix(state, "patch_embed.proj.weight", "attn_pool.latent", where)
    if siglip is not None:
        return VisionLayout("siglip", siglip)
    return None


def _depth(names: list[str], where: Path) -> int:
    idx = {int(m.group(1)) for n in names if (m := re.match(r"blocks\.(\d+)\.", n))}
    if not idx or idx != set(range(len(idx))):
        raise ImportRefused(f"{where}: vision blocks {sorted(idx)} are not numbered 0..n-1")
    return len(idx)


def _grid(n_tokens: int, prefix_tokens: int, what: str, where: Path) -> int:
    side = math.isqrt(n_tokens - prefix_tokens)
    if side * side + prefix_tokens != n_tokens:
        raise ImportRefused(f"{where}: {what} has {n_tokens} rows, not a square grid + {prefix_tokens}")
    return side


# -- EVA02 -> timm eva02_large_patch14_clip_336 ------------------------------------------------


def eva_expected_timm_keys(depth: int) -> set[str]:
    """timm ``Eva``'s state-dict names for ``eva02_large_patch14_clip_336`` with ``num_classes=0``
    (eva.py: ``EvaAttention`` with ``qkv_fused=False`` (k_proj without bias) and
    ``scale_attn_inner`` (``attn.norm``); ``SwiGLU`` with ``scale_mlp`` (``fc1_g``, ``fc1_x``,
    ``norm``, ``fc2``); ``norm`` as the final LayerNorm for ``global_pool='token'``; rotary
    buffers are not persistent)."""
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    keys |= {"norm.weight", "norm.bias"}
    per_block = [
        "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
        "attn.q_proj.weight", "attn.q_proj.bias", "attn.k_proj.weight",
        "attn.v_proj.weight", "attn.v_proj.bias", "attn.norm.weight", "attn.norm.bias",
        "attn.proj.weight", "attn.proj.bias",
        "mlp.fc1_g.weight", "mlp.fc1_g.bias", "mlp.fc1_x.weight", "mlp.fc1_x.bias",
        "mlp.norm.weight", "mlp.norm.bias", "mlp.fc2.weight", "mlp.fc2.bias",
    ]  # fmt: skip
    for i in range(depth):
        keys |= {f"blocks.{i}.{k}" for k in per_block}
    return keys


def eva_to_timm(
    state: dict[str, torch.Tensor], layout: VisionLayout, where: Path, num_heads: int | None
) -> tuple[dict[str, torch.Tensor], dict[str, object], dict[str, torch.Tensor]]:
    """The EVA-CLIP vision tensors under ``layout.prefix`` as timm tensors.

    Returns:
        ``(timm_state, timm_model_args, image_head)``: ``model_args`` holds only what differs from
        ``eva02_large_patch14_clip_336``; ``image_head`` is ``{"weight", "bias"}`` from ``head``.
    """
    p = layout.prefix
    vision = {k[len(p) :]: v for k, v in state.items() if k.startswith(p)}
    layout.used |= {p + k for k in vision}
    if any(".attn.qkv." in k or k.endswith("attn.q_bias") for k in vision):
        raise ImportRefused(
            f"{where}: fused qkv attention under {p!r}; the EVA02-L-14-336 release uses subln "
            "(separate q/k/v projections, eva_vit_model.py Attention with subln=True)"
        )
    if "head.weight" not in vision:
        raise ImportRefused(f"{where}: tensor {p + 'head.weight'!r} (the image head) is missing")
    # The reference's head is a Linear with bias (eva_vit_model.py: nn.Linear(embed_dim, num_classes)).
    head = {part: vision.pop(f"head.{part}") for part in ("weight", "bias") if f"head.{part}" in vision}
    out: dict[str, torch.Tensor] = {}
    for name, t in vision.items():
        if _ROPE_BUFFER.search(name):
            continue  # fixed sin/cos tables: timm rebuilds them (eva.py checkpoint_filter_fn)
        for old, new in _EVA_RENAMES:
            name = name.replace(old, new)
        out[name] = t
    depth = _depth(list(out), where)
    expected = eva_expected_timm_keys(depth)
    missing, unknown = sorted(expected - set(out)), sorted(set(out) - expected)
    if missing or unknown:
        name = missing[0] if missing else unknown[0]
        for old, new in _EVA_RENAMES:  # name the tensor as the release spells it
            name = name.replace(new, old) if missing else name
        what = f"tensor {p + name!r} is missing" if missing else f"tensor {p + name!r} is unexpected"
        raise ImportRefused(
            f"{where}: {what}; the EVA02 tower does not map onto timm {EVA_ARCH} "
            f"({len(missing)} missing, {len(unknown)} unexpected)"
        )
    dim, _, patch, _ = out["patch_embed.proj.weight"].shape
    side = _grid(int(out["pos_embed"].shape[1]), 1, f"{p}pos_embed", where)
    heads = num_heads or dim // EVA_HEAD_WIDTH
    hidden = int(out["blocks.0.mlp.fc1_g.weight"].shape[0])
    shapes = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, side * side + 1, dim),
        "head.weight": (int(head["weight"].shape[0]), dim),
        "head.bias": (int(head["weight"].shape[0]),),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes |= {
            b + "attn.q_proj.weight": (dim, dim),
            b + "attn.k_proj.weight": (dim, dim),
            b + "attn.v_proj.weight": (dim, dim),
            b + "attn.norm.weight": (dim,),
            b + "attn.proj.weight": (dim, dim),
            b + "mlp.fc1_g.weight": (hidden, dim),
            b + "mlp.fc1_x.weight": (hidden, dim),
            b + "mlp.norm.weight": (hidden,),
            b + "mlp.fc2.weight": (dim, hidden),
        }
    for name, shape in shapes.items():
        if name == "head.bias" and "bias" not in head:
            continue
        t = head[name[len("head.") :]] if name.startswith("head.") else out[name]
        if tuple(t.shape) != shape:
            raise ImportRefused(f"{where}: tensor {p}{name!r} has shape {tuple(t.shape)}, expected {shape}")
    if dim % heads:
        raise ImportRefused(f"{where}: width {dim} is not divisible by {heads} heads")
    actual = {
        "img_size": side * patch,
        "patch_size": patch,
        "embed_dim": dim,
        "depth": depth,
        "num_heads": heads,
    }
    args: dict[str, object] = {k: v for k, v in actual.items() if EVA_DEFAULTS[k] != v}
    if int(dim * EVA_MLP_RATIO) != hidden:
        ratio = hidden / dim
        if int(dim * ratio) != hidden:
            raise ImportRefused(
                f"{where}: SwiGLU width {hidden} is not expressible as a timm mlp_ratio of {dim}"
            )
        args["mlp_ratio"] = ratio
    return out, args, head


# -- the hub's remote-code EVA-CLIP names -> eva_vit_model.py names ----------------------------------
# BAAI's transformers port of EVA-CLIP (modeling_evaclip.py, converted by
# convert_evaclip_pytorch_to_hf.py; the LLM2CLIP EVA02 hub repos ship both files), here as read in
# mindspore-lab/mindone's port of it (EvaCLIPVisionEmbeddings, EvaCLIPAttention,
# EvaCLIPSwiGLUMLP, EvaCLIPEncoderLayer, EvaCLIPVisionTransformer): per layer the names below;
# SwiGLU computes act(fc1(x)) * fc2(x) -> ffn_ln -> fc3, i.e. EVA-CLIP's w1, w2, w3.
_EVA_HF_LAYER = (
    ("layer_norm1.", "norm1."), ("layer_norm2.", "norm2."),
    ("self_attn.q_proj.", "attn.q_proj."), ("self_attn.k_proj.", "attn.k_proj."),
    ("self_attn.v_proj.", "attn.v_proj."), ("self_attn.out_proj.", "attn.proj."),
    ("self_attn.inner_attn_ln.", "attn.inner_attn_ln."), ("self_attn.rope.", "attn.rope."),
    ("mlp.fc1.", "mlp.w1."), ("mlp.fc2.", "mlp.w2."), ("mlp.fc3.", "mlp.w3."), ("mlp.ffn_ln.", "mlp.ffn_ln."),
)  # fmt: skip
EVA_HF_HEAD = "visual_projection."


def eva_hf_to_native(
    state: dict[str, torch.Tensor], layout: VisionLayout, where: Path
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The hub layout's vision tensors (and ``visual_projection``) renamed to ``eva_vit_model.py``'s
    under ``visual.``, plus ``{native name: hub name}`` to name tensors as the release spells them.

    Raises:
        ImportRefused: a vision tensor with no counterpart (named).
    """
    p = layout.prefix
    native: dict[str, torch.Tensor] = {}
    back: dict[str, str] = {}

    def put(name: str, src: str, t: torch.Tensor) -> None:
        native["visual." + name], back["visual." + name] = t, src

    for src, t in state.items():
        if src.startswith(EVA_HF_HEAD):
            put("head." + src[len(EVA_HF_HEAD) :], src, t)
            continue
        if not src.startswith(p):
            continue
        k = src[len(p) :]
        if k == "embeddings.class_embedding":
            put("cls_token", src, t.reshape(1, 1, -1))
        elif k == "embeddings.position_embedding.weight":
            put("pos_embed", src, t.unsqueeze(0))
        elif k == "embeddings.position_ids":
            back["visual.position_ids"] = src  # an index buffer, rebuilt by any loader
        elif k.startswith("embeddings.patch_embedding."):
            put("patch_embed.proj." + k.rsplit(".", 1)[1], src, t)
        elif k.startswith("post_layernorm."):
            put("norm." + k.rsplit(".", 1)[1], src, t)
        elif m := re.match(r"encoder\.layers\.(\d+)\.(.+)$", k):
            rest = m.group(2)
            for old, new in _EVA_HF_LAYER:
                if rest.startswith(old):
                    put(f"blocks.{m.group(1)}.{new}{rest[len(old) :]}", src, t)
                    break
            else:
                raise ImportRefused(f"{where}: tensor {src!r} has no place in an EVA02 tower")
        else:
            raise ImportRefused(f"{where}: tensor {src!r} has no place in an EVA02 tower")
    return native, back


def eva_hub_name(native: str, prefix: str) -> str:
    """``visual.<eva_vit_model.py name>`` -> the hub layout's name (for messages)."""
    k = native[len("visual.") :] if native.startswith("visual.") else native
    fixed = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding.weight"}
    if k in fixed:
        return prefix + fixed[k]
    if k.startswith("head."):
        return EVA_HF_HEAD + k[len("head.") :]
    if k.startswith("patch_embed.proj."):
        return prefix + "embeddings.patch_embedding." + k.rsplit(".", 1)[1]
    if k.startswith("norm."):
        return prefix + "post_layernorm." + k.rsplit(".", 1)[1]
    if m := re.match(r"blocks\.(\d+)\.(.+)$", k):
        for hub, ours in _EVA_HF_LAYER:
            if m.group(2).startswith(ours):
                return f"{prefix}encoder.layers.{m.group(1)}.{hub}{m.group(2)[len(ours) :]}"
    return native


# -- timm SigLIP ViT -> transformers SiglipVisionModel --------------------------------------------


def siglip_to_hf(
    state: dict[str, torch.Tensor], layout: VisionLayout, where: Path, num_heads: int | None
) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """The timm ViT tensors under ``layout.prefix`` as ``SiglipVisionModel`` tensors and config kwargs."""
    p = layout.prefix
    v = {k[len(p) :]: t for k, t in state.items() if k.startswith(p)}
    layout.used |= {p + k for k in v}
    if "cls_token" in v or "reg_token" in v:
        raise ImportRefused(f"{where}: tensor {p}cls_token: SigLIP has no class token (class_token=False)")
    if "head.weight" in v:
        raise ImportRefused(
            f"{where}: tensor {p}head.weight: the reference builds the tower with timm_proj 'none' "
            "and num_classes 0 (no classifier); refusing to drop it"
        )
    dim, _, patch, _ = v["patch_embed.proj.weight"].shape
    side = _grid(int(v["pos_embed"].shape[1]), 0, f"{p}pos_embed", where)
    depth = _depth(list(v), where)
    hidden = int(v["blocks.0.mlp.fc1.weight"].shape[0])
    heads = num_heads or SIGLIP_HEADS.get(int(dim))
    if heads is None:
        raise ImportRefused(
            f"{where}: width {dim} is not the so400m tower's 1152; give the number of attention heads (--heads)"
        )
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(src: str, shape: tuple[int, ...]) -> torch.Tensor:
        if src not in v:
            raise ImportRefused(f"{where}: tensor {p}{src!r} is missing")
        if tuple(v[src].shape) != shape:
            raise ImportRefused(
                f"{where}: tensor {p}{src!r} has shape {tuple(v[src].shape)}, expected {shape}"
            )
        used.add(src)
        return v[src]

    out["embeddings.patch_embedding.weight"] = take("patch_embed.proj.weight", (dim, 3, patch, patch))
    out["embeddings.patch_embedding.bias"] = take("patch_embed.proj.bias", (dim,))
    out["embeddings.position_embedding.weight"] = take("pos_embed", (1, side * side, dim))[0]
    for i in range(depth):
        s, d = f"blocks.{i}.", f"encoder.layers.{i}."
        for a, b in (("norm1", "layer_norm1"), ("norm2", "layer_norm2")):
            out[d + b + ".weight"] = take(s + a + ".weight", (dim,))
            out[d + b + ".bias"] = take(s + a + ".bias", (dim,))
        qw = take(s + "attn.qkv.weight", (3 * dim, dim)).chunk(3, dim=0)
        qb = take(s + "attn.qkv.bias", (3 * dim,)).chunk(3, dim=0)
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[f"{d}self_attn.{name}.weight"] = qw[j].contiguous()
            out[f"{d}self_attn.{name}.bias"] = qb[j].contiguous()
        out[d + "self_attn.out_proj.weight"] = take(s + "attn.proj.weight", (dim, dim))
        out[d + "self_attn.out_proj.bias"] = take(s + "attn.proj.bias", (dim,))
        out[d + "mlp.fc1.weight"] = take(s + "mlp.fc1.weight", (hidden, dim))
        out[d + "mlp.fc1.bias"] = take(s + "mlp.fc1.bias", (hidden,))
        out[d + "mlp.fc2.weight"] = take(s + "mlp.fc2.weight", (dim, hidden))
        out[d + "mlp.fc2.bias"] = take(s + "mlp.fc2.bias", (dim,))
    out["post_layernorm.weight"] = take("norm.weight", (dim,))
    out["post_layernorm.bias"] = take("norm.bias", (dim,))
    out["head.probe"] = take("attn_pool.latent", (1, 1, dim))
    out["head.attention.in_proj_weight"] = torch.cat(
        [take("attn_pool.q.weight", (dim, dim)), take("attn_pool.kv.weight", (2 * dim, dim))]
    )
    out["head.attention.in_proj_bias"] = torch.cat(
        [take("attn_pool.q.bias", (dim,)), take("attn_pool.kv.bias", (2 * dim,))]
    )
    out["head.attention.out_proj.weight"] = take("attn_pool.proj.weight", (dim, dim))
    out["head.attention.out_proj.bias"] = take("attn_pool.proj.bias", (dim,))
    out["head.layernorm.weight"] = take("attn_pool.norm.weight", (dim,))
    out["head.layernorm.bias"] = take("attn_pool.norm.bias", (dim,))
    out["head.mlp.fc1.weight"] = take("attn_pool.mlp.fc1.weight", (hidden, dim))
    out["head.mlp.fc1.bias"] = take("attn_pool.mlp.fc1.bias", (hidden,))
    out["head.mlp.fc2.weight"] = take("attn_pool.mlp.fc2.weight", (dim, hidden))
    out["head.mlp.fc2.bias"] = take("attn_pool.mlp.fc2.bias", (dim,))
    leftover = sorted(set(v) - used)
    if leftover:
        raise ImportRefused(
            f"{where}: tensor {p}{leftover[0]!r} has no place in a SiglipVisionModel "
            f"({len(leftover)} unknown); refusing to drop weights silently"
        )
    config = {
        "hidden_size": int(dim),
        "intermediate_size": hidden,
        "num_hidden_layers": depth,
        "num_attention_heads": int(heads),
        "image_size": side * int(patch),
        "patch_size": int(patch),
        "hidden_act": "gelu",  # timm's nn.GELU (erf), not transformers' default tanh approximation
        "layer_norm_eps": 1e-6,
        "vision_use_head": True,
    }
    return out, config
