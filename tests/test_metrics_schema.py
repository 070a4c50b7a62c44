"""One metrics.json schema for every stage (training/session.py, docs/DATA.md), read by ``report``.

Tiny runs of stage 1, stage 2 and LLaVA pretrain each write metrics.json with the same top-level
sections, the same ``train`` keys, and ``report`` reads each; an older run's metrics.json is named
in one warning line instead of breaking the report.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from llm2clip_vlm.reports.runs import load_runs
from llm2clip_vlm.training.session import SCHEMA, SECTIONS, read_metrics

TRAIN_KEYS = {
    "steps", "planned_steps", "seconds", "seconds_per_step", "samples_per_second", "global_batch", "processes",
    "losses", "first_loss", "final_loss", "loss_start_mean", "loss_end_mean", "skipped_steps",
}  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.set_num_threads(1)
    from fault_driver import run_stage2
    from test_llava_train import _cfg
    from test_stage1_train import scene_records, tiny_cfg

    from llm2clip_vlm.commands import run_llava
    from llm2clip_vlm.data.synthetic_llava import write_llava_demo
    from llm2clip_vlm.text.tiny import save_tiny_llm
    from llm2clip_vlm.text.train import train_stage1
    from llm2clip_vlm.tower.synthetic import TowerShape, save_random_tower

    root = tmp_path_factory.mktemp("schema")
    out = {name: root / name for name in ("stage1", "stage2", "llava-pretrain")}
    train_stage1(tiny_cfg(save_tiny_llm(root / "llama"), max_steps=2).stage1, out["stage1"],
                 scene_records(16), scene_records(8, offset=200))  # fmt: skip
    run_stage2(root / "s2data", out["stage2"], ["stage2.loop.max_steps=2"])
    write_llava_demo(root / "llava", pretrain_images=8, instruct_images=8, heldout_images=4, image_size=32)
    parts = {
        "root": root, "data": root / "llava",
        "tower": save_random_tower(root / "tower", "clip", TowerShape(32, 8, 32, 3, 2, 64), seed=1),
        "llm": save_tiny_llm(root / "llm", hidden_size=64, seed=2),
    }  # fmt: skip
    run_llava(_cfg(parts, "pretrain", ["llava.pretrain.loop.max_steps=2"]), out["llava-pretrain"], "pretrain")
    return out


def test_every_stage_writes_the_same_sections_and_train_keys(runs: dict[str, Path]) -> None:
    for stage, run in runs.items():
        m = read_metrics(run / "metrics.json")
        assert tuple(m) == SECTIONS and m["schema"] == SCHEMA and m["stage"] == stage, stage
        assert set(m["train"]) == TRAIN_KEYS, stage
        assert m["train"]["steps"] == m["train"]["planned_steps"] == 2 and len(m["train"]["losses"]) == 2
        assert m["train"]["final_loss"] == m["train"]["losses"][-1] and m["train"]["processes"] == 1
        assert {"metric", "before", "after"} <= set(m["eval"]), stage
    metric = {s: read_metrics(r / "metrics.json")["eval"]["metric"] for s, r in runs.items()}
    assert metric == {"stage1": "cra", "stage2": "retrieval", "llava-pretrain": "heldout"}


def test_report_reads_every_stage_and_names_an_older_file_in_one_line(
    runs: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    loaded = load_runs(list(runs.values()))
    assert [r.kind for r in loaded] == ["stage1", "stage2", "llava"]
    assert all(r.summary["steps"] == 2 and r.summary["planned_steps"] == 2 for r in loaded)

    old = tmp_path / "old"
    old.mkdir()
    (old / "metrics.jsonl").write_bytes((runs["stage2"] / "metrics.jsonl").read_bytes())
    (old / "metrics.json").write_text(json.dumps({"stage2": {"train": {"steps": 2, "losses": [1.0, 0.5]}}}))
    with caplog.at_level(logging.WARNING):
        (run,) = load_runs([old])
    assert run.summary == {} and run.kind == "stage2"
    warned = [r.getMessage() for r in caplog.records if "metrics.json" in r.getMessage()]
    assert len(warned) == 1 and str(old / "metrics.json") in warned[0] and "older run" in warned[0]
