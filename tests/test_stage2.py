"""Stage 2: retrieval metrics, a tiny end-to-end run, resume, and 1 vs 2 processes (gloo)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from dist_env import free_port, join_as_rank
from safetensors.torch import load_file
from stage2_world import FakeStore, load_image, make_world

from llm2clip_vlm import config_io
from llm2clip_vlm.recipe import RunConfig
from llm2clip_vlm.training.checkpoint import CHECKPOINTS, Checkpointer
from llm2clip_vlm.vision.data import GlobalBatchSampler, HeldoutSet, Stage2TrainData
from llm2clip_vlm.vision.retrieval import retrieval_metrics
from llm2clip_vlm.vision.train import train_stage2

TINY = [
    "stage2.backbone.image_size=32",
    "stage2.backbone.hidden_size=32",
    "stage2.backbone.num_layers=2",
    "stage2.backbone.num_heads=2",
    "stage2.embed_dim=16",
    "stage2.num_workers=0",
    "stage2.loop.precision=fp32",
    "stage2.eval_batch_size=64",
]


# -- retrieval --------------------------------------------------------------------------------
def test_retrieval_multi_caption_hand_built() -> None:
    # 3 images, 5 captions: image 0 owns captions 0-1, image 1 owns 2-3, image 2 owns 4.
    sim = torch.tensor(
        [
            [0.9, 0.1, 0.95, 0.2, 0.3],  # best own caption 0.9, beaten by caption 2 -> rank 1
            [0.1, 0.2, 0.5, 0.8, 0.1],  # best own 0.8, nobody above -> rank 0
            [0.7, 0.1, 0.2, 0.3, 0.6],  # own 0.6, beaten by caption 0 -> rank 1
        ]
    )
    owner = torch.tensor([0, 0, 1, 1, 2])
    m = retrieval_metrics(sim, owner)
    # I2T ranks [1, 0, 1]. T2I ranks: c0 0, c1 2 (0.2 beats it, the 0.1 tie counts against it),
    # c2 1, c3 0, c4 0.
    assert m["i2t_r1"] == pytest.approx(100 / 3, abs=1e-3)
    assert m["i2t_r5"] == 100.0 and m["i2t_r10"] == 100.0
    assert m["t2i_r1"] == 60.0 and m["t2i_r5"] == 100.0 and m["t2i_r10"] == 100.0
    assert (m["n_images"], m["n_captions"]) == (3, 5)


def test_retrieval_one_to_one_ranks_pin_every_k() -> None:
    # sim[i, j] = 1 for j < i, 0.5 on the diagonal, 0 above: image i's caption has rank i, and
    # caption j's image has rank 11 - j (rows below it score 1). Ranks 0..11 both ways.
    n = 12
    sim = torch.tril(torch.ones(n, n), diagonal=-1) + 0.5 * torch.eye(n)
    m = retrieval_metrics(sim, torch.arange(n))
    for d in ("i2t", "t2i"):
        assert m[f"{d}_r1"] == pytest.approx(100 * 1 / 12, abs=1e-3)
        assert m[f"{d}_r5"] == pytest.approx(100 * 5 / 12, abs=1e-3)
        assert m[f"{d}_r10"] == pytest.approx(100 * 10 / 12, abs=1e-3)


def test_retrieval_collapsed_model_is_not_rewarded_and_bad_input_refused() -> None:
    m = retrieval_metrics(torch.zeros(4, 4), torch.arange(4))
    assert m["i2t_r1"] == 0.0 and m["t2i_r1"] == 0.0  # all ties: every competitor ranks ahead
    with pytest.raises(ValueError, match="no caption"):
        retrieval_metrics(torch.zeros(3, 2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(torch.zeros(2, 2), torch.tensor([0, 5]))


# -- data ---------------------------------------------------------------------------------------
def test_sampler_slices_one_global_batch_per_step() -> None:
    one = list(GlobalBatchSampler(20, 8, 0, 1, seed=3, start_step=0, total_steps=5))
    two = [list(GlobalBatchSampler(20, 8, r, 2, seed=3, start_step=0, total_steps=5)) for r in range(2)]
    assert len(one) == 5 and all(len(b) == 8 for b in one)
    for step in range(5):
        assert two[0][step] + two[1][step] == one[step]
    # 20 images, batches of 8: 2 steps per epoch, each epoch a new permutation without repeats.
    assert len({i for _, i in one[0] + one[1]}) == 16 and one[2][0][0] == 1
    resumed = list(GlobalBatchSampler(20, 8, 0, 1, seed=3, start_step=3, total_steps=5))
    assert resumed == one[3:]
    with pytest.raises(ValueError, match="not divisible"):
        GlobalBatchSampler(20, 9, 0, 2, 0, 0, 1)


def test_caption_choice_follows_the_long_ratio(tmp_path: Path) -> None:
    recs = make_world(tmp_path, 8)
    store = FakeStore(recs)
    for ratio, expect_long in ((0.0, 0.0), (1.0, 1.0)):
        ds = Stage2TrainData(recs, store, None, load_image, ratio, seed=0)
        rows = [ds.caption_row(e, i) for e in range(5) for i in range(8)]
        longs = sum(int(r in store.caption_rows(r // 3, "long")) for r in rows) / len(rows)
        assert longs == expect_long
    ds = Stage2TrainData(recs, store, None, load_image, 0.5, seed=0)
    rows = [ds.caption_row(e, i) for e in range(100) for i in range(8)]
    share = sum(int(r % 3 == 2) for r in rows) / len(rows)  # row 3i+2 is image i's long caption
    assert 0.44 < share < 0.56
    assert ds.caption_row(7, 3) == ds.caption_row(7, 3)  # deterministic per (epoch, index)


# -- training -----------------------------------------------------------------------------------
def _world(root: Path, n_train: int, n_held: int) -> tuple[list, FakeStore, dict[str, HeldoutSet]]:
    train = make_world(root / "train", n_train, seed=0)
    held = make_world(root / "held", n_held, seed=1)
    hstore = FakeStore(held, seed=0)
    owner = torch.tensor([i for i, r in enumerate(held) for _ in r.captions])
    heldout = {"short": HeldoutSet(held, torch.from_numpy(hstore.array.astype("float32")), owner)}
    return train, FakeStore(train, seed=0), heldout


def _run(root: Path, out: Path, overrides: list[str], **kw: Any) -> dict[str, Any]:
    n_train, n_held = kw.pop("n_train", 32), kw.pop("n_held", 8)
    train, store, heldout = _world(root, n_train, n_held)
    cfg = config_io.load(RunConfig, None, TINY + overrides)
    from fault_driver import run_inputs, stage2_data  # what commands.run_stage2 passes

    inputs = run_inputs(cfg, out, on_step=kw.pop("on_step", None))
    return train_stage2(cfg.stage2, out, stage2_data(cfg, train, store, heldout, load_image, **kw), inputs)


@pytest.mark.slow  # ~15-35 s on a shared 2-core CPU
def test_tiny_end_to_end_run_learns_and_writes_its_outputs(tmp_path: Path) -> None:
    metrics = _run(
        tmp_path / "data",
        tmp_path / "run",
        ["stage2.batch_size=16", "stage2.loop.max_steps=16", "stage2.lr=2e-3", "stage2.layer_decay=1.0"],
        n_train=64,
        n_held=32,
    )
    run = tmp_path / "run"
    assert json.loads((run / "metrics.json").read_text()) == metrics
    assert (run / "model" / "vision" / "model.safetensors").is_file()
    before, after = metrics["eval"]["before"]["short"], metrics["eval"]["after"]["short"]
    assert set(after) == {
        "i2t_r1",
        "i2t_r5",
        "i2t_r10",
        "t2i_r1",
        "t2i_r5",
        "t2i_r10",
        "n_images",
        "n_captions",
    }
    assert (after["n_images"], after["n_captions"]) == (32, 96)
    losses = metrics["train"]["losses"]
    assert len(losses) == 16 and sum(losses[-4:]) / 4 < losses[0] - 0.3
    # 16 (colour, place) classes among 32 images: chance R@5 is ~15%; the trained model must
    # clearly beat chance and its untrained self in both directions.
    for d in ("i2t", "t2i"):
        assert after[f"{d}_r5"] > 35.0 and after[f"{d}_r5"] > before[f"{d}_r5"] + 10.0


class _Killed(Exception):
    pass


def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    common = [
        "stage2.batch_size=8",
        "stage2.loop.max_steps=6",
        "stage2.loop.save_every_steps=3",
        "stage2.lr=1e-3",
    ]
    full = _run(tmp_path / "data", tmp_path / "full", common)

    def kill(step: int, loss: float) -> None:
        if step == 5:  # after the step-3 checkpoint, before the next one
            raise _Killed

    with pytest.raises(_Killed):
        _run(tmp_path / "data", tmp_path / "cut", common, on_step=kill)
    assert Checkpointer(tmp_path / "cut" / CHECKPOINTS).latest().name == "step-0000003"  # type: ignore[union-attr]
    resumed = _run(tmp_path / "data", tmp_path / "cut", common)
    assert resumed["train"]["losses"] == full["train"]["losses"]
    assert resumed["eval"]["after"] == full["eval"]["after"]
    a = load_file(str(tmp_path / "full" / CHECKPOINTS / "step-0000006" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / CHECKPOINTS / "step-0000006" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _worker(rank: int, world: int, port: int, root: str, out: str, overrides: list[str]) -> None:
    join_as_rank(rank, world, port)
    torch.set_num_threads(1)
    metrics = _run(Path(root), Path(out), overrides)
    Path(out, f"losses.rank{rank}.json").write_text(json.dumps(metrics["train"]["losses"]))


@pytest.mark.slow  # spawns 2 processes: ~25-50 s on a shared 2-core CPU
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path: Path, loss: str) -> None:
    overrides = ["stage2.batch_size=8", "stage2.loop.max_steps=3", "stage2.lr=1e-3", f"stage2.loss={loss}"]
    one = _run(tmp_path / "data", tmp_path / "one", overrides)["train"]["losses"]
    mp.spawn(
        _worker, args=(2, free_port(), str(tmp_path / "data"), str(tmp_path / "two"), overrides), nprocs=2
    )
    for rank in range(2):
        two = json.loads((tmp_path / "two" / f"losses.rank{rank}.json").read_text())
        assert len(two) == 3
        assert two == pytest.approx(one, abs=1e-5)
    assert one[2] != pytest.approx(one[0], abs=1e-3)  # the steps did change the model
