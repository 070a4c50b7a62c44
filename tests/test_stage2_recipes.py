"""The stage-2 recipes and accelerate launcher configs: they load, and say what SPEC says."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.utils import DistributedType

from llm2clip_vlm import config_io
from llm2clip_vlm.cli import demo_recipe_path
from llm2clip_vlm.recipe import RunConfig
from llm2clip_vlm.vision.backbones import known_backbones

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

# SPEC: shared width 1280 for EVA02-L and OpenAI-L, 1152 for SigLIP2 so400m.
EXPECTED = {
    "stage2-openai-clip-vit-l-14-336.yaml": ("clip", 1280),
    "stage2-eva02-l-14-336.yaml": ("timm", 1280),
    "stage2-siglip2-so400m.yaml": ("siglip", 1152),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_reference_stage2_recipes(name: str) -> None:
    cfg = config_io.load(RunConfig, RECIPES / name)
    kind, width = EXPECTED[name]
    s = cfg.stage2
    assert s.backbone.kind == kind and s.backbone.kind in known_backbones() and s.backbone.name_or_path
    assert s.embed_dim == width
    assert (s.lr, s.batch_size, s.layer_decay, s.loop.grad_clip, s.loop.warmup_steps) == (
        1e-5,
        4096,
        0.85,
        5.0,
        0,
    )
    assert s.loop.precision == "bf16" and s.gradient_checkpointing
    assert {"coco", "flickr30k", "urban1k", "docci"} <= set(cfg.data.heldout)


def test_accelerate_configs_parse() -> None:
    found = {
        p.name: ClusterConfig.from_yaml_file(str(p)) for p in sorted((RECIPES / "accelerate").glob("*.yaml"))
    }
    assert {"ddp-8gpu.yaml", "fsdp-8gpu.yaml", "multinode-2x8.yaml"} <= set(found)
    for name, c in found.items():
        assert c.num_processes % c.num_machines == 0, name
        assert c.mixed_precision == "bf16", name
    assert found["ddp-8gpu.yaml"].distributed_type == DistributedType.MULTI_GPU
    assert found["ddp-8gpu.yaml"].num_processes == 8
    assert found["fsdp-8gpu.yaml"].distributed_type == DistributedType.FSDP
    # FSDP2: the trainers' own fully_shard path (training/fsdp.py), the one tests/test_fsdp.py runs.
    assert found["fsdp-8gpu.yaml"].fsdp_config["fsdp_version"] == 2
    assert (found["multinode-2x8.yaml"].num_machines, found["multinode-2x8.yaml"].num_processes) == (2, 16)


def test_demo_recipe_stage2_fits_the_demo_world() -> None:
    cfg = config_io.load(RunConfig, demo_recipe_path())
    s = cfg.stage2
    # A random ViT with one 32 px patch per cell of the worlds' 3x3 layouts (96 px images).
    assert s.backbone.name_or_path == "" and s.backbone.image_size == 96 and s.backbone.patch_size == 32
    assert s.backbone.image_size % s.backbone.patch_size == 0
    assert s.batch_size <= cfg.data.demo_train_images
