"""Tracking: metrics.jsonl (resume without duplicates, SIGKILL included), trackers, missing backends."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
from pathlib import Path

import cli_fork
import pytest

from llm2clip_vlm.tracking import tracker as tracker_mod
from llm2clip_vlm.tracking.config import TrackingConfig
from llm2clip_vlm.tracking.metrics_log import MetricsLog, flatten, read_jsonl
from llm2clip_vlm.tracking.tracker import RunTracker

TESTS = Path(__file__).parent


def _steps(rows: list[dict], kind: str) -> list[int]:
    return [r["step"] for r in rows if r["kind"] == kind]


def test_flatten_nested_metrics() -> None:
    flat = flatten({"loss": 1.5, "retrieval": {"coco": {"i2t_r1": 50.0, "n_images": 5}}, "x": None, "l": [1]})
    assert flat == {"loss": 1.5, "retrieval/coco/i2t_r1": 50.0, "retrieval/coco/n_images": 5}


def test_metrics_log_resume_truncates_and_never_repeats_a_step(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path)
    log.write(0, {"cra": 1.0}, kind="eval")
    for step in range(1, 8):
        log.write(step, {"loss": 10.0 - step})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "kind": "train", "lo')  # torn line of a killed process
    # Resumed from the step-4 checkpoint: steps 5..7 are repeated by the resumed run.
    log = MetricsLog(tmp_path, resume_step=4)
    assert log.write(0, {"cra": 1.0}, kind="eval") is None  # recomputed "before" evaluation
    for step in range(5, 9):
        assert log.write(step, {"loss": 0.5}) is not None
    log.close()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert _steps(rows, "train") == list(range(1, 9)) and _steps(rows, "eval") == [0]
    assert [r["loss"] for r in rows if r["kind"] == "train"][3:] == [6.0, 0.5, 0.5, 0.5, 0.5]
    # A fresh run (no resume) starts the file over.
    MetricsLog(tmp_path).close()
    assert read_jsonl(tmp_path / "metrics.jsonl") == []


def test_tracker_logs_every_n_steps_to_jsonl_and_tensorboard(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    t = RunTracker.start(tmp_path, TrackingConfig(log_every_steps=3), stage="stage2", main=True)
    t.log(0, {"retrieval": {"held": {"i2t_r1": 10.0}}})
    for step in range(1, 8):
        t.train_step(step, loss=5.0 - step, lr=1e-3, grad_norm=2.0, samples=8, tokens=100, last=step == 7)
    t.log(7, {"retrieval": {"held": {"i2t_r1": 40.0}}})
    assert t.tensorboard_dir == tmp_path / "tensorboard"
    t.finish()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == [3, 6, 7]
    assert {"loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "peak_rss_gib"} <= set(train[0])
    assert train[0]["loss"] == 2.0 and train[0]["tokens_per_s"] > 0
    assert {r["stage"] for r in rows} == {"stage2"}
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("stage2/loss")] == [3, 6, 7]
    assert [e.value for e in events.Scalars("retrieval/held/i2t_r1")] == [10.0, 40.0]


def test_non_main_process_writes_nothing(tmp_path: Path) -> None:
    t = RunTracker.start(tmp_path, TrackingConfig(), stage="stage1", main=False)
    t.train_step(10, loss=1.0, samples=1, last=True)
    t.log(10, {"cra": 3.0})
    t.finish()
    assert list(tmp_path.iterdir()) == []


def test_missing_backend_gets_one_line_and_the_run_continues(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = tracker_mod.backend_available
    monkeypatch.setattr(tracker_mod, "backend_available", lambda name: name != "wandb" and real(name))
    caplog.set_level(logging.WARNING, logger="llm2clip_vlm")
    cfg = TrackingConfig(log_with=["wandb", "tensorboard"], log_every_steps=1)
    t = RunTracker.start(tmp_path, cfg, stage="stage1", main=True)
    t.train_step(1, loss=1.0, samples=4, last=True)
    t.finish()
    lines = [r.getMessage() for r in caplog.records if "wandb" in r.getMessage()]
    assert lines == ["tracking: wandb is not installed (pip install wandb); this run logs without it"]
    assert [tr.name for tr in t.trackers] == ["tensorboard"]
    assert _steps(read_jsonl(tmp_path / "metrics.jsonl"), "train") == [1]


def test_no_trackers_still_writes_jsonl(tmp_path: Path) -> None:
    t = RunTracker.start(tmp_path, TrackingConfig(log_with=[], log_every_steps=1), stage="s", main=True)
    t.train_step(1, loss=1.0, samples=4)
    t.finish()
    assert t.trackers == [] and not (tmp_path / "tensorboard").exists()
    assert _steps(read_jsonl(tmp_path / "metrics.jsonl"), "train") == [1]


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="log_every_steps"):
        RunTracker.start(tmp_path, TrackingConfig(log_every_steps=0), stage="s", main=True)


_KILLED_RUN = """
import sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from fault_driver import kill_at_loss, run_stage2
from llm2clip_vlm.training.losses import ClipLoss
from pathlib import Path
if {kill}:
    kill_at_loss(ClipLoss, {kill})
run_stage2(Path({data!r}), Path({out!r}), ["tracking.log_every_steps=1"])
"""


def _stage2(tmp_path: Path, out: Path, kill: int) -> subprocess.CompletedProcess:
    """The run in a new process (forked from tests/cli_fork.py's server: one torch thread, no warnings)."""
    code = _KILLED_RUN.format(tests=str(TESTS), kill=kill, data=str(tmp_path / "data"), out=str(out))
    rc, out_text, err = cli_fork.run([], code=code)
    return subprocess.CompletedProcess(["python", "-c", code], rc, out_text, err)


@pytest.mark.slow  # two tiny stage-2 runs in fresh processes: ~40 s on 2 shared cores
def test_stage2_sigkilled_and_resumed_has_each_step_once(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # 5 steps, checkpoints at 2 and 4; killed during step 4, after lines 1..3 were written.
    r = _stage2(tmp_path, out, kill=4)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert _steps(read_jsonl(out / "metrics.jsonl"), "train") == [1, 2, 3]
    r = _stage2(tmp_path, out, kill=0)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = read_jsonl(out / "metrics.jsonl")
    assert _steps(rows, "train") == [1, 2, 3, 4, 5]
    assert _steps(rows, "eval") == [0, 5]
    assert rows[-1]["retrieval/short/n_images"] == 8
    losses = json.loads((out / "metrics.json").read_text())["train"]["losses"]
    assert [r["loss"] for r in rows if r["kind"] == "train"] == pytest.approx(losses)
    assert all(r["logit_scale"] > 0 for r in rows if r["kind"] == "train")
    # The retrieval gallery the report shows: top-5 images per held-out caption, thumbnails on disk.
    gallery = json.loads((out / "gallery" / "retrieval.json").read_text())["short"]
    assert len(gallery["text_to_image"]) == 6 and all(len(q["top"]) == 5 for q in gallery["text_to_image"])
    assert all((out / "gallery" / rel).is_file() for rel in gallery["images"].values())


def test_costly_token_counts_run_on_logged_steps_only(tmp_path: Path) -> None:
    calls: list[int] = []

    def count() -> int:
        calls.append(1)
        return 50

    t = RunTracker.start(tmp_path, TrackingConfig(log_every_steps=4, log_with=[]), stage="stage1", main=True)
    for step in range(1, 9):
        t.train_step(step, loss=1.0, samples=2, tokens=count)
    t.finish()
    assert len(calls) == 2  # steps 4 and 8
    train = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    # 4 steps of 50 tokens and 2 samples each: the same time base for both rates.
    assert all(r["tokens_per_s"] == pytest.approx(25 * r["samples_per_s"], rel=1e-3) for r in train)


def test_a_backend_that_fails_to_start_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import accelerate.tracking

    def broken(self: object) -> None:
        raise RuntimeError("no tracking server at http://localhost:5000\nlong traceback text")

    monkeypatch.setattr(tracker_mod, "backend_available", lambda name: True)
    monkeypatch.setattr(accelerate.tracking.MLflowTracker, "start", broken)
    caplog.set_level(logging.WARNING, logger="llm2clip_vlm")
    t = RunTracker.start(tmp_path, TrackingConfig(log_with=["mlflow"]), stage="stage2", main=True)
    t.train_step(1, loss=1.0, samples=1, last=True)
    t.finish()
    assert t.trackers == []
    assert [r.getMessage() for r in caplog.records if "mlflow" in r.getMessage()] == [
        "tracking: mlflow could not start (no tracking server at http://localhost:5000); this run logs without it"
    ]
