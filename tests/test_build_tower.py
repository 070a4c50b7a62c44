"""``build-tower`` end to end on a tiny LLM and the synthetic world: artifacts, skipping, reruns."""

from __future__ import annotations

import json
from pathlib import Path

import cli_fork
import pytest
import torch
from typer.testing import CliRunner

from llm2clip_vlm import config_io
from llm2clip_vlm.cli import app
from llm2clip_vlm.pipeline import stage_fingerprint
from llm2clip_vlm.recipe import RunConfig

TINY = [
    "data.demo_train_images=48",
    "data.demo_heldout_images=16",
    "stage1.loop.max_steps=2",
    "stage1.batch_size=4",
    "stage1.cra_captions=16",
    "stage2.loop.max_steps=2",
    "stage2.batch_size=8",
    "stage2.embed_dim=32",
    "stage2.num_workers=0",
    "stage2.backbone.hidden_size=32",
    "stage2.backbone.num_layers=2",
    "stage2.backbone.num_heads=2",
    "stage2.backbone.image_size=32",
]


def _build(tmp_path: Path, llm: Path, extra: list[str] = (), from_stage: str | None = None) -> str:
    args = ["build-tower", "-o", str(tmp_path / "run"), "--set", f"stage1.model={llm}"]
    for s in [*TINY, *extra]:
        args += ["--set", s]
    if from_stage:
        args += ["--from-stage", from_stage]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def test_fingerprints_follow_the_sections_each_stage_reads() -> None:
    a = RunConfig()
    b = config_io.load(RunConfig, None, ["stage2.lr=3e-5"])
    assert stage_fingerprint(a, "stage1", "") == stage_fingerprint(b, "stage1", "")
    assert stage_fingerprint(a, "stage2", "x") != stage_fingerprint(b, "stage2", "x")
    assert stage_fingerprint(a, "export", "u1") != stage_fingerprint(a, "export", "u2")  # upstream counts


@pytest.mark.slow
def test_build_tower_end_to_end_then_skip_then_rerun_downstream(tmp_path: Path) -> None:
    from transformers import AutoImageProcessor, AutoModel

    from llm2clip_vlm.text.tiny import save_tiny_llm

    llm = save_tiny_llm(tmp_path / "llm")
    out = _build(tmp_path, llm)
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"before", "after"} <= set(metrics["stage1"]["eval"])
    # config.yaml is the config as run: the demo data location the pipeline chose is in it, and
    # every stage's own config.yaml is the same config.
    written = config_io.load(RunConfig, run / "config.yaml")
    assert written.data.demo_dir == str(run / "demo-data")
    assert all(
        config_io.load(RunConfig, run / d / "config.yaml") == written for d in ("stage1", "store", "stage2")
    )
    for name in ("short", "long"):
        m = metrics["stage2"]["eval"]["after"][name]
        assert m["n_images"] == 16 and set(m) >= {
            "i2t_r1",
            "i2t_r5",
            "i2t_r10",
            "t2i_r1",
            "t2i_r5",
            "t2i_r10",
        }
    assert "zero-shot retrieval" in out
    # Tracking: each training stage logs metrics.jsonl; the command writes and names the report.
    assert f"report: {run / 'report.html'}" in out and "TensorBoard logs:" in out
    assert (run / "stage1" / "metrics.jsonl").is_file() and (run / "stage2" / "metrics.jsonl").is_file()
    assert "Stage 1: caption retrieval accuracy" in (run / "report.html").read_text()
    # The demo recipe embeds one short + one long caption per training image (embed and stage 2
    # cut the same way, or stage 2 would refuse the store); held-out sets stay whole (3 short each).
    from llm2clip_vlm.store.store import EmbeddingStore

    assert EmbeddingStore.open(run / "store" / "train", verify_checksums=False).num_rows == 2 * 48
    assert EmbeddingStore.open(run / "store" / "heldout-short", verify_checksums=False).num_rows == 3 * 16
    # The tower is plain transformers: AutoModel + AutoImageProcessor, no code of ours.
    tower = AutoModel.from_pretrained(run / "tower")
    processor = AutoImageProcessor.from_pretrained(run / "tower")
    from PIL import Image

    pixels = processor(Image.new("RGB", (40, 40), (200, 0, 0)), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        assert tower(pixel_values=pixels).last_hidden_state.shape[0] == 1
    stamps = {s: json.loads((run / d / "stage.json").read_text()) for s, d in
              (("stage1", "stage1"), ("embed", "store"), ("stage2", "stage2"), ("export", "tower"))}  # fmt: skip

    # Same config again: every stage is skipped (its stamp is untouched).
    out = _build(tmp_path, llm)
    assert out.count("skipped") == 4
    # A stage-2 change reruns stage 2 and export only.
    out = _build(tmp_path, llm, ["stage2.lr=2e-5"])
    assert "stage1: artifact" in out and "embed: artifact" in out
    assert (
        json.loads((run / "stage2" / "stage.json").read_text())["fingerprint"]
        != stamps["stage2"]["fingerprint"]
    )
    assert json.loads((run / "stage1" / "stage.json").read_text()) == stamps["stage1"]
    # --from-stage forces a rerun even when nothing changed.
    out = _build(tmp_path, llm, ["stage2.lr=2e-5"], from_stage="export")
    assert out.count("skipped") == 3


def test_build_tower_refuses_two_precisions_before_any_work(tmp_path: Path) -> None:
    # Through the real entry point (one line, exit 2), as a user runs it.
    # (A new process forked from tests/cli_fork.py's server; COLUMNS=250 keeps the message on one line.)
    code, _, stderr = cli_fork.run(
        ["build-tower", "-o", str(tmp_path / "run"), "--set", "stage1.loop.precision=bf16"]
    )
    assert code == 2, stderr
    assert "stage1.loop.precision=bf16, stage2.loop.precision=fp32" in stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "run").exists()  # refused before the demo data or any stage
