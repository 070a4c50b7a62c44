"""export-tower: the tower loads with plain transformers and gives the trained model's features."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from stage2_world import load_image, make_world
from test_stage2 import _run
from transformers import AutoImageProcessor, AutoModel, CLIPVisionModel, SiglipVisionModel
from typer.testing import CliRunner

from llm2clip_vlm import LLM2CLIP
from llm2clip_vlm.cli import app
from llm2clip_vlm.commands import run_export as export_tower


@pytest.mark.parametrize(
    ("loss", "kind", "cls"), [("clip", "clip", CLIPVisionModel), ("siglip", "siglip", SiglipVisionModel)]
)
def test_exported_tower_matches_the_trained_model(tmp_path: Path, loss: str, kind: str, cls: type) -> None:
    run = tmp_path / "run"
    metrics = _run(
        tmp_path / "data",
        run,
        [
            "stage2.batch_size=8",
            "stage2.loop.max_steps=2",
            "stage2.lr=1e-3",
            f"stage2.loss={loss}",
            f"stage2.backbone.kind={kind}",
        ],
    )
    trained = LLM2CLIP.from_pretrained(run / "model").eval()
    out = export_tower(run, tmp_path / "export" / "tower")
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= {
        p.name for p in out.iterdir()
    }

    # Plain transformers, no code of ours: the model class, AutoModel and AutoImageProcessor.
    tower = AutoModel.from_pretrained(out).eval()
    assert isinstance(tower, cls) and isinstance(cls.from_pretrained(out), cls)
    processor = AutoImageProcessor.from_pretrained(out)
    images = [load_image(r) for r in make_world(tmp_path / "probe", 3, seed=5)]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    ours = trained.vision.image_processor(images=images, return_tensors="pt")["pixel_values"]
    assert torch.equal(pixels, ours)
    with torch.no_grad():
        assert torch.allclose(tower(pixel_values=pixels).pooler_output, trained.vision(pixels), atol=1e-5)
        # Patch features of layer -2 (what LLaVA takes) come out of the same weights.
        hs = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        tokens = (32 // 8) ** 2 + (1 if kind == "clip" else 0)  # CLIP has a CLS token, SigLIP none
        assert hs.shape == (3, tokens, 32)

        # The full retrieval model next to it gives the same image features as the trained one.
        model = LLM2CLIP.from_pretrained(tmp_path / "export" / "model").eval()
        assert torch.allclose(model.get_image_features(pixels), trained.get_image_features(pixels), atol=1e-6)

    card = (out / "README.md").read_text()
    after = metrics["eval"]["after"]["short"]
    assert f"| {after['i2t_r1']:.1f} | {after['i2t_r5']:.1f} |" in card
    prov = json.loads((out / "llm2clip_provenance.json").read_text())
    assert prov["backbone"]["kind"] == kind and prov["stage2"]["loss"] == loss
    assert prov["retrieval"] == metrics["eval"]["after"]


def test_export_in_bf16_and_through_the_cli(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _run(tmp_path / "data", run, ["stage2.batch_size=8", "stage2.loop.max_steps=1"])
    result = CliRunner().invoke(
        app,
        [
            "export-tower",
            str(run),
            "--output",
            str(tmp_path / "t"),
            "--dtype",
            "bf16",
            "--model-output",
            str(tmp_path / "m"),
        ],
    )
    assert result.exit_code == 0, result.output
    with safe_open(str(tmp_path / "t" / "model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    assert (tmp_path / "m" / "llm2clip_config.json").is_file()


def test_export_refuses_a_run_without_a_model(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a finished stage-2 run"):
        export_tower(tmp_path, tmp_path / "tower")
