"""The config system: recipes, overrides, and the errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llm2clip_vlm import config_io
from llm2clip_vlm.cli import demo_recipe_path
from llm2clip_vlm.config_io import ConfigError
from llm2clip_vlm.recipe import RunConfig


def test_defaults_are_the_reference_method() -> None:
    cfg = RunConfig()
    assert cfg.stage1.scale == 50.0
    assert (cfg.stage1.lora.r, cfg.stage1.lora.alpha, cfg.stage1.lora.dropout) == (16, 32, 0.05)
    assert cfg.stage1.lr == 2e-4 and cfg.stage1.loop.warmup_steps == 300 and cfg.stage1.batch_size == 512
    assert cfg.stage2.lr == 1e-5 and cfg.stage2.layer_decay == 0.85 and cfg.stage2.betas == [0.9, 0.98]
    assert cfg.stage2.weight_decay == 0.05 and cfg.stage2.loop.grad_clip == 5.0 and cfg.stage2.eps == 1e-6


def test_recipe_and_overrides(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"stage1": {"lr": 1e-4, "lora": {"r": 8}}}))
    cfg = config_io.load(RunConfig, recipe, ["stage1.lora.alpha=64", "stage2.loss=siglip", "stage1.lr=3e-4"])
    assert cfg.stage1.lr == 3e-4  # the override wins over the recipe
    assert cfg.stage1.lora.r == 8 and cfg.stage1.lora.alpha == 64
    assert cfg.stage1.lora.dropout == 0.05  # untouched keys of a partial section keep their defaults
    assert cfg.stage2.loss == "siglip"
    out = config_io.dump(cfg, tmp_path / "run" / "config.yaml")
    assert config_io.load(RunConfig, out) == cfg  # the resolved config round-trips


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stage1.lrr=1", "stage1.lrr"),
        ("stage9.lr=1", "stage9"),
        ("stage1.lr=fast", "stage1.lr"),
        ("stage1.batch_size=1.5", "stage1.batch_size"),
        ("stage2.loss=hinge", "stage2.loss"),
        ("stage1.gradient_checkpointing=maybe", "stage1.gradient_checkpointing"),
        ("stage1.lora=3", "stage1.lora"),
        ("novalue", "section.key=value"),
    ],
)
def test_bad_keys_and_types_are_refused_by_name(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        config_io.load(RunConfig, None, [override])


def test_recipe_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        config_io.load(RunConfig, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        config_io.load(RunConfig, bad)
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("stage1: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config_io.load(RunConfig, unsafe)


def test_embedded_demo_recipe_loads() -> None:
    cfg = config_io.load(RunConfig, demo_recipe_path())
    assert cfg.stage1.model.startswith("builtin:")


def test_every_recipe_in_the_repo_validates() -> None:
    root = Path(__file__).resolve().parents[1] / "recipes"
    for recipe in sorted(root.rglob("*.yaml")):
        if "accelerate" in recipe.parts:  # accelerate launcher configs, not run configs
            continue
        config_io.load(RunConfig, recipe)


def test_every_stage_embeds_one_loop_config_with_its_own_defaults() -> None:
    from llm2clip_vlm.training.config import LoopConfig

    cfg = config_io.load(
        RunConfig, None, ["stage2.loop.max_steps=3", "llava.finetune.loop.keep_checkpoints=5"]
    )
    loops = {
        "stage1": cfg.stage1.loop, "stage2": cfg.stage2.loop,
        "pretrain": cfg.llava.pretrain.loop, "finetune": cfg.llava.finetune.loop,
    }  # fmt: skip
    assert all(type(loop) is LoopConfig for loop in loops.values())
    # A partial loop section keeps the stage's own defaults for the keys it does not set.
    assert (cfg.stage2.loop.max_steps, cfg.stage2.loop.grad_clip) == (3, 5.0)
    assert (cfg.stage1.loop.schedule, cfg.stage1.loop.warmup_steps, cfg.stage1.loop.grad_clip) == (
        "linear",
        300,
        1.0,
    )
    assert (cfg.llava.finetune.loop.warmup_ratio, cfg.llava.finetune.loop.keep_checkpoints) == (0.03, 5)
    with pytest.raises(ConfigError, match="stage2.grad_clip"):
        config_io.load(RunConfig, None, ["stage2.grad_clip=1.0"])  # the old place is refused


def test_a_moved_key_of_an_older_recipe_names_its_new_place() -> None:
    # MNTP's own step and schedule keys moved under stage1.mntp.loop (one LoopConfig per run).

    for old, new in [("steps", "max_steps"), ("warmup_steps", "warmup_steps"), ("schedule", "schedule")]:
        value = "linear" if old == "schedule" else "5"
        with pytest.raises(ConfigError) as e:
            config_io.load(RunConfig, None, [f"stage1.mntp.{old}={value}"])
        assert (
            str(e.value)
            == f"'stage1.mntp.{old}' is now 'stage1.mntp.loop.{new}': rename it in the recipe or --set"
        )
    cfg = config_io.load(RunConfig, None, ["stage1.mntp.loop.max_steps=5"])
    assert cfg.stage1.mntp.loop.max_steps == 5
    with pytest.raises(ConfigError, match="unknown key 'stage1.mntp.bogus'"):
        config_io.load(RunConfig, None, ["stage1.mntp.bogus=1"])
