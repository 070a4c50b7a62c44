"""The embedded demo recipe and the knobs it uses to fit a shared 2-core CPU."""

from __future__ import annotations

import pytest
import torch
import typer

from llm2clip_vlm import config_io
from llm2clip_vlm.cli import demo_recipe_path, resolve_config
from llm2clip_vlm.data.records import Caption, ImageCaptions, keep_captions
from llm2clip_vlm.recipe import RunConfig
from llm2clip_vlm.vision.train import total_steps


def test_keep_captions_keeps_the_first_of_each_kind_in_order() -> None:
    caps = [Caption("s1", "short"), Caption("l1", "long"), Caption("s2", "short"), Caption("l2", "long")]
    caps.append(Caption("s3", "short"))
    records = [ImageCaptions("a", "/a.png", caps, source="x:1"), ImageCaptions("b", "/b.png", caps[1:2])]
    one = keep_captions(records, 1)
    assert [c.text for c in one[0].captions] == ["s1", "l1"]
    assert [c.text for c in one[1].captions] == ["l1"]  # an image without short captions keeps its long one
    assert (one[0].key, one[0].source) == ("a", "x:1")
    assert [c.text for c in keep_captions(records, 2)[0].captions] == ["s1", "l1", "s2", "l2"]
    assert keep_captions(records, 0)[0] is records[0]
    assert len(records[0].captions) == 5  # the input is not changed
    with pytest.raises(ValueError, match="captions per kind"):
        keep_captions(records, -1)


def test_runtime_threads_are_applied_by_every_command() -> None:
    before = torch.get_num_threads()
    try:
        resolve_config(None, ["runtime.threads=1"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(typer.Exit):
        resolve_config(None, ["runtime.threads=-2"])


def test_demo_recipe_schedules_fit_the_demo_world() -> None:
    cfg = config_io.load(RunConfig, demo_recipe_path())
    s2 = cfg.stage2
    # The cosine schedule must have room to warm up (a from-scratch ViT collapsed with too short a
    # warm-up, docs/BENCHMARKS.md) and then decay over most of the steps.
    total = total_steps(s2, cfg.data.demo_train_images)
    assert total >= 100 and 40 <= s2.loop.warmup_steps <= total // 4
    assert s2.loop.max_seconds > 0 and cfg.stage1.loop.max_seconds > 0
    # Every held-out set has at least 500 images (the acceptance floor of a retrieval set).
    assert cfg.data.demo_heldout_images >= 500
    # A random ViT trains from scratch: no layer-wise decay, an lr far above the fine-tuning 1e-5.
    assert s2.layer_decay == 1.0 and s2.lr >= 1e-4
    # Stage 1 pairs captions of one kind: with short-long pairs a world whose long captions say more
    # than its short ones did not learn in stage 2 (issue 28, docs/BENCHMARKS.md).
    assert cfg.stage1.pairing == "same_kind"
    # fp32 everywhere: bf16 autocast is slower on CPUs without bf16 units.
    assert (cfg.stage1.loop.precision, cfg.embed.precision, s2.loop.precision) == ("fp32",) * 3


def test_demo_llava_recipe_feeds_the_layer_that_keeps_position_and_pretrains_at_a_constant_rate() -> None:
    """Issue 29 (docs/BENCHMARKS.md, "Where the demo LLaVA's image content is lost"): the demo
    tower's hidden state 1 (-6 of 7) keeps an object token's cell (probe 68 % vs 39 % at -2), and a constant
    pretraining rate keeps aligning where the cosine had decayed to 0; the LLM trains in the
    pretraining; the finetune's budget."""
    cfg = config_io.load(RunConfig, demo_recipe_path())
    llava = cfg.llava
    assert (llava.vision_feature_layer, llava.select_strategy) == (1, "default")  # -6 of the demo tower
    pre, ft = llava.pretrain, llava.finetune
    assert (pre.loop.schedule, pre.loop.max_steps, pre.lr, pre.batch_size) == ("constant", 200, 1e-4, 16)
    # The LLM learns from the captions too (ShareGPT4V's pretraining), the projector at LLaVA's
    # pretraining rate: the first position gap over blind (docs/BENCHMARKS.md, "A LLaVA whose LLM
    # also learns from the captions").
    assert (pre.tune, pre.projector_lr) == ("full", 1e-3)
    assert (ft.loop.schedule, ft.loop.max_steps, ft.lr, ft.tune, ft.template) == (
        "cosine", 80, 1e-4, "full", "vicuna_v1",
    )  # fmt: skip
    assert ft.projector_lr == 1e-3 and not ft.eval_before and ft.eval_blind == "shuffle"
