"""``build_llava_model``: a transformers LLaVA-1.5 from a tower directory and a causal LM.

Tiny random CLIP/SigLIP towers and a tiny random Llama, saved and reloaded with unmodified
transformers; the features the LLaVA model computes must be the tower's own.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor, LlavaForConditionalGeneration

from llm2clip_vlm import LLM2CLIPVisionTower
from llm2clip_vlm.llava.assemble import build_llava_model
from llm2clip_vlm.text.tiny import save_tiny_llm
from llm2clip_vlm.tower.synthetic import TowerShape, save_random_tower

SHAPE = TowerShape(
    image_size=32, patch_size=8, hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64
)
N_SIDE = SHAPE.image_size // SHAPE.patch_size


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llava_parts")
    return {
        "clip": save_random_tower(root / "clip", "clip", SHAPE, seed=4),
        "siglip": save_random_tower(root / "siglip", "siglip", SHAPE, seed=5),
        "llm": save_tiny_llm(root / "llm", "llama", seed=6, hidden_size=48),
    }


def _photo() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut())


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_assembled_llava_round_trips_and_uses_tower_features(
    parts: dict[str, Path], kind: str, tmp_path: Path
) -> None:
    model, processor = build_llava_model(f"llm2clip:{parts[kind]}", parts["llm"])
    out = tmp_path / "llava"
    model.save_pretrained(out)
    processor.save_pretrained(out)

    # Unmodified transformers reloads it.
    llava = LlavaForConditionalGeneration.from_pretrained(out).eval()
    proc = AutoProcessor.from_pretrained(out)
    cfg = llava.config
    assert cfg.vision_feature_layer == -2
    assert cfg.vision_feature_select_strategy == ("default" if kind == "clip" else "full")
    assert cfg.image_seq_length == N_SIDE**2
    assert cfg.projector_hidden_act == "gelu"
    proj = llava.model.multi_modal_projector
    assert (proj.linear_1.in_features, proj.linear_1.out_features) == (SHAPE.hidden_size, 48)
    assert (proj.linear_2.in_features, proj.linear_2.out_features) == (48, 48)

    # Pretrained weights arrived intact: the tower's and the LLM's.
    raw_tower = AutoModel.from_pretrained(parts[kind])
    for name, value in raw_tower.state_dict().items():
        assert torch.equal(llava.model.vision_tower.state_dict()[name], value), name
    raw_llm = AutoModel.from_pretrained(parts["llm"])
    llm_state = llava.model.language_model.state_dict()
    for name, value in raw_llm.state_dict().items():
        got = llm_state[name]
        # The embedding grew by the <image> row; the old rows are unchanged.
        assert torch.equal(got[: value.shape[0]], value), name

    inputs = proc(images=_photo(), text="USER: <image>\nWhat is shown? ASSISTANT:", return_tensors="pt")
    assert int((inputs["input_ids"] == cfg.image_token_id).sum()) == N_SIDE**2
    with torch.no_grad():
        got = torch.stack(
            list(llava.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output)
        )
    tower = LLM2CLIPVisionTower(
        str(parts[kind]), SimpleNamespace(mm_vision_select_layer=-2, mm_vision_select_feature="patch")
    )
    feats = tower(inputs["pixel_values"])
    assert feats.shape == (1, tower.num_patches, tower.hidden_size) and tower.num_patches == N_SIDE**2
    with torch.no_grad():
        assert torch.equal(got, proj(feats))

    generated = llava.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, inputs["input_ids"].shape[1] + 4)
    text = proc.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert isinstance(text[0], str)


def test_dtype_and_bad_arguments(parts: dict[str, Path]) -> None:
    model, _ = build_llava_model(parts["clip"], parts["llm"], dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="projector 'linear'"):
        build_llava_model(parts["clip"], parts["llm"], projector="linear")
    with pytest.raises(ValueError, match="select_strategy"):
        build_llava_model(parts["clip"], parts["llm"], select_strategy="patch")
    with pytest.raises(ValueError, match="out of range"):
        build_llava_model(parts["clip"], parts["llm"], vision_feature_layer=9)
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        build_llava_model(parts["llm"] / "nope", parts["llm"])
