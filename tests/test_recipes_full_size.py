"""Every reference recipe's models at full size on the meta device, through the package's own
builders (``llm2clip_vlm.plan.meta``): parameter counts, what trains, and the shapes that flow
between stages. Nothing is downloaded or allocated: the configs are the reference models' hub
``config.json`` files, shipped in ``llm2clip_vlm/plan/known/``.

Published sizes the counts are checked against: Llama-3-8B 8.03B (Meta's model card), Llama-3.2-1B
1.24B, Vicuna-7B 6.74B (LLaMA-2-7B's architecture), OpenAI CLIP ViT-L/14-336 vision tower ~303M,
SigLIP so400m vision tower ~428M (the "400M" with its attention-pooling head); LLaVA-1.5's
``mlp2x_gelu`` projector 1024 -> 4096 -> 4096 = 21.0M (haotian-liu/LLaVA
``llava/model/multimodal_projector/builder.py``: Linear(mm_hidden, hidden), GELU, Linear(hidden, hidden)).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from llm2clip_vlm import config_io
from llm2clip_vlm.plan import meta
from llm2clip_vlm.plan.known import KNOWN, known_config_path, load_config
from llm2clip_vlm.recipe import RunConfig
from llm2clip_vlm.text.modeling import bidirectional_from_config

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
CLIP_L_336 = "openai/clip-vit-large-patch14-336"
SIGLIP2 = "google/siglip2-so400m-patch14-384"


def recipe(name: str, *overrides: str) -> RunConfig:
    return config_io.load(RunConfig, RECIPES / name, list(overrides))


def on_meta(model: torch.nn.Module) -> bool:
    return all(p.is_meta for p in model.parameters())


def lora_params(layers: int, r: int, shapes: list[tuple[int, int]]) -> int:
    """LoRA's A (in x r) and B (r x out) on each (in, out) projection of every layer."""
    return layers * sum(r * (i + o) for i, o in shapes)


def llama_projections(c: Any) -> list[tuple[int, int]]:
    h, f = c.hidden_size, c.intermediate_size
    kv = c.num_key_value_heads * (getattr(c, "head_dim", None) or h // c.num_attention_heads)
    return [(h, h), (h, kv), (h, kv), (h, h), (h, f), (h, f), (f, h)]


# -- the shipped configs are the reference models ------------------------------------------------


def test_shipped_configs_are_the_reference_models() -> None:
    assert all(known_config_path(k) is not None and known_config_path(k).is_file() for k in KNOWN)
    llama = load_config("meta-llama/Meta-Llama-3-8B-Instruct")
    assert (llama.hidden_size, llama.intermediate_size, llama.num_hidden_layers) == (4096, 14336, 32)
    assert (llama.num_key_value_heads, llama.vocab_size, llama.rope_parameters["rope_theta"]) == (
        8,
        128256,
        500000.0,
    )
    small = load_config("meta-llama/Llama-3.2-1B-Instruct")
    assert (small.hidden_size, small.num_hidden_layers, small.tie_word_embeddings) == (2048, 16, True)
    vicuna = load_config("checkpoints/vicuna-7b-v1.5")  # a recipe's local path, matched by name
    assert (vicuna.intermediate_size, vicuna.num_key_value_heads, vicuna.vocab_size) == (11008, 32, 32000)
    clip = load_config(CLIP_L_336, vision=True)
    assert (clip.model_type, clip.image_size, clip.patch_size, clip.hidden_act) == (
        "clip_vision_model", 336, 14, "quick_gelu",
    )  # fmt: skip
    siglip = load_config(SIGLIP2, vision=True)
    assert (siglip.model_type, siglip.hidden_size, siglip.num_hidden_layers, siglip.patch_size) == (
        "siglip_vision_model", 1152, 27, 14,
    )  # fmt: skip


def test_an_unknown_model_is_one_clear_error() -> None:
    from llm2clip_vlm.plan.known import UnknownModelError

    with pytest.raises(UnknownModelError, match="no config.json there"):
        load_config("nobody/no-such-model-xyz")


# -- stage 1 -------------------------------------------------------------------------------------


def test_llama3_8b_is_8_03b() -> None:
    lm = bidirectional_from_config(
        load_config("meta-llama/Meta-Llama-3-8B-Instruct"), device="meta", with_lm_head=True
    )
    assert on_meta(lm) and meta.count(lm).params == 8_030_261_248


def test_stage1_llama3_8b_lora() -> None:
    cfg = recipe("stage1-llama3-8b.yaml")
    llm = load_config(cfg.stage1.model)
    model = meta.stage1_model(cfg.stage1, llm)
    c = meta.count(model)
    assert on_meta(model)
    # The bare bidirectional decoder (no LM head) + LoRA r16 on all 7 projections of 32 layers.
    assert c.trainable == lora_params(32, 16, llama_projections(llm)) == 41_943_040
    assert c.params - c.trainable == 7_504_924_672
    assert sum(1 for n, _ in model.named_modules() if n.endswith("lora_A.default")) == 7 * 32
    assert model.config.is_causal is False
    # bf16 base weights on a GPU (precision bf16), frozen; the adapters train.
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    # The caption embedding stage 2 reads: mean-pooled last hidden states, 4096-d.
    out = model(input_ids=torch.zeros(2, 16, dtype=torch.long, device="meta")).last_hidden_state
    assert out.shape == (2, 16, 4096)


def test_stage1_llama3_8b_qlora_counts_4bit_by_arithmetic() -> None:
    cfg = recipe("stage1-llama3-8b-qlora.yaml")
    model = meta.stage1_model(cfg.stage1, load_config(cfg.stage1.model))
    c = meta.count(model)
    four_bit = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert len(four_bit) == 7 * 32
    assert c.trainable == 41_943_040
    # Every frozen projection weight is NF4: all non-embedding, non-norm parameters but LoRA's.
    assert c.four_bit == 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336) == 6_979_321_856
    # ~0.52 bytes per 4-bit weight, the embeddings and norms in fp32 (peft's k-bit preparation).
    emb = 128256 * 4096
    assert c.weight_bytes == pytest.approx(
        c.four_bit * meta.NF4_BYTES + 4 * (c.params - c.four_bit - c.trainable) + 4 * c.trainable
    )
    assert (
        model.get_base_model().embed_tokens.weight.dtype == torch.float32 and emb * 4 < c.weight_bytes < 6.0e9
    )


def test_stage1_on_llama_3_2_1b() -> None:
    cfg = recipe("stage1-llama3-8b.yaml", "stage1.model=meta-llama/Llama-3.2-1B-Instruct")
    llm = load_config(cfg.stage1.model)
    c = meta.count(meta.stage1_model(cfg.stage1, llm))
    assert c.params - c.trainable == 1_235_814_400  # tied embeddings: 1.24B
    assert c.trainable == lora_params(16, 16, llama_projections(llm)) == 11_272_192


# -- stage 2 -------------------------------------------------------------------------------------

ADAPTOR_4096 = 4 * (2 * 4096 + 2 * 4096 * 8192 + 8192 + 4096) + 2 * 4096 + 4096 * 1280 + 1280


@pytest.mark.parametrize(
    ("name", "vision_params", "embed_dim", "image_size", "head", "scalars"),
    [
        # A bias-free 1024 -> 1280 image head; the logit scale.
        ("stage2-openai-clip-vit-l-14-336.yaml", 303_507_456, 1280, 336, 1024 * 1280, 1),
        # The reference's SigLIP2 tower at 224 px (16 x 16 positions, not 384 px's 27 x 27: 473 x
        # 1152 fewer position weights), no image head (Llama3.1-8B-Siglip2-So-L-14-224.json), and
        # the sigmoid loss's logit scale and bias.
        ("stage2-siglip2-so400m.yaml", 428_225_600 - 473 * 1152, 1152, 224, 0, 2),
    ],
)
def test_stage2_full_size(
    name: str, vision_params: int, embed_dim: int, image_size: int, head: int, scalars: int
) -> None:
    cfg = recipe(name)
    vision = load_config(cfg.stage2.backbone.name_or_path, vision=True)
    model = meta.stage2_model(cfg.stage2, vision, text_dim=4096)
    assert on_meta(model)
    assert meta.count(model.vision).params == vision_params
    adaptor = ADAPTOR_4096 - 4096 * 1280 - 1280 + 4096 * embed_dim + embed_dim
    assert meta.count(model.text_adaptor).params == adaptor
    c = meta.count(model)
    assert c.params == c.trainable == vision_params + adaptor + head + scalars
    # 4096-d caption embeddings into the adaptor, images at the tower's size, one shared width.
    out = model(
        pixel_values=torch.empty(2, 3, image_size, image_size, device="meta"),
        text_embeddings=torch.empty(2, 4096, device="meta"),
    )
    assert out["image_features"].shape == out["text_features"].shape == (2, embed_dim)
    with pytest.raises(ValueError, match="width 2048"):
        model.get_text_features_from_embeddings(torch.empty(2, 2048, device="meta"))


def test_stage2_on_a_llama_3_2_1b_store() -> None:
    cfg = recipe("stage2-openai-clip-vit-l-14-336.yaml")
    model = meta.stage2_model(cfg.stage2, load_config(CLIP_L_336, vision=True), text_dim=2048)
    assert model.text_adaptor.proj.in_features == 2048
    assert model(text_embeddings=torch.empty(3, 2048, device="meta"))["text_features"].shape == (3, 1280)


def test_stage2_eva02_l_14_336() -> None:
    pytest.importorskip("timm", reason="EVA02 is a timm model: pip install 'llm2clip-vlm[timm]'")
    cfg = recipe("stage2-eva02-l-14-336.yaml")
    model = meta.stage2_model(cfg.stage2, cfg.stage2.backbone.name_or_path, text_dim=4096)
    assert 300e6 < meta.count(model.vision).params < 310e6 and model.vision.hidden_size == 1024


# -- LLaVA-1.5-7B --------------------------------------------------------------------------------

PROJECTOR_CLIP = 1024 * 4096 + 4096 + 4096 * 4096 + 4096  # 20,979,712
VICUNA_7B = 6_738_415_616
IMAGE_ROW = 2 * 4096  # the <image> token's new rows in the embeddings and the LM head


def projector_input(model: Any, image_size: int) -> tuple[int, ...]:
    """Shape of what the tower hands the projector for two images (on meta)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    seen: list[tuple[int, ...]] = []
    hook = base.model.multi_modal_projector.register_forward_hook(
        lambda m, i, o: seen.append(tuple(i[0].shape))
    )
    px = torch.empty(2, 3, image_size, image_size, device="meta", dtype=torch.bfloat16)
    try:
        feats = base.model.get_image_features(pixel_values=px).pooler_output
    finally:
        hook.remove()
    assert [tuple(f.shape) for f in feats] == [(seen[0][1], 4096)] * 2
    return seen[0]


@pytest.fixture(scope="module")
def vicuna() -> Any:
    return load_config("lmsys/vicuna-7b-v1.5")


@pytest.mark.parametrize(
    "name",
    ["llava15-7b-clip-vit-l-14-336.yaml", "llava15-7b-llm2clip.yaml", "llava15-7b-llm2clip-released.yaml"],
)
def test_llava_7b_pretrain_and_full_finetune(name: str, vicuna: Any) -> None:
    cfg = recipe(name)
    tower = load_config(CLIP_L_336, vision=True)  # every reference tower is a ViT-L/14-336
    pre = meta.llava_model(cfg.llava, "pretrain", tower, vicuna)
    c = meta.count(pre)
    assert on_meta(pre)
    assert c.params == 303_507_456 + VICUNA_7B + IMAGE_ROW + PROJECTOR_CLIP
    assert c.trainable == PROJECTOR_CLIP  # only the projector trains
    assert pre.model.vision_tower.dtype == pre.model.language_model.dtype == torch.bfloat16
    assert pre.model.multi_modal_projector.linear_1.weight.dtype == torch.float32
    assert projector_input(pre, 336) == (2, 576, 1024)  # 576 patch tokens (CLS dropped), layer -2
    full = meta.count(meta.llava_model(cfg.llava, "finetune", tower, vicuna))
    assert full.trainable == VICUNA_7B + IMAGE_ROW + PROJECTOR_CLIP  # projector + the whole LLM
    assert full.params == c.params


def test_llava_7b_lora_finetune(vicuna: Any) -> None:
    cfg = recipe("llava15-7b-llm2clip-lora.yaml")
    model = meta.llava_model(cfg.llava, "finetune", load_config(CLIP_L_336, vision=True), vicuna)
    c = meta.count(model)
    lora = lora_params(32, 128, llama_projections(vicuna))
    assert lora == 319_815_680 and c.trainable == lora + PROJECTOR_CLIP
    assert not any("vision_tower" in n for n, _ in model.named_modules() if n.endswith("lora_A.default"))


def test_llava_7b_qlora_finetune(vicuna: Any) -> None:
    cfg = recipe("llava15-7b-llm2clip-lora.yaml", "llava.finetune.tune=qlora")
    model = meta.llava_model(cfg.llava, "finetune", load_config(CLIP_L_336, vision=True), vicuna)
    c = meta.count(model)
    assert c.four_bit == 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)  # every LLM projection, not lm_head
    assert c.trainable == lora_params(32, 128, llama_projections(vicuna)) + PROJECTOR_CLIP


def test_llava_7b_on_a_siglip2_tower(vicuna: Any) -> None:
    cfg = recipe("llava15-7b-llm2clip.yaml")
    model = meta.llava_model(cfg.llava, "pretrain", load_config(SIGLIP2, vision=True), vicuna)
    # No CLS token: all 27 x 27 patch tokens, 1152-d, into the 4096-d projector.
    assert model.config.vision_feature_select_strategy == "full"
    assert projector_input(model, 384) == (2, 729, 1152)
    assert meta.count(model).trainable == 1152 * 4096 + 4096 + 4096 * 4096 + 4096


def test_llava_7b_on_the_released_siglip2_tower(vicuna: Any) -> None:
    # The released LLM2CLIP SigLIP2 tower is so400m/14 at 224 px: 16 x 16 patch tokens of 1152-d.
    cfg = recipe("llava15-7b-llm2clip-siglip2-so400m-224.yaml")
    siglip_224 = load_config("google/siglip2-so400m-patch14-224", vision=True)
    for phase in ("pretrain", "finetune"):
        model = meta.llava_model(cfg.llava, phase, siglip_224, vicuna)
        assert model.config.vision_feature_select_strategy == "full"
        assert projector_input(model, 224) == (2, 256, 1152)
    assert meta.count(model).trainable == 6_759_403_520 - 1024 * 4096 + 1152 * 4096  # full finetune


def test_llava_refuses_a_timm_tower(vicuna: Any) -> None:
    class TimmConfig:  # what a timm tower's config.json gives: no model_type
        num_prefix_tokens = 1

    with pytest.raises(ValueError, match="not a transformers vision model"):
        meta.llava_model(recipe("llava15-7b-llm2clip.yaml").llava, "pretrain", TimmConfig(), vicuna)


def test_every_recipe_file_is_built_here() -> None:
    # A new recipe gets its full-size build in this file (or in the CLI plan tests) before it lands.
    covered = {
        "stage1-llama3-8b.yaml", "stage1-llama3-8b-qlora.yaml", "stage2-openai-clip-vit-l-14-336.yaml",
        "stage2-siglip2-so400m.yaml", "stage2-eva02-l-14-336.yaml", "llava15-7b-clip-vit-l-14-336.yaml",
        "llava15-7b-llm2clip.yaml", "llava15-7b-llm2clip-released.yaml", "llava15-7b-llm2clip-lora.yaml",
        "llava15-7b-llm2clip-siglip2-so400m-224.yaml",
    }  # fmt: skip
    assert {p.name for p in RECIPES.glob("*.yaml")} == covered
