"""The stage-2 not-learning warning: retrieval on a training slice next to the loss, one warning
when, after the warm-up and an epoch, the loss still sits at ln(batch) and retrieval at chance."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from stage2_world import FakeStore, load_image, make_world

from llm2clip_vlm import config_io
from llm2clip_vlm.recipe import RunConfig
from llm2clip_vlm.vision.data import HeldoutSet
from llm2clip_vlm.vision.learning import LearningWatch, TrainSlice
from llm2clip_vlm.vision.train import Stage2Data, train_stage2

TINY = [
    "stage2.backbone.image_size=32",
    "stage2.backbone.hidden_size=32",
    "stage2.backbone.num_layers=2",
    "stage2.backbone.num_heads=2",
    "stage2.embed_dim=16",
    "stage2.num_workers=0",
    "stage2.loop.precision=fp32",
    "stage2.eval_batch_size=64",
    "stage2.batch_size=16",
    "stage2.layer_decay=1.0",
    "stage2.loop.warmup_steps=6",
    "stage2.train_retrieval_images=32",
    "stage2.train_retrieval_every_steps=2",
]


def _metrics(r1: float, n: int = 256) -> dict[str, float | int]:
    return {"i2t_r1": r1, "t2i_r1": r1, "n_images": n}


def test_the_watch_fires_once_after_its_first_step_and_only_when_both_signs_agree(
    caplog: pytest.LogCaptureFixture,
) -> None:
    start = math.log(64)
    watch = LearningWatch(first_step=83, loss_start=start)
    flat = [start - 0.01] * 100
    with caplog.at_level(logging.WARNING):
        assert not watch.update(46, flat[:46], _metrics(0.4), 23)  # before warm-up + one epoch
        assert not watch.update(92, flat[:92], _metrics(4.0), 23)  # retrieval at 10x chance: learning
        falling = flat[:80] + [start * 0.8] * 12
        assert not watch.update(92, falling, _metrics(0.4), 23)  # the loss moved: learning
        assert watch.update(92, flat[:92], _metrics(3.1), 23)  # both near their start: warn
        assert not watch.update(115, flat, _metrics(0.4), 23)  # once
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "not learning (step 92)" in warnings[0] and "= ln(batch)" in warnings[0]
    for setting in (
        "stage2.lr",
        "stage2.loop.epochs",
        "stage2.backbone.name_or_path",
        "stage2.loop.warmup_steps",
        "stage1.pairing=same_kind",  # the one setting measured to make issue 28's poster world learn
    ):
        assert setting in warnings[0]
    assert "patch_size" not in warnings[0]  # smaller patches were measured not to help (issue 28)
    # The sigmoid loss has no ln(batch): its start is the first recorded loss.
    sig = LearningWatch(first_step=1, loss_start=None)
    assert sig.stalled([10.0, 9.8, 9.7], _metrics(0.4), 2) and not sig.stalled(
        [10.0, 9.0, 8.5], _metrics(0.4), 2
    )


def test_the_training_slice_spreads_over_the_set_and_keeps_one_caption_of_each_kind(tmp_path: Path) -> None:
    records = make_world(tmp_path, 20)
    store = FakeStore(records)
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    usable = [i for i in range(20) if i != 7]
    sl = TrainSlice.build(records, store, usable, proc, load_image, 8)
    assert sl is not None and sl.pixels.shape == (8, 3, 32, 32)
    # Every image: its first short and its only long caption (rows 3i and 3i + 2 of the store).
    assert sl.caption_image.tolist() == [k for k in range(8) for _ in range(2)]
    picked = np.linspace(0, len(usable) - 1, 8).round().astype(int)
    expected = [store.array[3 * usable[p] + j] for p in picked for j in (0, 2)]
    assert torch.equal(sl.text_embeddings, torch.from_numpy(np.asarray(expected, dtype=np.float32)))
    assert TrainSlice.build(records, store, usable, proc, load_image, 0) is None


class _Unrelated(FakeStore):
    """Caption vectors with no relation to the images: each caption an independent random draw."""

    def __init__(self, records: list, dim: int = 24, seed: int = 0) -> None:
        super().__init__(records, dim, seed)
        self.array = np.random.default_rng(seed + 100).normal(size=self.array.shape).astype(np.float16)


def _run(tmp_path: Path, store_cls: type, overrides: list[str]) -> dict:
    train = make_world(tmp_path / "train", 64, seed=0)
    held = make_world(tmp_path / "held", 16, seed=1)
    hstore = FakeStore(held)
    owner = torch.tensor([i for i, r in enumerate(held) for _ in r.captions])
    heldout = {"h": HeldoutSet(held, torch.from_numpy(hstore.array.astype("float32")), owner)}
    cfg = config_io.load(RunConfig, None, TINY + overrides)
    out = tmp_path / "run"
    metrics = train_stage2(cfg.stage2, out, Stage2Data(train, store_cls(train), heldout, load_image))
    return metrics["train"] | metrics["details"] | {"jsonl": (out / "metrics.jsonl").read_text()}


@pytest.mark.slow  # two tiny runs: ~10-30 s on a shared 2-core CPU
def test_a_run_on_unrelated_captions_warns_and_a_learning_run_does_not(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        # lr 1e-5: too little to memorise 64 random caption vectors in 10 steps.
        bad = _run(tmp_path / "bad", _Unrelated, ["stage2.loop.max_steps=12", "stage2.lr=1e-5"])
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert bad["not_learning"] and len(warned) == 1 and "not learning (step 10)" in warned[0]
    # Measured every 2 steps and at the end, in metrics.json, metrics.jsonl and the console.
    assert [h["step"] for h in bad["train_retrieval"]] == [2, 4, 6, 8, 10, 12]
    assert all(h["n_images"] == 32 and "loss" in h for h in bad["train_retrieval"])
    rows = [json.loads(line) for line in bad["jsonl"].splitlines()]
    assert sum("train_retrieval/i2t_r1" in r for r in rows) == 6
    assert any("retrieval on 32 training images" in r.getMessage() for r in caplog.records)

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        good = _run(tmp_path / "good", FakeStore, ["stage2.loop.max_steps=16", "stage2.lr=2e-3"])
    assert not good["not_learning"] and not caplog.records
    last = good["train_retrieval"][-1]
    assert max(last["i2t_r1"], last["t2i_r1"]) > 3 * 100 / 32
