"""Contract of ``LLM2CLIPVisionTower``: driven exactly as LLaVA-1.5's model code drives its tower.

Towers are tiny random CLIP/SigLIP models saved in the exported format; the reference is the
raw transformers model loaded with ``AutoModel`` from the same directory.
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from transformers import AutoModel

from llm2clip_vlm import LLM2CLIPVisionTower
from llm2clip_vlm.tower.formats import known_tower_types, resolve_tower_path
from llm2clip_vlm.tower.image_processor import SquareResizeProcessorView
from llm2clip_vlm.tower.synthetic import TowerShape, save_random_tower

SHAPE = TowerShape(
    image_size=32, patch_size=8, hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64
)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def towers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("towers")
    return {kind: save_random_tower(root / kind, kind, SHAPE, seed=1) for kind in ("clip", "siglip")}


@functools.cache
def _photos() -> list[Image.Image]:
    from skimage import data

    # Non-square real photographs, so resize/crop are exercised like real LLaVA data.
    return [
        Image.fromarray(data.astronaut()),
        Image.fromarray(data.chelsea()),
        Image.fromarray(data.coffee()),
    ]


def _expand2square(img: Image.Image, background: tuple[int, ...]) -> Image.Image:
    # LLaVA-1.5's ``image_aspect_ratio="pad"``: pad to a square with the processor's mean colour.
    w, h = img.size
    side = max(w, h)
    out = Image.new(img.mode, (side, side), background)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def _args(select_feature: str | None = "patch", layer: int = -2, **extra: object) -> SimpleNamespace:
    ns = SimpleNamespace(mm_vision_select_layer=layer, **extra)
    if select_feature is not None:
        ns.mm_vision_select_feature = select_feature
    return ns


def _raw_reference(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    return AutoModel.from_pretrained(path).to(dtype=dtype).eval()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("select_feature", ["patch", "cls_patch"])
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_llava_contract(towers: dict[str, Path], kind: str, select_feature: str, dtype: torch.dtype) -> None:
    path = towers[kind]
    args = _args(select_feature)
    # LlavaMetaModel.__init__: build_vision_tower(config, delay_load=True)
    tower = LLM2CLIPVisionTower(f"llm2clip:{path}", args, delay_load=True)
    assert not tower.is_loaded
    assert tower.hidden_size == SHAPE.hidden_size  # config before weights
    # initialize_vision_modules: load_model(); train.py: .to(dtype=, device=); data uses image_processor
    tower.load_model()
    tower.to(device=torch.device("cpu"), dtype=dtype)
    assert tower.dtype == dtype and tower.device == torch.device("cpu")
    processor = tower.image_processor
    crop = processor.crop_size
    assert (crop["height"], crop["width"]) == (SHAPE.image_size, SHAPE.image_size)
    assert processor.size["shortest_edge"] == SHAPE.image_size
    background = tuple(int(x * 255) for x in processor.image_mean)
    pixels = [
        processor.preprocess(_expand2square(p, background), return_tensors="pt")["pixel_values"][0]
        for p in _photos()
    ]
    # A text-only sample's placeholder image, as LazySupervisedDataset builds it.
    pixels.append(torch.zeros(3, crop["height"], crop["width"]))
    batch = torch.stack(pixels).to(dtype)  # collator stacks; the model runs in its dtype

    raw = _raw_reference(path, dtype)
    drop = 1 if (kind == "clip" and select_feature == "patch") else 0
    with torch.no_grad():
        expected = raw(pixel_values=batch, output_hidden_states=True).hidden_states[-2][:, drop:]
    feats = tower(batch)
    assert feats.dtype == dtype
    assert feats.shape == (len(pixels), tower.tokens_per_image, tower.hidden_size)
    assert torch.equal(feats, expected)
    assert not feats.requires_grad

    # A list of [3,H,W] -> a list of [1,N,C], each equal to the raw model on that image alone.
    listed = tower(list(batch))
    assert isinstance(listed, list) and len(listed) == len(pixels)
    for image, got in zip(batch, listed, strict=True):
        with torch.no_grad():
            ref = raw(pixel_values=image[None], output_hidden_states=True).hidden_states[-2][:, drop:]
        assert got.shape == (1, tower.tokens_per_image, tower.hidden_size)
        assert torch.equal(got, ref)

    dummy = tower.dummy_feature
    assert dummy.shape == (1, tower.hidden_size) and dummy.dtype == dtype and not dummy.any()


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_fp32_input_to_bf16_tower_comes_back_fp32(towers: dict[str, Path], kind: str) -> None:
    tower = LLM2CLIPVisionTower(str(towers[kind]), _args())
    tower.to(dtype=torch.bfloat16)
    images = torch.randn(2, 3, SHAPE.image_size, SHAPE.image_size, generator=torch.Generator().manual_seed(0))
    raw = _raw_reference(towers[kind], torch.bfloat16)
    drop = 1 if kind == "clip" else 0
    with torch.no_grad():
        expected = raw(pixel_values=images.bfloat16(), output_hidden_states=True).hidden_states[-2][:, drop:]
    got = tower(images)
    assert got.dtype == torch.float32
    assert torch.equal(got, expected.float())


@pytest.mark.parametrize("layer", [-1, -2, 0, 1, 3])
@pytest.mark.parametrize("select_feature", ["patch", "cls_patch", None])
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_reported_shape_equals_returned(
    towers: dict[str, Path], kind: str, select_feature: str | None, layer: int
) -> None:
    tower = LLM2CLIPVisionTower(str(towers[kind]), _args(select_feature, layer), delay_load=True)
    before = (
        tower.tokens_per_image,
        tower.num_patches,
        tower.hidden_size,
        tower.num_patches_per_side,
        tower.image_size,
    )
    tower.load_model()
    after = (
        tower.tokens_per_image,
        tower.num_patches,
        tower.hidden_size,
        tower.num_patches_per_side,
        tower.image_size,
    )
    assert before == after
    feats = tower(torch.zeros(2, 3, tower.image_size, tower.image_size))
    assert feats.shape == (2, tower.tokens_per_image, tower.hidden_size)
    n_side = SHAPE.image_size // SHAPE.patch_size
    assert tower.num_patches_per_side == n_side
    # No select_feature in args means LLaVA's default, "patch"; only CLIP has a CLS to keep.
    cls = kind == "clip" and select_feature == "cls_patch"
    assert tower.tokens_per_image == n_side**2 + (1 if cls else 0)
    # LLaVA's contract (clip_encoder.py:86-88): (image_size / patch_size)^2 in every mode.
    assert tower.num_patches == n_side**2
    raw = _raw_reference(towers[kind], torch.float32)
    with torch.no_grad():
        hs = raw(
            pixel_values=torch.zeros(2, 3, SHAPE.image_size, SHAPE.image_size), output_hidden_states=True
        )
    expected = hs.hidden_states[layer]
    if kind == "clip" and select_feature != "cls_patch":
        expected = expected[:, 1:]
    assert torch.equal(feats, expected)


def test_load_model_is_idempotent_and_frozen(towers: dict[str, Path]) -> None:
    tower = LLM2CLIPVisionTower(str(towers["clip"]), _args(), delay_load=True)
    assert list(tower.parameters()) == []
    with pytest.raises(RuntimeError, match="load_model"):
        _ = tower.dtype
    tower.load_model()
    model, processor = tower.vision_tower, tower.image_processor
    params = list(tower.parameters())
    assert params and all(not p.requires_grad for p in params)
    tower.load_model()
    assert tower.vision_tower is model and tower.image_processor is processor
    assert len(list(tower.parameters())) == len(params)
    # The wrapped model sits where LLaVA keeps it, so checkpoint keys are ``...vision_tower.vision_tower.*``.
    assert all(key.startswith("vision_tower.") for key in tower.state_dict())


def test_unfreeze_flag_loads_despite_delay(towers: dict[str, Path]) -> None:
    tower = LLM2CLIPVisionTower(str(towers["clip"]), _args(unfreeze_mm_vision_tower=True), delay_load=True)
    assert tower.is_loaded
    assert tower.config is tower.vision_tower.config
    eager = LLM2CLIPVisionTower(str(towers["siglip"]), _args())
    assert eager.is_loaded


def test_config_before_load_matches_after(towers: dict[str, Path]) -> None:
    for kind, path in towers.items():
        tower = LLM2CLIPVisionTower(str(path), _args(), delay_load=True)
        cfg = tower.config
        assert cfg is tower.cfg_only and not tower.is_loaded
        tower.load_model()
        loaded, before = tower.config.to_dict(), cfg.to_dict()
        loaded.pop("_name_or_path"), before.pop("_name_or_path")
        assert loaded == before, kind


def test_siglip_processor_view_is_pixel_identical(towers: dict[str, Path]) -> None:
    from transformers import AutoImageProcessor

    tower = LLM2CLIPVisionTower(str(towers["siglip"]), _args())
    view = tower.image_processor
    assert isinstance(view, SquareResizeProcessorView)
    original = AutoImageProcessor.from_pretrained(towers["siglip"])
    photo = _photos()[0]
    got = view.preprocess(photo, return_tensors="pt")["pixel_values"]
    assert torch.equal(got, original.preprocess(photo, return_tensors="pt")["pixel_values"])
    assert torch.equal(view(photo, return_tensors="pt")["pixel_values"], got)
    assert list(view.image_mean) == list(original.image_mean)
    assert view.crop_size == {"height": SHAPE.image_size, "width": SHAPE.image_size}
    # A CLIP processor is already what LLaVA expects and is passed through as it is.
    clip = LLM2CLIPVisionTower(str(towers["clip"]), _args())
    assert not isinstance(clip.image_processor, SquareResizeProcessorView)


def test_bad_inputs_are_refused_clearly(tmp_path: Path, towers: dict[str, Path]) -> None:
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        LLM2CLIPVisionTower("llm2clip:" + str(tmp_path / "missing"), _args())
    with pytest.raises(FileNotFoundError):
        LLM2CLIPVisionTower("openai/clip-vit-large-patch14-336", _args())  # hub ids: offline only
    with pytest.raises(ValueError, match="mm_vision_select_feature"):
        LLM2CLIPVisionTower(str(towers["clip"]), _args("slicefour_patch"))
    with pytest.raises(ValueError, match="out of range"):
        LLM2CLIPVisionTower(str(towers["clip"]), _args(layer=-5))
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="no tower format for type 'bert'"):
        LLM2CLIPVisionTower(str(odd), _args())
    (odd / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not a readable JSON"):
        LLM2CLIPVisionTower(str(odd), _args())


def test_names_resolve_offline(towers: dict[str, Path]) -> None:
    path = towers["clip"]
    assert resolve_tower_path(f"llm2clip:{path}") == path
    assert resolve_tower_path(str(path)) == path
    assert {"clip", "clip_vision_model", "siglip", "siglip_vision_model"} <= set(known_tower_types())


def test_package_import_stays_light() -> None:
    # The tower module is not imported by a bare `import llm2clip_vlm`.
    import subprocess
    import sys

    code = "import sys, llm2clip_vlm; print('llm2clip_vlm.adapters.llava.tower' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["False", "False"]
