"""timm-backed towers, against a fake ``timm`` module (timm is not installed on the test machines).

The fake implements the two timm entry points the loader uses — ``create_model(architecture)``
and ``create_model("local-dir:<dir>", pretrained=True)`` reading timm's hub ``config.json`` and
``model.safetensors`` — and a tiny ViT with timm's attribute names (``patch_embed.img_size``,
``patch_embed.patch_size``, ``blocks``, ``num_prefix_tokens``, ``forward_features``). It shows the
hook-based hidden states map onto transformers' convention; it does not prove real timm models.
"""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

FAKE_TIMM = """
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn


class PatchEmbed(nn.Module):
    def __init__(self, img_size, patch_size, dim):
        super().__init__()
        self.img_size, self.patch_size = (img_size, img_size), (patch_size, patch_size)
        self.proj = nn.Conv2d(3, dim, patch_size, patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x):
        return x + self.fc(self.norm(x))


class TinyViT(nn.Module):
    def __init__(self, img_size=32, patch_size=8, embed_dim=16, depth=3, reg_tokens=0, num_classes=0):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim))
        self.reg_token = nn.Parameter(torch.randn(1, reg_tokens, embed_dim)) if reg_tokens else None
        self.num_prefix_tokens = 1 + reg_tokens
        n = (img_size // patch_size) ** 2 + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.randn(1, n, embed_dim))
        self.blocks = nn.Sequential(*[Block(embed_dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.embed_dim = self.num_features = embed_dim

    def embed(self, x):
        x = self.patch_embed(x)
        prefix = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(x.shape[0], -1, -1))
        return torch.cat([*prefix, x], dim=1) + self.pos_embed

    def forward_features(self, x):
        return self.norm(self.blocks(self.embed(x)))


ARCHS = {"tiny_vit_test": {}, "tiny_vit_reg_test": {"reg_tokens": 2}}


def create_model(name, pretrained=False, num_classes=0, **kwargs):
    if name.startswith("local-dir:"):
        path = Path(name[len("local-dir:"):])
        cfg = json.loads((path / "config.json").read_text())
        model = TinyViT(**ARCHS[cfg["architecture"]], **cfg.get("model_args", {}))
        if pretrained:
            model.load_state_dict(load_file(str(path / "model.safetensors")))
        return model
    return TinyViT(**ARCHS[name], **kwargs)
"""


@pytest.fixture
def fake_timm(tmp_path: Path) -> Iterator[object]:
    root = tmp_path / "site"
    (root / "timm").mkdir(parents=True)
    (root / "timm" / "__init__.py").write_text(textwrap.dedent(FAKE_TIMM))
    sys.path.insert(0, str(root))
    sys.modules.pop("timm", None)
    try:
        import timm

        yield timm
    finally:
        sys.path.remove(str(root))
        sys.modules.pop("timm", None)


def _save_timm_tower(timm: object, path: Path, architecture: str) -> torch.nn.Module:
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor

    torch.manual_seed(7)
    model = timm.create_model(architecture)  # type: ignore[attr-defined]
    path.mkdir(parents=True)
    # timm's hub format, as timm.models.save_for_hf writes it, plus the CLIP processor stage 2 adds.
    cfg = {
        "architecture": architecture,
        "num_classes": 0,
        "num_features": 16,
        "pretrained_cfg": {"input_size": [3, 32, 32]},
    }
    (path / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        path
    )
    return model.eval()


@pytest.mark.parametrize("select_feature", ["patch", "cls_patch"])
@pytest.mark.parametrize(("architecture", "prefix"), [("tiny_vit_test", 1), ("tiny_vit_reg_test", 3)])
def test_timm_tower_matches_block_outputs(
    fake_timm: object, tmp_path: Path, architecture: str, prefix: int, select_feature: str
) -> None:
    from llm2clip_vlm import LLM2CLIPVisionTower

    model = _save_timm_tower(fake_timm, tmp_path / "tower", architecture)
    args = SimpleNamespace(mm_vision_select_layer=-2, mm_vision_select_feature=select_feature)
    tower = LLM2CLIPVisionTower(f"llm2clip:{tmp_path / 'tower'}", args, delay_load=True)
    assert (tower.hidden_size, tower.image_size, tower.num_patches_per_side) == (16, 32, 4)  # before weights
    tower.load_model()
    assert tower.image_processor.crop_size["height"] == 32
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # hidden_states[-2] of a 3-block model = the output of block 1 (index 0 = the embeddings).
        expected = model.blocks[:2](model.embed(images))
        first = model.embed(images)
    keep = prefix if select_feature == "patch" else 0
    feats = tower(images)
    assert feats.shape == (2, tower.tokens_per_image, 16)
    assert tower.tokens_per_image == 16 + (prefix if select_feature == "cls_patch" else 0)
    assert tower.num_patches == 16  # LLaVA-1.5's contract, every select mode
    assert torch.equal(feats, expected[:, keep:])
    assert all(not p.requires_grad for p in tower.parameters())
    # Layer 0 is the embeddings, as in transformers.
    tower0 = LLM2CLIPVisionTower(str(tmp_path / "tower"), SimpleNamespace(mm_vision_select_layer=0))
    assert torch.equal(tower0(images), first[:, prefix:])


def test_timm_tower_is_refused_by_llava_assembly(fake_timm: object, tmp_path: Path) -> None:
    from llm2clip_vlm.llava.assemble import build_llava_model

    _save_timm_tower(fake_timm, tmp_path / "tower", "tiny_vit_test")
    with pytest.raises(ValueError, match="timm tower is not a transformers vision model"):
        build_llava_model(tmp_path / "tower", tmp_path / "no-llm-needed")


def test_timm_missing_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llm2clip_vlm import LLM2CLIPVisionTower

    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_large_patch14_clip_336"}))
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    with pytest.raises(ImportError, match=r"llm2clip-vlm\[timm\]"):
        LLM2CLIPVisionTower(str(tmp_path), SimpleNamespace(mm_vision_select_layer=-2))
