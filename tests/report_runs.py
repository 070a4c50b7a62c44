"""Run directories as the trainers leave them (metrics.jsonl + gallery/), written without training,
for the report tests: a stage-1 run, two stage-2 runs and a LLaVA finetune run."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image

from llm2clip_vlm.data.records import Caption, ImageCaptions
from llm2clip_vlm.tracking.gallery import write_answer_gallery, write_retrieval_gallery
from llm2clip_vlm.tracking.metrics_log import MetricsLog

COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 220, 20), (200, 60, 200), (40, 200, 210)]
NAMES = ["red", "green", "blue", "yellow", "magenta", "cyan"]


def _image(i: int) -> Image.Image:
    img = Image.new("RGB", (48, 48), (128, 128, 128))
    img.paste(COLOURS[i % 6], (8 * (i % 3), 8 * (i // 3 % 3), 8 * (i % 3) + 24, 8 * (i // 3 % 3) + 24))
    return img


def write_stage1(run: Path, steps: int = 40) -> Path:
    log = MetricsLog(run, stage="stage1")
    log.write(0, {"cra": 2.5}, kind="eval")
    for s in range(5, steps + 1, 5):
        log.write(s, {"loss": 2.8 * math.exp(-s / 15) + 0.2, "lr": 2e-4, "grad_norm": 3.0 / s,
                      "samples_per_s": 2.1, "tokens_per_s": 410.0, "peak_rss_gib": 4.8})  # fmt: skip
    log.write(steps, {"cra": 36.5}, kind="eval")
    log.close()
    return run


def write_stage2(run: Path, images: Path, seed: int, steps: int = 30, quality: float = 1.0) -> Path:
    g = torch.Generator().manual_seed(seed)
    records = []
    for i in range(12):
        path = images / f"{i}.png"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            _image(i).save(path)
        caps = [
            Caption(f"a {NAMES[i % 6]} square", "short"),
            Caption(f"a {NAMES[i % 6]} square, number {i}", "long"),
        ]
        records.append(ImageCaptions(key=str(i), image=str(path), captions=caps))
    owner = torch.tensor([i for i, r in enumerate(records) for _ in r.captions])
    sim = (
        torch.rand(12, len(owner), generator=g) + quality * (torch.arange(12)[:, None] == owner[None]).float()
    )
    held = SimpleNamespace(records=records, caption_image=owner)
    r = {"n_images": 12, "n_captions": 24}
    log = MetricsLog(run, stage="stage2")
    log.write(0, {"retrieval": {"held": {**r, "i2t_r1": 8.3, "i2t_r5": 41.7, "i2t_r10": 83.3,
                                         "t2i_r1": 8.3, "t2i_r5": 45.8, "t2i_r10": 87.5}}}, kind="eval")  # fmt: skip
    for s in range(1, steps + 1):
        log.write(s, {"loss": 3.2 * math.exp(-quality * s / 12) + 0.4, "lr": 1e-3 * 0.5 * (1 + math.cos(math.pi * s / steps)),
                      "grad_norm": 5.0 / s**0.5, "logit_scale": 14.3 + quality * s / 10, "samples_per_s": 48.0,
                      "peak_rss_gib": 0.5})  # fmt: skip
    log.write(steps, {"retrieval": {"held": {**r, "i2t_r1": 30 * quality, "i2t_r5": 70.0, "i2t_r10": 95.0,
                                             "t2i_r1": 28 * quality, "t2i_r5": 72.5, "t2i_r10": 100.0}}}, kind="eval")  # fmt: skip
    log.close()
    write_retrieval_gallery(run, {"held": held}, {"held": sim}, lambda rec: Image.open(rec.image))
    return run


def write_llava(run: Path, images: Path) -> Path:
    log = MetricsLog(run)
    per = {"color": (20.0, 80.0), "count": (10.0, 45.0), "choice": (25.0, 60.0)}
    blind = {"color": 30.0, "count": 40.0, "choice": 50.0}  # after training, image withheld
    majority = {"color": 20.0, "count": 30.0, "choice": 40.0}
    for step, n in ((0, 0), (20, 1)):
        log.write(step, {"heldout": {"accuracy": sum(v[n] for v in per.values()) / 3, "n": 30, "blind": "shuffle",
                                     "per_type": {t: {"accuracy": v[n], "n": 10, "blind_accuracy": blind[t],
                                                      "gap": v[n] - blind[t], "majority_accuracy": majority[t]}
                                                  for t, v in per.items()}}}, kind="eval")  # fmt: skip
        if step == 0:
            for s in range(1, 21):
                log.write(s, {"loss": 4.0 / s**0.4, "lr": 2e-5, "grad_norm": 1.0, "samples_per_s": 3.3,
                              "tokens_per_s": 900.0, "peak_rss_gib": 2.0})  # fmt: skip
    log.close()
    examples = []
    for i, (t, q, a, p) in enumerate([("color", "What colour is the square?", "red", "red"),
                                       ("count", "How many squares are there?", "2", "3"),
                                       ("choice", "Where is the square? A. left B. right", "A", "A")]):  # fmt: skip
        path = images / f"q{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        _image(i).save(path)
        examples.append({"question": q, "answer": a, "prediction": p, "question_type": t, "correct": a == p,
                         "image": str(path), "blind_prediction": "blue"})  # fmt: skip
    write_answer_gallery(run, examples, lambda p: Image.open(p))
    return run


def write_all(root: Path) -> dict[str, Path]:
    """A build-tower directory (stage1/ + stage2/), a second stage-2 run and a LLaVA run."""
    images = root / "images"
    build = root / "build"
    write_stage1(build / "stage1")
    write_stage2(build / "stage2", images, seed=0, quality=1.0)
    other = write_stage2(root / "stage2-no-stage1", images, seed=1, quality=0.5)
    llava = write_llava(root / "llava-finetune", images)
    return {"build": build, "other": other, "llava": llava}
