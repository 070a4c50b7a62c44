"""Fingerprint tiny runs of every stage: per-step losses and a sha256 over the saved weights.

A refactor of the trainers that claims "behaviour identical" runs this before and after and
compares the two outputs byte for byte::

    python scripts/tiny_runs_fingerprint.py > before.json   # on the base commit
    python scripts/tiny_runs_fingerprint.py > after.json    # on the change
    cmp before.json after.json

Runs (fixed seeds, one CPU thread, fp32): stage 1 contrastive (SimCSE + LoRA), stage 1 with the
MNTP warm-up and periodic checkpoints, stage 2 (periodic checkpoints), LLaVA
pretrain then finetune (LoRA) from that projector. The worlds and configs are the tests' own
(``tests/fault_driver.py``, ``tests/test_stage1_train.py``, ``tests/test_llava_train.py``).
It reads either metrics.json schema (the old per-stage keys and the versioned one).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def losses_of(metrics: dict[str, Any]) -> list[float]:
    """The per-step losses of a trainer's metrics, whatever the schema."""
    if "schema" in metrics:
        return list(metrics["train"]["losses"])
    if "stage2" in metrics:
        return list(metrics["stage2"]["train"]["losses"])
    return list(metrics.get("losses", metrics.get("loss", [])))


def weights_sha256(folder: Path) -> dict[str, str]:
    """sha256 of every weights file under ``folder`` (relative path -> hex digest).

    The checkpoints' RNG files are left out: they hold Python's and NumPy's generator states,
    which differ between two runs of the same commit (seeded from the OS where nothing seeds them).
    """
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*.safetensors"))
        if not p.name.startswith("rng.")
    }


def main() -> None:
    torch.set_num_threads(1)
    from fault_driver import run_stage1, run_stage2
    from test_llava_train import _cfg
    from test_stage1_train import scene_records, tiny_cfg

    from llm2clip_vlm import config_io
    from llm2clip_vlm.commands import run_llava
    from llm2clip_vlm.data.synthetic_llava import write_llava_demo
    from llm2clip_vlm.text.tiny import save_tiny_llm
    from llm2clip_vlm.text.train import train_stage1
    from llm2clip_vlm.tower.synthetic import TowerShape, save_random_tower

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fingerprint-") as tmp:
        root = Path(tmp)
        llm = save_tiny_llm(root / "llama")

        def record(name: str, metrics: dict[str, Any], run: Path) -> None:
            out[name] = {"losses": losses_of(metrics), "weights": weights_sha256(run)}
            print(f"{name}: {len(out[name]['losses'])} steps", file=sys.stderr)

        cfg = tiny_cfg(llm)
        run = root / "stage1"
        explicit = dict(reliability=cfg.reliability, tracking=cfg.tracking, run_config=config_io.to_dict(cfg))
        if "inputs" in inspect.signature(train_stage1).parameters:  # after the run scaffold (issue 26)
            from llm2clip_vlm.training.session import RunInputs

            explicit = {"inputs": RunInputs(**explicit)}
        m = train_stage1(cfg.stage1, run, scene_records(40), scene_records(10, offset=200), **explicit)
        record("stage1-contrastive", m, run)
        record("stage1-mntp", run_stage1(llm, root / "stage1-mntp"), root / "stage1-mntp")
        record("stage2", run_stage2(root / "s2data", root / "stage2"), root / "stage2")

        data = root / "llava-data"
        write_llava_demo(data, pretrain_images=24, instruct_images=24, heldout_images=6, image_size=32)
        parts = {
            "root": root,
            "tower": save_random_tower(root / "tower", "clip", TowerShape(32, 8, 32, 3, 2, 64), seed=1),
            "llm": save_tiny_llm(root / "llm", hidden_size=64, seed=2),
            "data": data,
        }
        pre = root / "llava-pre"
        record("llava-pretrain", run_llava(_cfg(parts, "pretrain"), pre, "pretrain"), pre)
        fin = root / "llava-fin"
        record("llava-finetune", run_llava(_cfg(parts, "finetune"), fin, "finetune", init=pre), fin)
    print(json.dumps(out, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
