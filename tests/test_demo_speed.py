"""What makes the demo fast: LoRA on the top layers only, CRA-before once per run, the estimate."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from test_stage1_train import scene_records, tiny_cfg

from llm2clip_vlm import config_io
from llm2clip_vlm.cli import demo_recipe_path
from llm2clip_vlm.estimate import estimate_build, format_estimate
from llm2clip_vlm.recipe import RunConfig
from llm2clip_vlm.text.evaluate import CRA_BEFORE
from llm2clip_vlm.text.lora import wrap_lora
from llm2clip_vlm.text.modeling import ModelRef, decoder_of, load_bidirectional
from llm2clip_vlm.text.tiny import save_tiny_llm
from llm2clip_vlm.text.train import train_stage1


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llm(tmp_path_factory.mktemp("speed") / "llama", layers=4)


def test_top_layers_lora_adapts_only_the_last_layers_and_backward_stops_there(tiny4: Path) -> None:
    cfg = tiny_cfg(tiny4)
    cfg.stage1.lora.top_layers = 1
    model = wrap_lora(decoder_of(load_bidirectional(ModelRef(str(tiny4)), dtype=torch.float32)), cfg.stage1)
    adapted = {n.split("layers.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert adapted == {"3"}  # the last of 4 layers only
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # Backward must not reach the frozen layers: record which layers' outputs get a gradient.
    reached: set[int] = set()
    layers = model.base_model.model.layers
    for i, layer in enumerate(layers):
        layer.register_full_backward_hook(lambda m, gi, go, i=i: reached.add(i))
    ids = torch.randint(0, 100, (2, 8))
    model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.sum().backward()
    assert reached == {3}
    cfg.stage1.lora.top_layers = 0
    full = wrap_lora(decoder_of(load_bidirectional(ModelRef(str(tiny4)), dtype=torch.float32)), cfg.stage1)
    assert sum(p.numel() for p in full.parameters() if p.requires_grad) == 4 * n_lora
    # More layers asked than the model has (a deep-LLM recipe on a shallow model): every layer.
    cfg.stage1.lora.top_layers = 5
    deep = wrap_lora(decoder_of(load_bidirectional(ModelRef(str(tiny4)), dtype=torch.float32)), cfg.stage1)
    assert sum(p.numel() for p in deep.parameters() if p.requires_grad) == 4 * n_lora


def test_cra_before_is_computed_once_per_run_directory(tiny4: Path, tmp_path: Path) -> None:
    train, held = scene_records(32), scene_records(20, offset=200)
    cfg = tiny_cfg(tiny4, max_steps=1)
    first = train_stage1(cfg.stage1, tmp_path / "run", train, held)
    saved = json.loads((tmp_path / "run" / CRA_BEFORE).read_text())
    assert saved["cra"] == first["eval"]["before"]
    # A planted value proves the rerun read it back instead of recomputing.
    (tmp_path / "run" / CRA_BEFORE).write_text(json.dumps({**saved, "cra": 12.5}))
    again = train_stage1(cfg.stage1, tmp_path / "run", train, held)
    assert again["eval"]["before"] == 12.5
    # Other caption pairs: recomputed.
    other = train_stage1(dataclasses.replace(cfg.stage1, cra_captions=10), tmp_path / "run", train, held)
    assert other["eval"]["before"] != 12.5


def test_estimate_counts_the_planned_work(tiny4: Path) -> None:
    cfg = config_io.load(RunConfig, demo_recipe_path(), [f"stage1.model={tiny4}"])
    train, held = scene_records(200), {"short": scene_records(50, offset=300)}
    est = estimate_build(cfg, train, held, rate=1e9)
    assert est is not None and est["total"] == pytest.approx(est["stage1"] + est["embed"] + est["stage2"])
    # The store pads its batches to embed.pad_to_multiple_of (the demo: 1); a multiple of 16 (or
    # 0: stage 1's 8) computes more tokens.
    assert cfg.embed.pad_to_multiple_of == 1
    for multiple in (16, 0):
        cfg.embed.pad_to_multiple_of = multiple
        assert estimate_build(cfg, train, held, rate=1e9)["embed"] > 1.1 * est["embed"]  # type: ignore[index]
    cfg.embed.pad_to_multiple_of = 1
    # Twice the stage-1 steps cost about twice the stage-1 time; LoRA on fewer layers costs less.
    cfg.stage1.loop.max_steps *= 2
    assert estimate_build(cfg, train, held, rate=1e9)["stage1"] > 1.8 * est["stage1"]  # type: ignore[index]
    cfg.stage1.lora.top_layers = 1
    cfg.stage1.loop.max_steps //= 2
    assert estimate_build(cfg, train, held, rate=1e9)["stage1"] < est["stage1"]  # type: ignore[index]

    # The pairing sets the share of long captions in a step. These images hold 2 short captions and
    # 1 long: cross-kind pairs are half long, "any" pairs hold 1 long of 3, and same-kind pairs are
    # all short-short, the cheapest step of the three.
    def with_pairing(pairing: str) -> float:
        cfg.stage1.pairing = pairing  # type: ignore[assignment]
        return estimate_build(cfg, train, held, rate=1e9)["stage1"]  # type: ignore[index]

    assert with_pairing("same_kind") < with_pairing("any") < with_pairing("cross_kind")
    # LoRA dropout costs extra forward time on a CPU (the masks' bernoulli draws).
    cfg.stage1.lora.dropout = 0.0
    no_dropout = estimate_build(cfg, train, held, rate=1e9)["stage1"]  # type: ignore[index]
    cfg.stage1.lora.dropout = 0.05
    assert estimate_build(cfg, train, held, rate=1e9)["stage1"] > 1.05 * no_dropout  # type: ignore[index]
    # A machine twice as fast: half the time.
    assert estimate_build(cfg, train, held, rate=2e9)["total"] == pytest.approx(  # type: ignore[index]
        estimate_build(cfg, train, held, rate=1e9)["total"] / 2  # type: ignore[index]
    )
    assert format_estimate({"stage1": 61, "embed": 5, "stage2": 600, "total": 666}, 2).startswith(
        "expected duration on this machine now (2 torch threads): ~11:06 (stage 1 1:01, embed 0:05, stage 2 10:00)"
    )
    cfg.stage1.model = "/nonexistent/model"
    assert estimate_build(cfg, train, held, rate=1e9) is None
