"""import-tower on stand-ins of the EVA02-L-14-336 and SigLIP2 so400m LLM2CLIP releases.

The stand-ins are tiny random checkpoints whose tensor names and shapes are those of the official
model code (small width/depth):

- EVA02: microsoft/LLM2CLIP ``llm2clip/eva_clip/eva_vit_model.py`` (``EVAVisionTransformer``:
  ``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.i.{norm1, attn.{q,k,v}_proj,
  attn.inner_attn_ln, attn.proj, attn.rope.freqs_cos/sin, norm2, mlp.{w1,w2,ffn_ln,w3}}``,
  ``rope.freqs_cos/sin``, ``norm``, ``head``; ``k_proj`` without bias under ``subln``), built as
  ``model.py:_build_vision_tower`` does (``num_classes=embed_dim``, ``use_mean_pooling=False``), under
  the ``CLIP`` model's ``visual.`` prefix, with ``model_configs/EVA02-CLIP-L-14-336.json``'s
  head_width 64 and mlp_ratio 2.6667.
- SigLIP2: the reference's ``eva_clip/timm_model.py`` ``TimmModel`` (``visual.trunk.`` = timm's
  ``vit_so400m_patch14_siglip_224``: huggingface/pytorch-image-models
  ``timm/models/vision_transformer.py`` ``VisionTransformer`` with ``class_token=False``,
  ``global_pool='map'``; ``timm/layers/attention_pool.py`` ``AttentionPoolLatent``), no projection
  (``timm_proj: none``), and the sigmoid loss's ``logit_bias``.

Equivalence with timm's own forward needs timm, which is not importable on the CPU test machines
(timm needs torchvision, which does not load with the CPU torch build): those tests skip there.
Without timm, the SigLIP2 pooling head is compared with a verbatim copy of timm's
``AttentionPoolLatent.forward`` (attention_pool.py, aa4b585), and the EVA02 tower's names and
shapes are checked by a strict load into a module with timm ``Eva``'s attribute structure. A
stage-2 model with a timm backbone cannot be built without timm either: the EVA02 ``OUT/model`` is
checked by its files, names, shapes and values, and loaded through ``LLM2CLIP.from_pretrained``
with that structure standing in for timm.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from reference_llm2clip import TextProj
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import SiglipImageProcessor, SiglipVisionModel

from llm2clip_vlm import LLM2CLIPVisionTower
from llm2clip_vlm.imports.checkpoint import ImportRefused
from llm2clip_vlm.imports.tower import import_tower
from llm2clip_vlm.imports.tower_layouts import EVA_ARCH, eva_expected_timm_keys

TEXT_DIM = 24
POISON = "raise SystemExit('remote code was run')\n"


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _adaptor(state: dict[str, torch.Tensor], prefix: str, embed: int) -> TextProj:
    torch.manual_seed(0)
    proj = TextProj(embedding_dim=TEXT_DIM, output_dim=embed).eval()
    state.update({prefix + k: v.clone() for k, v in proj.text_adaptor.state_dict().items()})
    return proj


# -- EVA02 stand-in ------------------------------------------------------------------------------
EVA = {"width": 128, "layers": 2, "patch": 8, "image": 32, "head_width": 64, "embed": 48}


def eva_release(path: Path, adaptor_prefix: str = "text.text_adaptor.") -> dict[str, torch.Tensor]:
    """EVA02-CLIP names and shapes (eva_vit_model.py) at width 128, 2 blocks, 32 px / 8 px patches."""
    d, p, e = EVA["width"], EVA["patch"], EVA["embed"]
    grid = EVA["image"] // p
    head_dim = EVA["head_width"]
    hidden = int(d * 2.6667)  # SwiGLU(hidden_features=int(dim * mlp_ratio)), eva_vit_model.py Block
    g = _g(11)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.05

    s: dict[str, torch.Tensor] = {
        "patch_embed.proj.weight": r(d, 3, p, p),
        "patch_embed.proj.bias": r(d),
        "cls_token": r(1, 1, d),
        "pos_embed": r(1, grid * grid + 1, d),
        "rope.freqs_cos": torch.ones(grid * grid, head_dim),
        "rope.freqs_sin": torch.zeros(grid * grid, head_dim),
        "norm.weight": 1 + r(d),
        "norm.bias": r(d),
        "head.weight": r(e, d),
        "head.bias": r(e),
    }
    for i in range(EVA["layers"]):
        b = f"blocks.{i}."
        s |= {
            b + "norm1.weight": 1 + r(d), b + "norm1.bias": r(d),
            b + "attn.q_proj.weight": r(d, d), b + "attn.q_proj.bias": r(d),
            b + "attn.k_proj.weight": r(d, d),
            b + "attn.v_proj.weight": r(d, d), b + "attn.v_proj.bias": r(d),
            b + "attn.inner_attn_ln.weight": 1 + r(d), b + "attn.inner_attn_ln.bias": r(d),
            b + "attn.proj.weight": r(d, d), b + "attn.proj.bias": r(d),
            b + "attn.rope.freqs_cos": torch.ones(grid * grid, head_dim),
            b + "attn.rope.freqs_sin": torch.zeros(grid * grid, head_dim),
            b + "norm2.weight": 1 + r(d), b + "norm2.bias": r(d),
            b + "mlp.w1.weight": r(hidden, d), b + "mlp.w1.bias": r(hidden),
            b + "mlp.w2.weight": r(hidden, d), b + "mlp.w2.bias": r(hidden),
            b + "mlp.ffn_ln.weight": 1 + r(hidden), b + "mlp.ffn_ln.bias": r(hidden),
            b + "mlp.w3.weight": r(d, hidden), b + "mlp.w3.bias": r(d),
        }  # fmt: skip
    state = {"visual." + k: v for k, v in s.items()}
    _adaptor(state, adaptor_prefix, e)
    state["logit_scale"] = torch.tensor(4.0)
    path.mkdir(parents=True)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = {  # the remote-code release: its own model_type, the reference model config's fields
        "architectures": ["LLM2CLIPModel"],
        "auto_map": {"AutoModel": "modeling_evaclip.LLM2CLIPModel"},
        "model_type": "llm2clip",
        "embed_dim": e,
        "vision_cfg": {"image_size": EVA["image"], "layers": EVA["layers"], "width": d,
                       "head_width": EVA["head_width"], "mlp_ratio": 2.6667, "patch_size": p},
    }  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    (path / "modeling_evaclip.py").write_text(POISON)
    return state


def test_eva02_release_becomes_a_timm_eva02_tower(tmp_path: Path) -> None:
    state = eva_release(tmp_path / "release")
    summary = import_tower(tmp_path / "release", tmp_path / "out", num_heads=2)
    assert (summary["family"], summary["vision_prefix"], summary["image_head"]) == (
        "eva02",
        "visual.",
        "linear_bias",
    )
    assert (summary["image_size"], summary["patch_size"], summary["embed_dim"]) == (32, 8, EVA["embed"])

    tower = tmp_path / "out" / "tower"
    cfg = json.loads((tower / "config.json").read_text())
    assert cfg["architecture"] == EVA_ARCH and cfg["num_classes"] == 0
    # Only what differs from timm's eva02_large_patch14_clip_336 (eva.py: 336 px, /14, 1024, 24, 16).
    assert cfg["model_args"] == {
        "img_size": 32,
        "patch_size": 8,
        "embed_dim": 128,
        "depth": 2,
        "num_heads": 2,
    }
    written = load_file(str(tower / "model.safetensors"))
    assert set(written) == eva_expected_timm_keys(2)
    # The renames of timm's checkpoint_filter_fn, tensor for tensor; rotary tables dropped.
    for ours, theirs in [
        ("blocks.1.mlp.fc1_g.weight", "blocks.1.mlp.w1.weight"),
        ("blocks.1.mlp.fc1_x.bias", "blocks.1.mlp.w2.bias"),
        ("blocks.0.mlp.fc2.weight", "blocks.0.mlp.w3.weight"),
        ("blocks.0.mlp.norm.weight", "blocks.0.mlp.ffn_ln.weight"),
        ("blocks.1.attn.norm.bias", "blocks.1.attn.inner_attn_ln.bias"),
        ("blocks.0.attn.k_proj.weight", "blocks.0.attn.k_proj.weight"),
        ("pos_embed", "pos_embed"),
        ("norm.weight", "norm.weight"),
    ]:
        assert torch.equal(written[ours], state["visual." + theirs]), ours
    assert not any("rope" in k for k in written)

    heads = load_file(str(tmp_path / "out" / "heads" / "heads.safetensors"))
    assert torch.equal(heads["image_head.weight"], state["visual.head.weight"])
    assert torch.equal(heads["image_head.bias"], state["visual.head.bias"])
    assert float(heads["logit_scale"]) == pytest.approx(4.0) and "logit_bias" not in heads
    info = json.loads((tmp_path / "out" / "heads" / "heads.json").read_text())
    assert info == {"text_dim": TEXT_DIM, "embed_dim": EVA["embed"], "adaptor_blocks": 4,
                    "image_head": "linear_bias", "loss": "clip"}  # fmt: skip


def test_eva02_default_heads_follow_head_width_64(tmp_path: Path) -> None:
    eva_release(tmp_path / "release")
    import_tower(tmp_path / "release", tmp_path / "out")  # 128 / 64 = 2 heads, as num_heads=2
    cfg = json.loads((tmp_path / "out" / "tower" / "config.json").read_text())
    assert cfg["model_args"]["num_heads"] == 2


class _TimmEvaSkeleton(nn.Module):
    """timm ``Eva``'s parameter structure for ``eva02_large_patch14_clip_336`` (eva.py: ``Eva``
    attributes at lines 657-753, ``EvaBlock`` 326-362, ``EvaAttention`` 160-180 with
    ``qkv_fused=False``; timm/layers/mlp.py ``SwiGLU`` 143-148), for a strict load of the names and
    shapes. Its forward is NOT EVA's (that needs timm): it only carries the token sequence through
    the blocks so the tower's hidden-state hooks and slicing can be checked."""

    def __init__(self, img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int) -> None:
        super().__init__()
        d, hidden = embed_dim, int(embed_dim * 4 * 2 / 3)
        # As timm's Eva.__init__ (eva.py:614): Python floats from a tensor, which the meta device
        # cannot give, so the tower must build the config model elsewhere.
        self.drop_path_rates = [x.item() for x in torch.linspace(0, 0.0, depth)]
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, d, patch_size, patch_size)
        self.patch_embed.img_size, self.patch_embed.patch_size = (
            (img_size, img_size),
            (patch_size, patch_size),
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, (img_size // patch_size) ** 2 + 1, d))
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            blk = nn.Module()
            blk.norm1, blk.norm2 = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
            blk.attn = nn.Module()
            blk.attn.q_proj, blk.attn.k_proj = nn.Linear(d, d), nn.Linear(d, d, bias=False)
            blk.attn.v_proj, blk.attn.norm, blk.attn.proj = nn.Linear(d, d), nn.LayerNorm(d), nn.Linear(d, d)
            blk.mlp = nn.Module()
            blk.mlp.fc1_g, blk.mlp.fc1_x = nn.Linear(d, hidden), nn.Linear(d, hidden)
            blk.mlp.norm, blk.mlp.fc2 = nn.LayerNorm(hidden), nn.Linear(hidden, d)
            blk.forward = (lambda b: lambda x: x + b.attn.proj(b.norm1(x)))(blk)  # a stand-in step
            self.blocks.append(blk)
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.embed_dim = self.num_features = d
        self.num_prefix_tokens = 1

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


def test_eva02_tower_loads_through_llm2clip_vision_tower(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tower loader hands timm the architecture and model_args; the weights load strictly into
    timm Eva's structure; LLaVA's tower gives [B, N, C] patch features (CLS dropped)."""
    import sys
    from types import ModuleType

    eva_release(tmp_path / "release")
    import_tower(tmp_path / "release", tmp_path / "out")
    calls: list[tuple[str, dict]] = []

    def create_model(
        name: str, pretrained: bool = False, num_classes: int = 0, **kwargs: object
    ) -> nn.Module:
        if name.startswith("local-dir:"):
            path = Path(name[len("local-dir:") :])
            cfg = json.loads((path / "config.json").read_text())
            assert cfg["architecture"] == EVA_ARCH
            model = _TimmEvaSkeleton(**{"img_size": 336, "patch_size": 14, "embed_dim": 1024, "depth": 24,
                                        "num_heads": 16, **cfg["model_args"]})  # fmt: skip
            model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
            calls.append((name, cfg["model_args"]))
            return model
        return _TimmEvaSkeleton(**{"img_size": 336, "patch_size": 14, "embed_dim": 1024, "depth": 24,
                                       "num_heads": 16, **kwargs})  # fmt: skip

    fake = ModuleType("timm")
    fake.create_model = create_model  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "timm", fake)
    tower = LLM2CLIPVisionTower(
        f"llm2clip:{tmp_path / 'out' / 'tower'}", SimpleNamespace(mm_vision_select_layer=-2)
    )
    assert calls and calls[0][1]["embed_dim"] == 128
    px = torch.randn(2, 3, 32, 32, generator=_g(3))
    feats = tower(px)
    assert feats.shape == (2, (32 // 8) ** 2, 128)
    assert tower.num_patches == 16 and tower.image_processor.crop_size == {"height": 32, "width": 32}


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("timm") is None,
    reason="timm is not importable here (it needs torchvision, which does not load with the CPU torch "
    "build); equivalence with timm's Eva forward runs where timm is installed",
)
def test_eva02_tower_equals_timm_eva_forward(tmp_path: Path) -> None:
    import timm

    eva_release(tmp_path / "release")
    import_tower(tmp_path / "release", tmp_path / "out")
    ref = timm.create_model(EVA_ARCH, pretrained=False, num_classes=0, img_size=32, patch_size=8,
                            embed_dim=128, depth=2, num_heads=2).eval()  # fmt: skip
    ref.load_state_dict(load_file(str(tmp_path / "out" / "tower" / "model.safetensors")), strict=True)
    tower = LLM2CLIPVisionTower(str(tmp_path / "out" / "tower"), SimpleNamespace(mm_vision_select_layer=-1))
    px = torch.randn(2, 3, 32, 32, generator=_g(4))
    with torch.no_grad():
        hidden = ref.forward_intermediates(px, indices=1, norm=False, intermediates_only=True)[0]
    assert torch.allclose(tower(px), hidden.flatten(2).transpose(1, 2), atol=1e-5)


def test_eva02_release_also_becomes_a_stage2_checkpoint(tmp_path: Path) -> None:
    """OUT/model: LLM2CLIP.save_pretrained's layout with a timm backbone (vision/ = OUT/tower),
    image_head linear_bias holding the released head and bias, the adaptor and logit scale as
    OUT/heads. Checked by files, names, shapes and values (building the backbone needs timm)."""
    state = eva_release(tmp_path / "release")
    summary = import_tower(tmp_path / "release", tmp_path / "out", num_heads=2)
    model_dir = tmp_path / "out" / "model"
    assert summary["model"] == str(model_dir)
    cfg = json.loads((model_dir / "llm2clip_config.json").read_text())
    assert (cfg["image_head"], cfg["loss"], cfg["text_dim"], cfg["embed_dim"], cfg["adaptor_blocks"]) == (
        "linear_bias", "clip", TEXT_DIM, EVA["embed"], 4,
    )  # fmt: skip
    assert cfg["backbone"]["kind"] == "timm" and cfg["backbone"]["name_or_path"] == "vision"
    weights = load_file(str(model_dir / "model.safetensors"))
    heads = load_file(str(tmp_path / "out" / "heads" / "heads.safetensors"))
    assert torch.equal(weights["image_head.weight"], state["visual.head.weight"])
    assert torch.equal(weights["image_head.bias"], state["visual.head.bias"])
    assert weights["image_head.bias"].abs().sum() > 0  # the released bias, not a fresh zero init
    assert {k for k in weights if k.startswith("text_adaptor.")} == {
        k for k in heads if k.startswith("text_adaptor.")
    }
    assert all(
        torch.equal(weights[k], heads[k])
        for k in heads
        if k != "image_head.weight" and k != "image_head.bias"
    )
    assert float(weights["logit_scale"]) == float(heads["logit_scale"]) == pytest.approx(4.0)
    assert set(weights) == set(heads)  # no logit_bias (clip loss), nothing of the backbone
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        assert (model_dir / "vision" / name).read_bytes() == (tmp_path / "out" / "tower" / name).read_bytes()


def test_eva02_stage2_checkpoint_loads_through_from_pretrained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LLM2CLIP.from_pretrained on OUT/model, with timm replaced by a stand-in whose create_model
    builds timm Eva's parameter structure (_TimmEvaSkeleton) and loads vision/ strictly: the real
    loader's strict check of the head names, the released bias in place, text features equal to
    the reference TextProj's. Image features need timm's real Eva forward (the skipped test below)."""
    import sys
    from types import ModuleType

    from llm2clip_vlm.vision.model import LLM2CLIP

    state = eva_release(tmp_path / "release")
    import_tower(tmp_path / "release", tmp_path / "out", num_heads=2)

    def create_model(name: str, pretrained: bool = False, num_classes: int = 0, **kw: object) -> nn.Module:
        path = Path(name[len("local-dir:") :])
        cfg = json.loads((path / "config.json").read_text())
        assert name.startswith("local-dir:") and pretrained and num_classes == 0
        model = _TimmEvaSkeleton(**cfg["model_args"])
        model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
        model.pretrained_cfg = cfg["pretrained_cfg"]
        return model

    def resolve_data_config(args: dict, model: nn.Module) -> dict:
        c = model.pretrained_cfg
        return {"input_size": tuple(c["input_size"]), "mean": tuple(c["mean"]), "std": tuple(c["std"])}

    fake = ModuleType("timm")
    fake.create_model = create_model  # type: ignore[attr-defined]
    fake.data = SimpleNamespace(resolve_data_config=resolve_data_config)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "timm", fake)
    model = LLM2CLIP.from_pretrained(tmp_path / "out" / "model").eval()
    assert model.vision.kind == "timm" and model.vision.hidden_size == EVA["width"]
    assert model.vision.image_size == EVA["image"]
    assert torch.equal(model.image_head.bias, state["visual.head.bias"])
    assert float(model.logit_scale.detach()) == pytest.approx(4.0) and model.logit_bias is None
    proj = TextProj(embedding_dim=TEXT_DIM, output_dim=EVA["embed"]).eval()
    proj.text_adaptor.load_state_dict({k[len("text.text_adaptor.") :]: v for k, v in state.items()
                                       if k.startswith("text.text_adaptor.")})  # fmt: skip
    emb = torch.randn(4, TEXT_DIM, generator=_g(9)) * 3.0
    with torch.no_grad():
        assert torch.allclose(
            model.get_text_features_from_embeddings(emb), F.normalize(proj(emb), dim=-1), atol=1e-5
        )


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("timm") is None,
    reason="timm is not importable here (it needs torchvision, which does not load with the CPU torch "
    "build), so a stage-2 model with a timm backbone cannot be built: OUT/model is checked by names, "
    "shapes and values above; its image features against timm's Eva run where timm is installed",
)
def test_eva02_stage2_image_features_equal_timm_eva_and_the_released_head(tmp_path: Path) -> None:
    import timm

    from llm2clip_vlm.vision.model import LLM2CLIP

    state = eva_release(tmp_path / "release")
    import_tower(tmp_path / "release", tmp_path / "out")
    ref = timm.create_model(EVA_ARCH, pretrained=False, num_classes=0, img_size=32, patch_size=8,
                            embed_dim=128, depth=2, num_heads=2).eval()  # fmt: skip
    ref.load_state_dict(load_file(str(tmp_path / "out" / "tower" / "model.safetensors")), strict=True)
    model = LLM2CLIP.from_pretrained(tmp_path / "out" / "model").eval()
    px = torch.randn(2, 3, 32, 32, generator=_g(5))
    with torch.no_grad():
        expected = F.normalize(
            F.linear(ref(px), state["visual.head.weight"], state["visual.head.bias"]), dim=-1
        )
        assert torch.allclose(model.get_image_features(px), expected, atol=1e-5)


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("timm") is not None,
    reason="timm is installed here: export-tower on the EVA02 checkpoint runs instead of refusing",
)
def test_eva02_checkpoint_without_timm_is_one_line_naming_the_extra(tmp_path: Path) -> None:
    """export-tower on an imported EVA02 OUT needs timm to build the backbone: without it, one line
    saying what to install (a missing optional dependency, not a bug report with a traceback)."""
    from cli_inproc import one_line, run_main

    eva_release(tmp_path / "release")
    assert run_main("import-tower", str(tmp_path / "release"), "-o", str(tmp_path / "out")).code == 0
    r = run_main("export-tower", str(tmp_path / "out"), "-o", str(tmp_path / "exported"))
    one_line(r, 2, "error:", "needs timm", "pip install 'llm2clip-vlm[timm]'")


def test_eva02_refusals_name_the_tensor(tmp_path: Path) -> None:
    state = eva_release(tmp_path / "r")
    missing = dict(state)
    del missing["visual.blocks.1.mlp.ffn_ln.bias"]
    save_file(missing, str(tmp_path / "r" / "model.safetensors"))
    with pytest.raises(ImportRefused, match=r"visual\.blocks\.1\.mlp\.ffn_ln\.bias"):
        import_tower(tmp_path / "r", tmp_path / "o1")
    extra = dict(state) | {"text_model.embeddings.token_embedding.weight": torch.zeros(2)}
    save_file(extra, str(tmp_path / "r" / "model.safetensors"))
    with pytest.raises(ImportRefused, match="text_model.embeddings.token_embedding.weight"):
        import_tower(tmp_path / "r", tmp_path / "o2")
    nohead = {k: v for k, v in state.items() if not k.startswith("visual.head.")}
    save_file(nohead, str(tmp_path / "r" / "model.safetensors"))
    with pytest.raises(ImportRefused, match=r"visual\.head\.weight"):
        import_tower(tmp_path / "r", tmp_path / "o3")
    save_file({"something.else": torch.zeros(2)}, str(tmp_path / "r" / "model.safetensors"))
    with pytest.raises(ImportRefused, match="no known vision tower"):
        import_tower(tmp_path / "r", tmp_path / "o4")


# The hub's remote-code layout of the same tower: BAAI's transformers port of EVA-CLIP
# (modeling_evaclip.py / convert_evaclip_pytorch_to_hf.py, shipped in the LLM2CLIP EVA02 hub repos),
# names as in mindspore-lab/mindone's port of it: EvaCLIPVisionEmbeddings (class_embedding [D],
# patch_embedding, position_embedding [N+1, D]), EvaCLIPEncoderLayer (layer_norm1/2, self_attn.
# {q,k,v,out}_proj + inner_attn_ln, mlp.fc1/fc2/fc3 + ffn_ln), post_layernorm; visual_projection.
HUB_LAYER = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.q_proj": "self_attn.q_proj",
             "attn.k_proj": "self_attn.k_proj", "attn.v_proj": "self_attn.v_proj",
             "attn.proj": "self_attn.out_proj", "attn.inner_attn_ln": "self_attn.inner_attn_ln",
             "attn.rope": "self_attn.rope", "mlp.w1": "mlp.fc1", "mlp.w2": "mlp.fc2", "mlp.w3": "mlp.fc3",
             "mlp.ffn_ln": "mlp.ffn_ln"}  # fmt: skip


def eva_hub_release(path: Path, native: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, t in native.items():
        if not name.startswith("visual."):
            out[name] = t
            continue
        k = name[len("visual.") :]
        if k == "cls_token":
            out["vision_model.embeddings.class_embedding"] = t.reshape(-1)
        elif k == "pos_embed":
            out["vision_model.embeddings.position_embedding.weight"] = t[0]
            out["vision_model.embeddings.position_ids"] = torch.arange(t.shape[1]).unsqueeze(0)
        elif k.startswith("patch_embed.proj."):
            out["vision_model.embeddings.patch_embedding." + k.rsplit(".", 1)[1]] = t
        elif k.startswith("norm."):
            out["vision_model.post_layernorm." + k.rsplit(".", 1)[1]] = t
        elif k.startswith("head."):
            out["visual_projection." + k.rsplit(".", 1)[1]] = t
        elif k.startswith("rope."):
            continue  # the hub model keeps the rotary tables per attention only
        else:
            i, rest = k[len("blocks.") :].split(".", 1)
            mod = next(m for m in sorted(HUB_LAYER, key=len, reverse=True) if rest.startswith(m + "."))
            out[f"vision_model.encoder.layers.{i}.{HUB_LAYER[mod]}{rest[len(mod) :]}"] = t
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in out.items()}, str(path / "model.safetensors"))
    # BAAI's EvaCLIPConfig is a CLIP-like config (model_type clip, vision_config): still an EVA02 tower.
    (path / "config.json").write_text(json.dumps({"model_type": "clip", "architectures": ["LLM2CLIPModel"],
                                                  "vision_config": {"hidden_size": EVA["width"]}}))  # fmt: skip
    (path / "modeling_evaclip.py").write_text(POISON)
    return out


def test_eva02_hub_layout_imports_like_eva_clips_own_names(tmp_path: Path) -> None:
    native = eva_release(tmp_path / "native")
    hub = eva_hub_release(tmp_path / "hub", native)
    assert len(hub) == len(native) - 2 + 1  # top-level rope tables gone, position_ids added
    a = import_tower(tmp_path / "native", tmp_path / "a")
    b = import_tower(tmp_path / "hub", tmp_path / "b")
    assert (b["family"], b["vision_prefix"], b["image_head"]) == ("eva02", "vision_model.", "linear_bias")
    for sub, name in (("tower", "model.safetensors"), ("heads", "heads.safetensors")):
        x, y = load_file(str(tmp_path / "a" / sub / name)), load_file(str(tmp_path / "b" / sub / name))
        assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x), sub
    assert json.loads((tmp_path / "a/tower/config.json").read_text()) == json.loads(
        (tmp_path / "b/tower/config.json").read_text()
    )
    assert a["embed_dim"] == b["embed_dim"]

    # Refusals name the tensor as the hub file spells it.
    broken = {k: v for k, v in hub.items() if k != "vision_model.encoder.layers.1.mlp.ffn_ln.bias"}
    save_file({k: v.contiguous() for k, v in broken.items()}, str(tmp_path / "hub" / "model.safetensors"))
    with pytest.raises(
        ImportRefused, match=r"'vision_model\.encoder\.layers\.1\.mlp\.ffn_ln\.bias' is missing"
    ):
        import_tower(tmp_path / "hub", tmp_path / "c")
    odd = dict(hub) | {"vision_model.encoder.layers.0.self_attn.qkv.weight": torch.zeros(2)}
    save_file({k: v.contiguous() for k, v in odd.items()}, str(tmp_path / "hub" / "model.safetensors"))
    with pytest.raises(ImportRefused, match=r"self_attn\.qkv\.weight' has no place"):
        import_tower(tmp_path / "hub", tmp_path / "d")


# -- SigLIP2 stand-in ----------------------------------------------------------------------------
SIG = {"width": 32, "layers": 2, "patch": 7, "image": 28, "heads": 4, "hidden": 48}


def siglip_release(path: Path) -> dict[str, torch.Tensor]:
    """timm VisionTransformer (class_token=False, global_pool='map') names under ``visual.trunk.``."""
    d, p, h = SIG["width"], SIG["patch"], SIG["hidden"]
    n = (SIG["image"] // p) ** 2
    g = _g(21)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.1

    s: dict[str, torch.Tensor] = {
        "patch_embed.proj.weight": r(d, 3, p, p), "patch_embed.proj.bias": r(d),
        "pos_embed": r(1, n, d),
        "norm.weight": 1 + r(d), "norm.bias": r(d),
        "attn_pool.latent": r(1, 1, d),
        "attn_pool.q.weight": r(d, d), "attn_pool.q.bias": r(d),
        "attn_pool.kv.weight": r(2 * d, d), "attn_pool.kv.bias": r(2 * d),
        "attn_pool.proj.weight": r(d, d), "attn_pool.proj.bias": r(d),
        "attn_pool.norm.weight": 1 + r(d), "attn_pool.norm.bias": r(d),
        "attn_pool.mlp.fc1.weight": r(h, d), "attn_pool.mlp.fc1.bias": r(h),
        "attn_pool.mlp.fc2.weight": r(d, h), "attn_pool.mlp.fc2.bias": r(d),
    }  # fmt: skip
    for i in range(SIG["layers"]):
        b = f"blocks.{i}."
        s |= {
            b + "norm1.weight": 1 + r(d), b + "norm1.bias": r(d),
            b + "attn.qkv.weight": r(3 * d, d), b + "attn.qkv.bias": r(3 * d),
            b + "attn.proj.weight": r(d, d), b + "attn.proj.bias": r(d),
            b + "norm2.weight": 1 + r(d), b + "norm2.bias": r(d),
            b + "mlp.fc1.weight": r(h, d), b + "mlp.fc1.bias": r(h),
            b + "mlp.fc2.weight": r(d, h), b + "mlp.fc2.bias": r(d),
        }  # fmt: skip
    state = {"visual.trunk." + k: v for k, v in s.items()}
    _adaptor(state, "text.text_adaptor.", d)  # timm_proj none: the adaptor outputs the tower width
    state["logit_scale"] = torch.tensor(2.3)
    state["logit_bias"] = torch.tensor(-10.0)
    path.mkdir(parents=True)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = {"model_type": "llm2clip", "embed_dim": d,  # Llama3.1-8B-Siglip2-So-L-14-224.json fields
              "vision_cfg": {"timm_model_name": "vit_so400m_patch14_siglip_224.v2_webli", "timm_pool": "map",
                             "timm_proj": "none", "image_size": SIG["image"], "patch_size": p}}  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    return state


def _timm_attention_pool_latent(x: torch.Tensor, s: dict[str, torch.Tensor], num_heads: int) -> torch.Tensor:
    """Verbatim arithmetic of timm/layers/attention_pool.py ``AttentionPoolLatent.forward``
    (huggingface/pytorch-image-models aa4b585, lines 102-137; latent_len 1, no pos_embed, no
    q/k norm, pool 'token', unfused attention, GELU Mlp), with its Linear layers as F.linear."""
    B, N, C = x.shape
    latent_len, head_dim = 1, C // num_heads
    q_latent = s["attn_pool.latent"].expand(B, -1, -1)
    q = F.linear(q_latent, s["attn_pool.q.weight"], s["attn_pool.q.bias"])
    q = q.reshape(B, latent_len, num_heads, head_dim).transpose(1, 2)
    kv = F.linear(x, s["attn_pool.kv.weight"], s["attn_pool.kv.bias"])
    kv = kv.reshape(B, N, 2, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    k, v = kv.unbind(0)
    q = q * head_dim**-0.5
    attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
    x = (attn @ v).transpose(1, 2).reshape(B, latent_len, C)
    x = F.linear(x, s["attn_pool.proj.weight"], s["attn_pool.proj.bias"])
    y = F.layer_norm(x, (C,), s["attn_pool.norm.weight"], s["attn_pool.norm.bias"], eps=1e-6)
    y = F.linear(F.gelu(F.linear(y, s["attn_pool.mlp.fc1.weight"], s["attn_pool.mlp.fc1.bias"])),
                 s["attn_pool.mlp.fc2.weight"], s["attn_pool.mlp.fc2.bias"])  # fmt: skip
    return (x + y)[:, 0]


def test_siglip2_release_becomes_a_plain_siglip_vision_model(tmp_path: Path) -> None:
    state = siglip_release(tmp_path / "release")
    summary = import_tower(tmp_path / "release", tmp_path / "out", num_heads=SIG["heads"])
    assert (summary["family"], summary["vision_prefix"]) == ("siglip", "visual.trunk.")
    assert (summary["image_head"], summary["loss"], summary["image_size"]) == ("none", "siglip", SIG["image"])

    model = SiglipVisionModel.from_pretrained(tmp_path / "out" / "tower").eval()
    assert model.config.hidden_act == "gelu" and model.config.num_attention_heads == SIG["heads"]
    sd = getattr(model, "vision_model", model).state_dict()
    t = {k[len("visual.trunk.") :]: v for k, v in state.items() if k.startswith("visual.trunk.")}
    q, k, v = t["blocks.1.attn.qkv.weight"].chunk(3)
    assert torch.equal(sd["encoder.layers.1.self_attn.k_proj.weight"], k)
    assert torch.equal(sd["encoder.layers.1.self_attn.v_proj.weight"], v)
    assert torch.equal(sd["embeddings.position_embedding.weight"], t["pos_embed"][0])
    assert torch.equal(sd["post_layernorm.weight"], t["norm.weight"])

    # Pooled output = timm's MAP head (a copy of its forward) on the normed last tokens.
    px = torch.randn(2, 3, SIG["image"], SIG["image"], generator=_g(5))
    with torch.no_grad():
        out = model(pixel_values=px, output_hidden_states=True)
        expected = _timm_attention_pool_latent(out.last_hidden_state, t, SIG["heads"])
    assert torch.allclose(out.pooler_output, expected, atol=1e-5)
    # A timm ViT block is pre-norm attention + pre-norm MLP with erf GELU: layer 0 by hand.
    with torch.no_grad():
        x = out.hidden_states[0]
        y = F.layer_norm(x, (SIG["width"],), t["blocks.0.norm1.weight"], t["blocks.0.norm1.bias"], eps=1e-6)
        qkv = F.linear(y, t["blocks.0.attn.qkv.weight"], t["blocks.0.attn.qkv.bias"])
        qkv = qkv.reshape(2, -1, 3, SIG["heads"], SIG["width"] // SIG["heads"]).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).flatten(2)
        x = x + F.linear(a, t["blocks.0.attn.proj.weight"], t["blocks.0.attn.proj.bias"])
        y = F.layer_norm(x, (SIG["width"],), t["blocks.0.norm2.weight"], t["blocks.0.norm2.bias"], eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(y, t["blocks.0.mlp.fc1.weight"], t["blocks.0.mlp.fc1.bias"])),
                         t["blocks.0.mlp.fc2.weight"], t["blocks.0.mlp.fc2.bias"])  # fmt: skip
    assert torch.allclose(out.hidden_states[1], x, atol=1e-5)

    processor = SiglipImageProcessor.from_pretrained(tmp_path / "out" / "tower")
    assert (processor.size["height"], processor.size["width"]) == (SIG["image"], SIG["image"])
    assert list(processor.image_mean) == [0.5] * 3 and list(processor.image_std) == [0.5] * 3
    heads = load_file(str(tmp_path / "out" / "heads" / "heads.safetensors"))
    assert "image_head.weight" not in heads and float(heads["logit_bias"]) == -10.0

    # LLaVA-1.5's tower by path: every token (SigLIP has no CLS), layer -2.
    llava = LLM2CLIPVisionTower(str(tmp_path / "out" / "tower"), SimpleNamespace(mm_vision_select_layer=-2))
    feats = llava(px)
    assert feats.shape == (2, (SIG["image"] // SIG["patch"]) ** 2, SIG["width"])
    assert torch.equal(feats, out.hidden_states[-2])


def test_siglip2_stage2_checkpoint_matches_the_release(tmp_path: Path) -> None:
    """OUT/model: image features = the MAP-pooled tower output (no projection, as timm_proj none),
    text features = the reference TextProj, logit scale and bias as released."""
    from llm2clip_vlm.vision.model import LLM2CLIP

    state = siglip_release(tmp_path / "release")
    summary = import_tower(tmp_path / "release", tmp_path / "out", num_heads=SIG["heads"])
    assert summary["model"] == str(tmp_path / "out" / "model")
    model = LLM2CLIP.from_pretrained(tmp_path / "out" / "model").eval()
    proj = TextProj(embedding_dim=TEXT_DIM, output_dim=SIG["width"]).eval()
    proj.text_adaptor.load_state_dict({k[len("text.text_adaptor.") :]: v for k, v in state.items()
                                       if k.startswith("text.text_adaptor.")})  # fmt: skip
    tower = SiglipVisionModel.from_pretrained(tmp_path / "out" / "tower").eval()
    px = torch.randn(3, 3, SIG["image"], SIG["image"], generator=_g(8))
    emb = torch.randn(4, TEXT_DIM, generator=_g(9)) * 3.0
    with torch.no_grad():
        assert torch.allclose(
            model.get_image_features(px), F.normalize(tower(pixel_values=px).pooler_output, dim=-1), atol=1e-6
        )
        assert torch.allclose(
            model.get_text_features_from_embeddings(emb), F.normalize(proj(emb), dim=-1), atol=1e-5
        )
    assert (
        float(model.logit_scale.detach()) == pytest.approx(2.3) and float(model.logit_bias.detach()) == -10.0
    )
    assert model.config.loss == "siglip"


def test_siglip2_tower_assembles_into_llava(tmp_path: Path) -> None:
    from llm2clip_vlm.llava.assemble import build_llava_model
    from llm2clip_vlm.text.tiny import save_tiny_llm

    siglip_release(tmp_path / "release")
    import_tower(tmp_path / "release", tmp_path / "out", num_heads=SIG["heads"])
    model, _ = build_llava_model(tmp_path / "out" / "tower", save_tiny_llm(tmp_path / "llm"))
    assert model.config.image_seq_length == (SIG["image"] // SIG["patch"]) ** 2


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("timm") is None,
    reason="timm is not importable here (it needs torchvision, which does not load with the CPU torch "
    "build); equivalence with timm's VisionTransformer forward runs where timm is installed",
)
def test_siglip2_tower_equals_timm_forward(tmp_path: Path) -> None:
    import timm

    state = siglip_release(tmp_path / "release")
    import_tower(tmp_path / "release", tmp_path / "out", num_heads=SIG["heads"])
    ref = timm.create_model("vit_so400m_patch14_siglip_224", pretrained=False, num_classes=0,
                            img_size=SIG["image"], patch_size=SIG["patch"], embed_dim=SIG["width"],
                            depth=SIG["layers"], num_heads=SIG["heads"],
                            mlp_ratio=SIG["hidden"] / SIG["width"]).eval()  # fmt: skip
    ref.load_state_dict(
        {k[len("visual.trunk.") :]: v for k, v in state.items() if k.startswith("visual.trunk.")}
    )
    model = SiglipVisionModel.from_pretrained(tmp_path / "out" / "tower").eval()
    px = torch.randn(2, 3, SIG["image"], SIG["image"], generator=_g(6))
    with torch.no_grad():
        feats = ref.forward_features(px)
        out = model(pixel_values=px)
        assert torch.allclose(out.last_hidden_state, feats, atol=1e-5)
        assert torch.allclose(out.pooler_output, ref.forward_head(feats), atol=1e-5)


def test_siglip2_refusals(tmp_path: Path) -> None:
    state = siglip_release(tmp_path / "r")
    with pytest.raises(ImportRefused, match="--heads"):
        import_tower(tmp_path / "r", tmp_path / "o1")  # width 32: not so400m, heads unknown
    extra = dict(state) | {"visual.trunk.cls_token": torch.zeros(1, 1, SIG["width"])}
    save_file(extra, str(tmp_path / "r" / "model.safetensors"))
    with pytest.raises(ImportRefused, match="cls_token"):
        import_tower(tmp_path / "r", tmp_path / "o2", num_heads=4)
    missing = {k: v for k, v in state.items() if k != "visual.trunk.attn_pool.kv.bias"}
    save_file(missing, str(tmp_path / "r" / "model.safetensors"))
    with pytest.raises(ImportRefused, match=r"attn_pool\.kv\.bias"):
        import_tower(tmp_path / "r", tmp_path / "o3", num_heads=4)
