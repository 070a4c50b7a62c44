"""Logs a person can read from a file: progress lines when stderr is not a terminal, and none of
the known third-party noise."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from llm2clip_vlm.progress import LineProgress, LineSchedule, format_duration, progress_line
from llm2clip_vlm.text.tiny import save_tiny_llm

NOISE = (
    "Failed to load CPU gemm_4bit_forward from kernels-community",
    "is_gradient_checkpointing",
    "gradient_checkpointing_enable",
    "Could not find a config file",
    "DecompressionBombWarning",
)
# Not PYTHONWARNINGS=ignore (as other tests use): warnings must reach stderr to be caught here.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"} | {"OMP_NUM_THREADS": "1"}


def test_progress_line_has_step_loss_rate_and_eta() -> None:
    line = progress_line("stage 1 SimCSE", 40, 160, {"status": "loss 2.7712  lr 2.00e-04"}, 300.0, 30)
    assert (
        line
        == "stage 1 SimCSE: step 40/160 (25%)  loss 2.7712  lr 2.00e-04  |  10.00 s/step, elapsed 5:00, ETA 20:00"
    )
    # Resumed at step 10: the rate counts only the 30 steps done here. Fast loops show items/s.
    assert progress_line("embed train", 640, 640, {"unit": "caption"}, 4.0, 640).endswith(
        "160.0 captions/s, elapsed 0:04, done"
    )
    assert format_duration(3725) == "1:02:05" and format_duration(59.6) == "1:00"


def test_line_progress_logs_on_schedule(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    logger = logging.getLogger("llm2clip_vlm")
    logger.addHandler(caplog.handler)
    try:
        progress = LineProgress(lines=True, disable=True, schedule=LineSchedule(seconds=0, steps=2))
        task = progress.add_task("loop", total=5, completed=1)  # resumed at 1
        for step in range(2, 6):
            progress.update(task, completed=step, status=f"loss {1 / step:.3f}")
    finally:
        logger.removeHandler(caplog.handler)
    lines = [r.getMessage() for r in caplog.records if r.name == "llm2clip_vlm.progress"]
    # Every 2 steps (3, 5); 5 is also the end. The rate is over the 4 steps done here.
    assert [line.split("  ")[0] for line in lines] == ["loop: step 3/5 (60%)", "loop: step 5/5 (100%)"]
    assert "loss 0.333" in lines[0] and "ETA" in lines[0] and lines[1].endswith("done")


def test_work_found_done_moves_the_count_but_not_the_rate(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1500 images known from the check cache, then 20 decoded in 2 s: 0.10 s/image, not 760/s."""
    import logging

    from llm2clip_vlm import progress as progress_module

    clock = iter([0.0, 0.0, 2.0, 2.0])
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: next(clock))
    logger = logging.getLogger("llm2clip_vlm")
    logger.addHandler(caplog.handler)
    try:
        progress = LineProgress(lines=True, disable=True, schedule=LineSchedule(seconds=0, steps=1000))
        task = progress.add_task("checking images", total=1520, unit="image")
        progress.skip(task, 1500)
        progress.advance(task, 10)
        progress.advance(task, 10)
    finally:
        logger.removeHandler(caplog.handler)
    lines = [r.getMessage() for r in caplog.records if r.name == "llm2clip_vlm.progress"]
    assert lines == ["checking images: image 1520/1520 (100%)  |  0.10 s/image, elapsed 0:02, done"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A tiny stage-1 CLI run (LoRA, gradient checkpointing, a checkpoint) with stderr in a file."""
    from llm2clip_vlm.data.synthetic import write_demo_dataset

    root = tmp_path_factory.mktemp("logs")
    model = save_tiny_llm(root / "llama")
    write_demo_dataset(root / "demo", train_images=32, heldout_images=8, show_progress=False)
    args = [
        f"data.demo_dir={root / 'demo'}", "data.demo_train_images=32", "data.demo_heldout_images=8",
        f"stage1.model={model}", "stage1.loop.max_steps=3", "stage1.batch_size=4", "stage1.loop.precision=fp32",
        "stage1.max_length=32", "stage1.gradient_checkpointing=true", "stage1.loop.save_every_steps=2",
        "runtime.progress_steps=1",
    ]  # fmt: skip
    err = root / "stderr.log"
    with open(err, "w") as f:
        r = subprocess.run(
            [sys.executable, "-m", "llm2clip_vlm.cli", "stage1", "-o", str(root / "run"), *(f"--set={a}" for a in args)],
            env=ENV, stdout=subprocess.PIPE, stderr=f, text=True, timeout=600,
        )  # fmt: skip
    text = err.read_text()
    assert r.returncode == 0, text[-3000:]
    return root, text


def test_stage1_logs_a_line_per_step_when_stderr_is_a_file(tiny_run: tuple[Path, str]) -> None:
    _, text = tiny_run
    pattern = re.compile(
        r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO stage 1 SimCSE: step (\d)/3 \(\d+%\)  loss \d+\.\d{4} .*"
        # The rate is s/step, or steps/s when a step takes under 0.1 s (a fast, idle machine).
        r"\|  (\d+\.\d\d s/step|\d+\.\d steps/s), elapsed \d+:\d\d, (ETA \d+:\d\d|done)$",
        re.M,
    )
    steps = [int(m.group(1)) for m in pattern.finditer(text)]
    assert steps == [1, 2, 3], text[-3000:]
    assert "━" not in text  # no rich bar drawn into the file
    # Log records are single timestamped lines, not rich's wrapped columns.
    assert re.search(r"^\S+ \S+ INFO stage 1 done: CRA \d+\.\d -> \d+\.\d after 3 steps", text, re.M)


def test_tiny_run_stderr_has_no_known_third_party_noise(tiny_run: tuple[Path, str]) -> None:
    _, text = tiny_run
    found = [n for n in NOISE if n in text]
    assert not found, text[-3000:]


def test_peft_adapter_saves_do_not_warn_about_a_missing_base_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A base without config.json (a GGUF folder, a moved model): checkpoints save quietly."""
    from test_stage1_train import scene_records, tiny_cfg

    import llm2clip_vlm.text.train as stage1

    model = save_tiny_llm(tmp_path / "llama")
    load = stage1.load_bidirectional

    def load_elsewhere(*args, **kwargs):  # the base's recorded path has no config.json
        m = load(*args, **kwargs)
        m.config.name_or_path = str(tmp_path / "gguf-folder")
        return m

    monkeypatch.setattr(stage1, "load_bidirectional", load_elsewhere)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stage1.train_stage1(
            tiny_cfg(model, max_steps=2, save_every_steps=1, gradient_checkpointing=True).stage1,
            tmp_path / "run", scene_records(16), scene_records(8, 100),
        )  # fmt: skip
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "Could not find a config file" in m], messages
    assert not [m for m in messages if "gradient_checkpointing_enable" in m or "_disable" in m], messages


DRIVER = """
import io, logging, sys
from PIL import Image
from llm2clip_vlm.data.images import load_rgb
from llm2clip_vlm.data import DataError

# bitsandbytes' record, exactly as it logs it on CPUs with avx512_bf16, and another one.
bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you "
            "already `pip install kernels` and the kernels >= 0.11.1", "No module named 'kernels'")
bnb.warning("another bitsandbytes warning")
Image.MAX_IMAGE_PIXELS = 200
buf = io.BytesIO()
Image.new("RGB", (15, 15)).save(buf, "PNG")  # 225 pixels: PIL warns, we refuse
try:
    load_rgb(buf.getvalue(), "set.jsonl:3")
except DataError as e:
    print(e, file=sys.stderr)
"""


def test_bitsandbytes_and_pil_noise_is_gone_and_nothing_else(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-c", DRIVER], env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "gemm_4bit_forward" not in r.stderr and "DecompressionBomb" not in r.stderr
    assert "another bitsandbytes warning" in r.stderr  # only that one message is filtered
    assert "set.jsonl:3: image <bytes> is 15x15 = 225 pixels, above the limit of 200" in r.stderr
