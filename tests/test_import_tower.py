"""import-tower: a synthetic checkpoint in the released LLM2CLIP-Openai layout -> our tower and
stage-2 checkpoint; outputs match the reference adaptor (tests/reference_llm2clip.py) to 1e-5."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from reference_llm2clip import TextProj
from safetensors.torch import load_file, save_file
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel
from typer.testing import CliRunner

from llm2clip_vlm import LLM2CLIPVisionTower
from llm2clip_vlm.cli import app
from llm2clip_vlm.imports.checkpoint import ImportRefused
from llm2clip_vlm.imports.tower import import_tower
from llm2clip_vlm.vision.model import LLM2CLIP

SIZE, PATCH, HIDDEN, TEXT_DIM, EMBED = 32, 8, 32, 24, 16
# A remote-code file that would end the test run if anything imported or executed it.
POISON = "raise SystemExit('remote code was run')\n"


def released_tower(path: Path, prefix: str = "text_adapter.adaptor.", image_size_in_config: bool = True):
    """A tiny checkpoint in the hub layout of microsoft/LLM2CLIP-Openai-L-14-336 (config.json with
    architectures [LLM2CLIPModel] and auto_map to remote code; model.safetensors)."""
    torch.manual_seed(0)
    vcfg = dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                patch_size=PATCH, projection_dim=EMBED, dropout=0.0, model_type="clip_vision_model")  # fmt: skip
    if image_size_in_config:
        vcfg["image_size"] = SIZE
    sizes = {k: v for k, v in vcfg.items() if k != "model_type"}
    vision = CLIPVisionModel(CLIPVisionConfig(**{**sizes, "image_size": SIZE})).eval()
    proj = TextProj(embedding_dim=TEXT_DIM, output_dim=EMBED).eval()
    with torch.no_grad():  # non-trivial norms, so a mix-up of LayerNorms would show
        for m in proj.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    # The release was saved by transformers 4.40: vision tensors under "vision_model.".
    state = {"vision_model." + k: v.clone() for k, v in vision.state_dict().items()}
    state["visual_projection.weight"] = torch.randn(EMBED, HIDDEN) * HIDDEN**-0.5
    state.update({prefix + k: v.clone() for k, v in proj.text_adaptor.state_dict().items()})
    state["logit_scale"] = torch.tensor(4.2)
    path.mkdir(parents=True)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "_name_or_path": "LLM2CLIP-Openai-L-14",
        "architectures": ["LLM2CLIPModel"],
        "auto_map": {
            "AutoConfig": "configuration_clip.CLIPConfig",
            "AutoModel": "modeling_clip.LLM2CLIPModel",
        },
        "initializer_factor": 1.0,
        "logit_scale_init_value": 2.6592,
        "model_type": "clip",
        "projection_dim": EMBED,
        "text_config": {"model_type": "clip_text_model"},
        "torch_dtype": "float32",
        "transformers_version": "4.40.2",
        "vision_config": vcfg,
    }
    (path / "config.json").write_text(json.dumps(config))
    (path / "modeling_clip.py").write_text(POISON)
    (path / "configuration_clip.py").write_text(POISON)
    return vision, proj, state


@pytest.mark.parametrize("prefix", ["text_adapter.adaptor.", "text.text_adaptor."])
def test_imported_tower_and_head_match_the_release(tmp_path: Path, prefix: str) -> None:
    vision, proj, state = released_tower(
        tmp_path / "release", prefix, image_size_in_config=prefix.startswith("text.")
    )
    summary = import_tower(tmp_path / "release", tmp_path / "out")
    assert (summary["adaptor_prefix"], summary["adaptor_blocks"], summary["image_size"]) == (prefix, 4, SIZE)
    px = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))

    # Plain transformers loads the tower; features equal the release's vision model bit for bit.
    tower = CLIPVisionModel.from_pretrained(tmp_path / "out" / "tower").eval()
    with torch.no_grad():
        ref = vision(pixel_values=px, output_hidden_states=True)
        got = tower(pixel_values=px, output_hidden_states=True)
    assert torch.equal(got.hidden_states[-2], ref.hidden_states[-2])
    processor = CLIPImageProcessor.from_pretrained(tmp_path / "out" / "tower")
    assert processor.crop_size == {"height": SIZE, "width": SIZE} and processor.size == {
        "shortest_edge": SIZE
    }

    # LLaVA-1.5's duck type by plain path: patch features of layer -2.
    llava = LLM2CLIPVisionTower(str(tmp_path / "out" / "tower"), SimpleNamespace(mm_vision_select_layer=-2))
    assert torch.equal(llava(px), ref.hidden_states[-2][:, 1:])
    assert llava.num_patches == (SIZE // PATCH) ** 2

    # The stage-2 checkpoint: the reference TextProj (L2-normalise, 4 blocks, LN, Linear+bias) and
    # CLIPModel.get_image_features (visual_projection(pooler_output)), to 1e-5.
    model = LLM2CLIP.from_pretrained(tmp_path / "out" / "model").eval()
    emb = torch.randn(5, TEXT_DIM, generator=torch.Generator().manual_seed(2)) * 3.0
    with torch.no_grad():
        text_ref = F.normalize(proj(emb), dim=-1)
        image_ref = F.normalize(ref.pooler_output @ state["visual_projection.weight"].T, dim=-1)
        assert (model.get_text_features_from_embeddings(emb) - text_ref).abs().max() < 1e-5
        assert (model.get_image_features(px) - image_ref).abs().max() < 1e-5
    assert float(model.logit_scale.detach()) == pytest.approx(4.2)
    assert model.text_adaptor.proj.bias is not None


def _edit(path: Path, drop: str | None = None, add: str | None = None) -> None:
    state = load_file(str(path / "model.safetensors"))
    if drop:
        del state[drop]
    if add:
        state[add] = torch.zeros(2)
    save_file(state, str(path / "model.safetensors"))


def test_anything_unexpected_is_refused_by_name(tmp_path: Path) -> None:
    src = tmp_path / "r"
    released_tower(src)
    _edit(src, add="text_model.embeddings.token_embedding.weight")
    with pytest.raises(ImportRefused, match="text_model.embeddings.token_embedding.weight"):
        import_tower(src, tmp_path / "o1")
    _edit(src, drop="text_model.embeddings.token_embedding.weight")
    _edit(src, drop="text_adapter.adaptor.5.bias")  # the reference's proj_bias=True
    with pytest.raises(ImportRefused, match=r"text_adapter\.adaptor\.5\.bias"):
        import_tower(src, tmp_path / "o2")
    _edit(src, drop="vision_model.encoder.layers.1.mlp.fc2.bias")
    with pytest.raises(ImportRefused, match=r"vision_model\.encoder\.layers\.1\.mlp\.fc2\.bias"):
        import_tower(src, tmp_path / "o3")

    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(
        json.dumps({**cfg, "vision_config": {**cfg["vision_config"], "image_size": 48}})
    )
    with pytest.raises(ImportRefused, match="image_size 48"):
        import_tower(src, tmp_path / "o4")
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "evaclip"}))
    with pytest.raises(ImportRefused, match="EVA02"):
        import_tower(src, tmp_path / "o5")

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps(cfg))
    (pickled / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(ImportRefused, match="pickled"):
        import_tower(pickled, tmp_path / "o6")


def test_cli_import_tower(tmp_path: Path) -> None:
    released_tower(tmp_path / "release")
    runner = CliRunner()
    ok = runner.invoke(app, ["import-tower", str(tmp_path / "release"), "-o", str(tmp_path / "out")])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "out" / "tower" / "config.json").is_file()
    bad = runner.invoke(app, ["import-tower", str(tmp_path / "nowhere"), "-o", str(tmp_path / "o2")])
    assert bad.exit_code == 1 and "nowhere" in bad.output and "Traceback" not in bad.output


def test_imported_tower_assembles_into_llava(tmp_path: Path) -> None:
    """The released recipe's path: llava.tower = OUT/tower, a plain directory."""
    from llm2clip_vlm.llava.assemble import build_llava_model
    from llm2clip_vlm.text.tiny import save_tiny_llm

    vision, _, _ = released_tower(tmp_path / "release")
    import_tower(tmp_path / "release", tmp_path / "out")
    model, _ = build_llava_model(tmp_path / "out" / "tower", save_tiny_llm(tmp_path / "llm"))
    assert model.config.image_seq_length == (SIZE // PATCH) ** 2
    px = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = torch.stack(list(model.model.get_image_features(pixel_values=px).pooler_output))
        expected = model.model.multi_modal_projector(
            vision(pixel_values=px, output_hidden_states=True).hidden_states[-2][:, 1:]
        )
    assert torch.equal(got, expected)
