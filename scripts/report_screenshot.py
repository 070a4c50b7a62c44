"""Render ``docs/img/report.png``: real tiny runs of every kind, their report, a Chromium screenshot.

Trains in a few minutes on a CPU (tiny random models from the test fixtures, the demo worlds):
stage 1 on a tiny LLM, two stage-2 runs (long-caption ratio 0.5 and 1.0, to show two runs on one
plot), LLaVA pretraining and finetuning on a tiny tower; then ``llm2clip-vlm report`` over all of
them and a headless-Chromium screenshot of the top of the page. Needs ``chromium`` on PATH.

    python scripts/report_screenshot.py [WORK_DIR] [--out docs/img/report.png]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny worlds and configs of the tests


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work", type=Path, nargs="?", default=Path("/tmp/llm2clip-report-example"))
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "report.png")
    args = ap.parse_args()
    import torch
    from fault_driver import run_stage2, stage1_cfg, stage1_data

    from llm2clip_vlm import config_io
    from llm2clip_vlm.commands import run_llava
    from llm2clip_vlm.data.synthetic_llava import write_llava_demo
    from llm2clip_vlm.recipe import RunConfig
    from llm2clip_vlm.reports import load_runs, write_report
    from llm2clip_vlm.text.tiny import save_tiny_llm
    from llm2clip_vlm.text.train import train_stage1
    from llm2clip_vlm.tower.synthetic import TowerShape, save_random_tower
    from llm2clip_vlm.training.session import RunInputs

    torch.set_num_threads(1)
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    track = ["tracking.log_every_steps=2"]
    s1 = stage1_cfg(save_tiny_llm(work / "llm"), epochs=4, max_steps=24, lr=5e-3)
    s1.tracking.log_every_steps = 2
    train_stage1(s1.stage1, work / "build" / "stage1", *stage1_data(), inputs=RunInputs(tracking=s1.tracking))
    for name, ratio in (("build/stage2", 0.5), ("stage2-long-only", 1.0)):
        extra = [f"stage2.long_caption_ratio={ratio}", "stage2.loop.max_steps=40", "stage2.lr=2e-3", *track]
        run_stage2(work / "data", work / name, extra)

    data = work / "llava-data"
    write_llava_demo(data, pretrain_images=48, instruct_images=48, heldout_images=12, image_size=32)
    tower = save_random_tower(work / "tower", "clip", TowerShape(32, 8, 32, 3, 2, 64), seed=1)
    llm = save_tiny_llm(work / "llava-llm", hidden_size=64, seed=2)
    for phase, steps, init in (("pretrain", 8, None), ("finetune", 16, work / "llava-pretrain")):
        p = f"llava.{phase}"
        name = "llava_pretrain.json" if phase == "pretrain" else "llava_instruct.json"
        cfg = config_io.load(RunConfig, None, [
            f"llava.tower={tower}", f"llava.llm={llm}", f"{p}.data.path={data / name}",
            f"{p}.data.heldout_path={data / 'llava_heldout.json'}", f"{p}.batch_size=8", f"{p}.micro_batch_size=8",
            f"{p}.num_workers=0", f"{p}.loop.precision=fp32", f"{p}.loop.max_steps={steps}", f"{p}.eval_max_new_tokens=3",
            f"{p}.lr=2e-3", f"{p}.loop.warmup_ratio=0", f"{p}.gradient_checkpointing=false", *track,
            *([f"{p}.tune=full"] if phase == "finetune" else []),
        ])  # fmt: skip
        run_llava(cfg, work / f"llava-{phase}", phase, init=init)  # type: ignore[arg-type]

    runs = load_runs(
        [work / "build", work / "stage2-long-only", work / "llava-pretrain", work / "llava-finetune"]
    )
    page = write_report(runs, work / "report.html", title="llm2clip-vlm run report (tiny CPU runs)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        sys.exit(f"report written to {page}; no chromium on PATH for the screenshot")
    shot = work / "report-full.png"
    subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,1500",
         f"--screenshot={shot}", page.as_uri()],
        check=True, capture_output=True,
    )  # fmt: skip
    from PIL import Image

    args.out.parent.mkdir(parents=True, exist_ok=True)
    # A palette PNG keeps the README image small (text and flat plots need few colours).
    Image.open(shot).convert("RGB").quantize(colors=128).save(args.out, optimize=True)
    print(f"report: {page}\nscreenshot: {args.out} ({args.out.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
