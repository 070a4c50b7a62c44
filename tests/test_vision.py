"""Stage-2 model parts: backbone registry, adaptor architecture, LLM2CLIP, optimiser groups."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from llm2clip_vlm import config_io
from llm2clip_vlm.recipe import RunConfig
from llm2clip_vlm.vision.adaptor import ResidualMLPBlock, TextAdaptor
from llm2clip_vlm.vision.backbones import create_backbone, known_backbones
from llm2clip_vlm.vision.config import VisionBackboneConfig
from llm2clip_vlm.vision.model import LLM2CLIP, LLM2CLIPConfig
from llm2clip_vlm.vision.train import build_param_groups

TINY = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_layers": 2, "num_heads": 2}


def tiny_backbone(kind: str, **kw: object) -> VisionBackboneConfig:
    return VisionBackboneConfig(kind=kind, **{**TINY, **kw})  # type: ignore[arg-type]


def test_registry_lists_known_backbones_on_unknown_name() -> None:
    assert {"clip", "siglip", "timm"} <= set(known_backbones())
    with pytest.raises(ValueError, match="known: clip, siglip, timm"):
        create_backbone(dataclasses.replace(tiny_backbone("clip"), kind="resnet"))  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_every_transformers_backbone_forward_backward_and_roundtrip(kind: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    bb = create_backbone(tiny_backbone(kind))
    assert bb.kind == kind and bb.hidden_size == 32 and bb.num_layers == 2 and bb.image_size == 32
    x = torch.randn(3, 3, 32, 32)
    feats = bb(x)
    assert feats.shape == (3, 32) and torch.isfinite(feats).all()
    feats.square().sum().backward()
    no_grad = [n for n, p in bb.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"parameters without gradient: {no_grad}"
    # Layer ids: stem 0, block i -> i + 1, the rest after the last block; every parameter has one.
    ids = bb.layer_ids()
    assert set(ids) == {n for n, _ in bb.named_parameters()}
    assert ids["model.embeddings.patch_embedding.weight"] == 0
    assert ids["model.encoder.layers.0.mlp.fc1.weight"] == 1
    assert ids["model.encoder.layers.1.mlp.fc1.weight"] == 2
    assert ids["model.post_layernorm.weight"] == 3
    # Saved in its own format and reloaded by the registry from the directory.
    bb.save_pretrained(tmp_path / kind)
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {
        p.name for p in (tmp_path / kind).iterdir()
    }
    again = create_backbone(VisionBackboneConfig(kind=kind, name_or_path=str(tmp_path / kind)))
    with torch.no_grad():
        assert torch.allclose(again(x), bb(x), atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    bb = create_backbone(tiny_backbone("clip"))
    x = torch.randn(2, 3, 32, 32)
    bb.train()
    bb(x).sum().backward()
    ref = {n: p.grad.clone() for n, p in bb.named_parameters()}
    bb.zero_grad()
    bb.set_grad_checkpointing(True)
    assert bb.model.is_activation_checkpointing
    bb(x).sum().backward()
    for n, p in bb.named_parameters():
        assert torch.allclose(p.grad, ref[n], atol=1e-6), n


def test_timm_backbone_is_optional() -> None:
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="timm"):
            create_backbone(VisionBackboneConfig(kind="timm", name_or_path="vit_tiny_patch16_224"))
    else:  # pragma: no cover - timm installed: the random-name error still names the problem
        with pytest.raises(ValueError, match="name_or_path"):
            create_backbone(VisionBackboneConfig(kind="timm"))


def test_adaptor_is_exactly_the_reference_architecture() -> None:
    torch.manual_seed(0)
    d, e = 16, 8
    ad = TextAdaptor(d, e, num_blocks=4)
    assert len(ad.blocks) == 4
    for block in ad.blocks:
        assert isinstance(block, ResidualMLPBlock)
        assert (block.fc1.in_features, block.fc1.out_features) == (d, 2 * d)
        assert (block.fc2.in_features, block.fc2.out_features) == (2 * d, d)
        assert isinstance(block.norm, nn.LayerNorm) and isinstance(block.act, nn.GELU)
    # The last Linear has a bias, as the reference TextProj(proj_bias=True)
    # (microsoft/LLM2CLIP llm2clip/eva_clip/model.py:232,238).
    assert isinstance(ad.norm, nn.LayerNorm) and ad.proj.bias is not None
    assert (ad.proj.in_features, ad.proj.out_features) == (d, e)
    assert sorted(k for k in ad.state_dict() if not k.startswith("blocks.")) == [
        "norm.bias",
        "norm.weight",
        "proj.bias",
        "proj.weight",
    ]

    x = torch.randn(5, d) * 7.0
    # The same computation written out: normalise, 4 pre-norm residual MLPs, norm, project.
    h = x / x.norm(dim=-1, keepdim=True)
    for b in ad.blocks:
        h = h + b.fc2(torch.nn.functional.gelu(b.fc1(b.norm(h))))
    expected = ad.proj(ad.norm(h))
    assert torch.allclose(ad(x), expected, atol=1e-6)
    # Only the direction of the LLM embedding matters.
    assert torch.allclose(ad(x * 3.0), ad(x), atol=1e-5)


def _tiny_model(loss: str = "clip") -> LLM2CLIP:
    torch.manual_seed(0)
    return LLM2CLIP(LLM2CLIPConfig(backbone=tiny_backbone("clip"), text_dim=24, embed_dim=16, loss=loss))


def test_model_forward_features_and_roundtrip(tmp_path: Path) -> None:
    model = _tiny_model()
    assert model.image_head.in_features == 32 and model.image_head.out_features == 16
    assert model.image_head.bias is None
    assert abs(model.logit_scale.item() - math.log(1 / 0.07)) < 1e-6 and model.logit_bias is None
    px, emb = torch.randn(4, 3, 32, 32), torch.randn(4, 24)
    out = model(pixel_values=px, text_embeddings=emb)
    assert out["image_features"].shape == (4, 16) and out["text_features"].shape == (4, 16)
    assert torch.allclose(out["image_features"].norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(out["text_features"].norm(dim=-1), torch.ones(4), atol=1e-5)
    assert abs(float(out["logit_scale"]) - 1 / 0.07) < 1e-4
    with pytest.raises(ValueError, match="width 7"):
        model.get_text_features_from_embeddings(torch.randn(2, 7))
    with pytest.raises(ValueError, match="stage-1 encoder"):
        model.get_text_features(["a red square"])

    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "vision" / "config.json").is_file()
    again = LLM2CLIP.from_pretrained(tmp_path / "m")
    out2 = again(pixel_values=px, text_embeddings=emb)
    for k in ("image_features", "text_features", "logit_scale"):
        assert torch.allclose(out[k], out2[k], atol=1e-6), k


def test_logit_scale_clamp_and_siglip_bias() -> None:
    model = _tiny_model()
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
    model.clamp_logit_scale()
    assert abs(float(model.logit_scale) - math.log(100)) < 1e-6
    sig = _tiny_model("siglip")
    assert float(sig.logit_bias) == -10.0
    assert "logit_bias" in sig(text_embeddings=torch.randn(2, 24))


def test_param_groups_weight_decay_and_layer_decay_are_exact() -> None:
    cfg = config_io.load(RunConfig, None, ["stage2.lr=1e-3", "stage2.head_lr=5e-3"])
    model = _tiny_model()
    groups = build_param_groups(model, cfg.stage2)
    by_param = {id(p): g for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert len(by_param) == len(names)  # every parameter in exactly one group
    lr, decay, top = 1e-3, 0.85, 3  # 2 blocks: stem 0, blocks 1-2, top 3
    expected_layer = {
        "vision.model.embeddings.patch_embedding.weight": 0,
        # The reference's name rules give OpenAI's class_embedding and ln_pre the full rate.
        "vision.model.embeddings.class_embedding": 3,
        "vision.model.pre_layrnorm.weight": 3,
        "vision.model.encoder.layers.0.self_attn.q_proj.weight": 1,
        "vision.model.encoder.layers.1.mlp.fc2.bias": 2,
        "vision.model.post_layernorm.bias": 3,
    }
    for name, layer in expected_layer.items():
        g = by_param[id(names[name])]
        assert g["lr"] == pytest.approx(lr * decay ** (top - layer), rel=1e-12), name
    for name in (
        "image_head.weight",
        "text_adaptor.proj.weight",
        "logit_scale",
        "text_adaptor.blocks.0.fc1.bias",
    ):
        assert by_param[id(names[name])]["lr"] == 5e-3, name
    for name, p in names.items():
        wd = by_param[id(p)]["weight_decay"]
        is_norm_or_bias = name.endswith("bias") or "norm" in name or "layrnorm" in name
        # Positional and class embeddings are exempt, as the reference's no_weight_decay()
        # {'pos_embed', 'cls_token'} (microsoft/LLM2CLIP llm2clip/eva_clip/eva_vit_model.py:550-551).
        embeddings = (
            "vision.model.embeddings.class_embedding",
            "vision.model.embeddings.position_embedding.weight",
        )
        if is_norm_or_bias or name in ("logit_scale", *embeddings):
            assert wd == 0.0, name
        else:
            assert wd == 0.05, name


def test_positional_and_class_embeddings_are_exempt_from_weight_decay() -> None:
    from llm2clip_vlm.vision.decay import exempt_from_weight_decay

    w2, w1 = nn.Parameter(torch.zeros(4, 4)), nn.Parameter(torch.zeros(4))
    # EVA / timm names (the reference's no_weight_decay() = {'pos_embed', 'cls_token'}), 3-d.
    assert exempt_from_weight_decay("vision.model.pos_embed", nn.Parameter(torch.zeros(1, 5, 4)))
    assert exempt_from_weight_decay("vision.model.cls_token", nn.Parameter(torch.zeros(1, 1, 4)))
    # transformers CLIP / SigLIP names: a 2-d nn.Embedding weight.
    assert exempt_from_weight_decay("vision.model.embeddings.position_embedding.weight", w2)
    assert exempt_from_weight_decay("anything.bias", w2) and exempt_from_weight_decay("x.weight", w1)
    assert not exempt_from_weight_decay("vision.model.embeddings.patch_embedding.weight", w2)
    assert not exempt_from_weight_decay("vision.model.blocks.0.attn.qkv.weight", w2)


# transformers' CLIPVisionModel name -> the OpenAI ViT name the reference trains (its
# eva_clip/transformer.py VisionTransformer, under "visual.").
OPENAI_NAMES = [
    ("model.embeddings.patch_embedding.", "conv1."),
    ("model.embeddings.class_embedding", "class_embedding"),
    ("model.embeddings.position_embedding.weight", "positional_embedding"),
    ("model.pre_layrnorm.", "ln_pre."),
    ("model.encoder.layers.", "transformer.resblocks."),
    ("model.post_layernorm.", "ln_post."),
]


def test_clip_layer_ids_equal_the_reference_name_rules() -> None:
    """Every CLIP parameter's layer id equals the reference's ``get_num_layer_for_transformer``
    (a copy in tests/reference_llm2clip.py) on its OpenAI name."""
    from reference_llm2clip import get_num_layer_for_transformer

    bb = create_backbone(tiny_backbone("clip"))
    ids = bb.layer_ids()
    for name, layer in ids.items():
        ref_name = name
        for ours, theirs in OPENAI_NAMES:
            ref_name = ref_name.replace(ours, theirs)
        assert ref_name != name, f"no OpenAI name for {name}"
        # num_max_layer = blocks + 2 (LayerDecayValueAssigner's list, training/optim.py:146)
        assert layer == get_num_layer_for_transformer("visual." + ref_name, bb.num_layers + 2), name


@pytest.mark.parametrize("head", ["linear_bias", "none"])
def test_image_head_kinds_roundtrip(head: str, tmp_path: Path) -> None:
    """EVA's head has a bias (llm2clip/eva_clip/eva_vit_model.py:431); the reference's SigLIP2
    tower has none (timm ``proj: none``, model_configs/Llama3.1-8B-Siglip2-So-L-14-224.json)."""
    torch.manual_seed(0)
    embed = 32 if head == "none" else 16  # no head: the tower's width is the shared width
    model = LLM2CLIP(
        LLM2CLIPConfig(backbone=tiny_backbone("siglip"), text_dim=24, embed_dim=embed, image_head=head)
    )
    if head == "none":
        assert isinstance(model.image_head, torch.nn.Identity)
        assert not any(k.startswith("image_head") for k in model.head_state_dict())
    else:
        assert model.image_head.bias is not None and torch.count_nonzero(model.image_head.bias) == 0
        with torch.no_grad():
            model.image_head.bias.fill_(0.5)
    px = torch.randn(2, 3, 32, 32)
    model.save_pretrained(tmp_path / "m")
    again = LLM2CLIP.from_pretrained(tmp_path / "m")
    assert again.config.image_head == head
    with torch.no_grad():
        assert torch.allclose(again.get_image_features(px), model.get_image_features(px), atol=1e-6)
    with pytest.raises(ValueError, match="needs the tower width"):
        LLM2CLIP(
            LLM2CLIPConfig(backbone=tiny_backbone("siglip"), text_dim=24, embed_dim=16, image_head="none")
        )
