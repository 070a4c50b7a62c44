"""Runs of the fault-injection tests, in a process that can be SIGKILLed at a chosen moment.

As a script::

    python tests/fault_driver.py stage1 MODEL_DIR OUT [--kill-at-loss N] [--kill-in-save STEP]
    python tests/fault_driver.py stage2 DATA_DIR OUT [--kill-at-loss N] [--kill-in-save STEP]

``--kill-at-loss N``: SIGKILL in the middle of a step, when the loss is computed for the N-th time
(after the forward, before the update). ``--kill-in-save STEP``: SIGKILL while checkpoint STEP is
being written, after half of its weight file is on disk. The same configs are used in-process by
``tests/test_faults.py`` for the uninterrupted reference runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

from llm2clip_vlm import config_io  # noqa: E402
from llm2clip_vlm.recipe import RunConfig  # noqa: E402
from llm2clip_vlm.training import checkpoint as checkpointing  # noqa: E402

STAGE2_TINY = [
    "stage2.backbone.image_size=32",
    "stage2.backbone.hidden_size=32",
    "stage2.backbone.num_layers=2",
    "stage2.backbone.num_heads=2",
    "stage2.embed_dim=16",
    "stage2.num_workers=0",
    "stage2.loop.precision=fp32",
    "stage2.eval_batch_size=64",
    "stage2.batch_size=8",
    "stage2.loop.max_steps=5",
    "stage2.loop.save_every_steps=2",
    "stage2.lr=1e-3",
]


def stage1_cfg(model: Path, **stage1: Any) -> RunConfig:
    """Tiny stage 1 with MNTP first and LoRA dropout on: both draw from the RNG a resume restores."""
    from test_stage1_train import tiny_cfg

    cfg = tiny_cfg(model, cra_captions=10, save_every_steps=2, eval_batch_size=32, **stage1)
    cfg.stage1.lora.dropout = 0.1
    # MNTP's loop saves every 2 steps, as stage 1's here (it took stage 1's before it had its own).
    loop = dataclasses.replace(cfg.stage1.mntp.loop, max_steps=2, warmup_steps=0, save_every_steps=2)
    cfg.stage1.mntp = dataclasses.replace(cfg.stage1.mntp, enabled=True, batch_size=8, loop=loop)
    return cfg


def stage1_data() -> tuple[list, list]:
    from test_stage1_train import scene_records

    return scene_records(48), scene_records(10, offset=200)


def run_stage1(model: Path, out: Path) -> dict[str, Any]:
    from llm2clip_vlm.text.train import train_stage1

    train, held = stage1_data()
    cfg = stage1_cfg(model)
    return train_stage1(cfg.stage1, out, train, held, inputs=run_inputs(cfg, out))


def stage2_cfg(extra: list[str] | None = None) -> RunConfig:
    return config_io.load(RunConfig, None, STAGE2_TINY + (extra or []))


def run_stage2(data: Path, out: Path, extra: list[str] | None = None, **kw: Any) -> dict[str, Any]:
    from stage2_world import FakeStore, load_image, make_world

    from llm2clip_vlm.vision.data import HeldoutSet
    from llm2clip_vlm.vision.train import train_stage2

    train = make_world(data / "train", 24, seed=0)
    held = make_world(data / "held", 8, seed=1)
    hstore = FakeStore(held, seed=0)
    owner = torch.tensor([i for i, r in enumerate(held) for _ in r.captions])
    heldout = {"short": HeldoutSet(held, torch.from_numpy(hstore.array.astype("float32")), owner)}
    cfg = stage2_cfg(extra)
    store = FakeStore(train)
    inputs = run_inputs(cfg, out, on_step=kw.pop("on_step", None))
    return train_stage2(cfg.stage2, out, stage2_data(cfg, train, store, heldout, load_image, **kw), inputs)


def run_inputs(cfg: RunConfig, out: Path, **kw: Any) -> Any:
    """The explicit inputs ``commands.run_inputs`` gives every trainer (config.yaml, tracking)."""
    from llm2clip_vlm.training.session import RunInputs

    return RunInputs(
        reliability=cfg.reliability, tracking=cfg.tracking, run_config=config_io.to_dict(cfg),
        on_ready=lambda: config_io.dump(cfg, out / "config.yaml"), **kw,
    )  # fmt: skip


def stage2_data(cfg: RunConfig, train: Any, store: Any, heldout: Any, load_image: Any, **kw: Any) -> Any:
    """The ``Stage2Data`` ``commands.run_stage2`` gives ``train_stage2`` (the data policy of ``cfg``)."""
    from llm2clip_vlm.vision.train import Stage2Data

    return Stage2Data(train, store, heldout, load_image, policy=cfg.data, **kw)


def kill_at_loss(loss_cls: type, n: int) -> None:
    """SIGKILL this process the ``n``-th time ``loss_cls`` computes a loss."""
    forward, calls = loss_cls.forward, [0]

    def dying(self: Any, *a: Any, **k: Any) -> Any:
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return forward(self, *a, **k)

    loss_cls.forward = dying


def kill_in_save(step: int) -> None:
    """SIGKILL this process half-way through writing checkpoint ``step``'s weights."""
    save = checkpointing._save_tensors

    def dying(tensors: Any, path: Path, metadata: Any = None) -> None:
        if path.parent.name == f".tmp-step-{step:07d}" and path.name == checkpointing.WEIGHTS:
            save(tensors, path, metadata)
            with open(path, "r+b") as f:
                f.truncate(path.stat().st_size // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        save(tensors, path, metadata)

    checkpointing._save_tensors = dying


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("stage", choices=["stage1", "stage2"])
    p.add_argument("source", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--kill-at-loss", type=int, default=0)
    p.add_argument("--kill-in-save", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    from llm2clip_vlm.training.losses import ClipLoss, SupervisedSimCSELoss

    if args.kill_at_loss:
        kill_at_loss(SupervisedSimCSELoss if args.stage == "stage1" else ClipLoss, args.kill_at_loss)
    if args.kill_in_save:
        kill_in_save(args.kill_in_save)
    if args.stage == "stage1":
        run_stage1(args.source, args.out)
    else:
        run_stage2(args.source, args.out)


if __name__ == "__main__":
    main()
