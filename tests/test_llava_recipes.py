"""LLaVA recipes and launcher configs: they load, and carry LLaVA-1.5's reference settings."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.utils import DistributedType

from llm2clip_vlm import config_io
from llm2clip_vlm.cli import demo_recipe_path
from llm2clip_vlm.recipe import RunConfig

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize(
    "name",
    ["llava15-7b-clip-vit-l-14-336.yaml", "llava15-7b-llm2clip.yaml", "llava15-7b-llm2clip-released.yaml"],
)
def test_reference_llava_recipes(name: str) -> None:
    cfg = config_io.load(RunConfig, RECIPES / name)
    pre, ft = cfg.llava.pretrain, cfg.llava.finetune
    assert cfg.llava.tower and cfg.llava.llm.endswith("vicuna-7b-v1.5")
    assert (cfg.llava.vision_feature_layer, cfg.llava.select_strategy) == (-2, "default")
    assert (pre.template, pre.tune, pre.batch_size, pre.lr, pre.loop.epochs, pre.max_length) == (
        "plain", "projector", 256, 1e-3, 1.0, 2048,
    )  # fmt: skip
    assert (pre.loop.warmup_ratio, pre.weight_decay, pre.loop.schedule) == (0.03, 0.0, "cosine")
    assert (ft.template, ft.tune, ft.batch_size, ft.lr, ft.loop.epochs, ft.max_length) == (
        "vicuna_v1", "full", 128, 2e-5, 1.0, 2048,
    )  # fmt: skip
    assert ft.image_aspect_ratio == "pad" and ft.group_by_modality
    assert (
        pre.loop.precision == ft.loop.precision == "bf16"
        and pre.gradient_checkpointing
        and ft.gradient_checkpointing
    )
    assert pre.batch_size % (8 * pre.micro_batch_size) == 0 and ft.batch_size % (8 * ft.micro_batch_size) == 0


def test_lora_recipe_and_defaults_are_llavas() -> None:
    cfg = config_io.load(RunConfig, RECIPES / "llava15-7b-llm2clip-lora.yaml")
    ft = cfg.llava.finetune
    assert (ft.tune, ft.lora_r, ft.lora_alpha, ft.lr, ft.projector_lr) == ("lora", 128, 256, 2e-4, 2e-5)
    # Defaults alone are the reference too (recipes set only what differs).
    d = RunConfig().llava
    assert (d.pretrain.template, d.pretrain.lr, d.finetune.template, d.finetune.lr) == (
        "plain",
        1e-3,
        "vicuna_v1",
        2e-5,
    )


def test_llava_accelerate_configs() -> None:
    found = {
        p.name: ClusterConfig.from_yaml_file(str(p)) for p in (RECIPES / "accelerate").glob("llava-*.yaml")
    }
    assert set(found) == {
        "llava-deepspeed-zero3-8gpu.yaml",
        "llava-deepspeed-zero3-2x8.yaml",
        "llava-fsdp-8gpu.yaml",
    }
    ds = found["llava-deepspeed-zero3-8gpu.yaml"]
    assert ds.distributed_type == DistributedType.DEEPSPEED and ds.deepspeed_config["zero_stage"] == 3
    assert found["llava-deepspeed-zero3-2x8.yaml"].num_machines == 2
    assert found["llava-fsdp-8gpu.yaml"].distributed_type == DistributedType.FSDP
    assert all(c.mixed_precision == "bf16" for c in found.values())


def test_demo_recipe_runs_llava_on_the_cpu_demo() -> None:
    cfg = config_io.load(RunConfig, demo_recipe_path())
    assert cfg.llava.llm == "builtin:smollm2-135m-instruct" and cfg.llava.tower
    for p in (cfg.llava.pretrain, cfg.llava.finetune):
        assert p.loop.precision == "fp32" and p.loop.max_seconds > 0 and not p.data.path


def test_siglip2_released_tower_recipe_keeps_every_token() -> None:
    cfg = config_io.load(RunConfig, RECIPES / "llava15-7b-llm2clip-siglip2-so400m-224.yaml")
    assert cfg.llava.tower.endswith("llm2clip-siglip2-so400m-224-imported/tower")
    # SigLIP has no CLS: "full" keeps all 256 patches (LLaVA's "default" drops the first token).
    assert (cfg.llava.vision_feature_layer, cfg.llava.select_strategy) == (-2, "full")
    ref = config_io.load(RunConfig, RECIPES / "llava15-7b-llm2clip-released.yaml")
    assert cfg.llava.pretrain == ref.llava.pretrain and cfg.llava.finetune == ref.llava.finetune
