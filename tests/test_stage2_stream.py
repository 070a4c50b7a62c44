"""Stage 2 on streamed shards: a killed run resumes to identical weights; 2 processes (gloo) read
disjoint records."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from dist_env import free_port, join_as_rank
from safetensors.torch import load_file
from stage2_world import FakeStore, load_image, make_world

from llm2clip_vlm import config_io
from llm2clip_vlm.data.captions import load_caption_set, load_caption_sets, record_index
from llm2clip_vlm.data.config import CaptionSetConfig
from llm2clip_vlm.data.stream import StreamPlan
from llm2clip_vlm.recipe import RunConfig
from llm2clip_vlm.training.checkpoint import CHECKPOINTS, Checkpointer
from llm2clip_vlm.vision.data import HeldoutSet
from llm2clip_vlm.vision.train import train_stage2

TINY = [
    "stage2.backbone.image_size=32",
    "stage2.backbone.hidden_size=32",
    "stage2.backbone.num_layers=2",
    "stage2.backbone.num_heads=2",
    "stage2.embed_dim=16",
    "stage2.loop.precision=fp32",
    "stage2.eval_batch_size=64",
    "stage2.num_workers=0",
    "stage2.batch_size=8",
    "stage2.lr=1e-3",
    "data.stream=true",
    "data.shuffle_buffer=6",
]


def write_world_shards(root: Path, n: int, shards: int) -> Path:
    """The stage-2 test world as webdataset shards (PNG + json captions)."""
    records = make_world(root / "png", n, seed=0)
    per = n // shards
    (root / "shards").mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with tarfile.open(root / "shards" / f"w-{s:03d}.tar", "w") as tar:
            for r in records[s * per : (s + 1) * per]:
                caps = {"short_captions": r.short, "long_captions": r.long}
                for name, data in (
                    (f"{r.key}.png", Path(str(r.image)).read_bytes()),
                    (f"{r.key}.json", json.dumps(caps).encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return root / "shards"


def _run(
    root: Path, out: Path, overrides: list[str], sets: list[CaptionSetConfig] | None = None, **kw: Any
) -> dict[str, Any]:
    os.environ["LLM2CLIP_VLM_CACHE"] = str(root / "cache")
    if sets is not None:  # a list of sets (data.train as a list)
        train = load_caption_sets(sets)
    else:
        shards = root / "shards" if (root / "shards").is_dir() else write_world_shards(root, 48, 4)
        train = load_caption_set(CaptionSetConfig(path=str(shards)))
    held = make_world(root / "held", 8, seed=1)
    hstore = FakeStore(held, seed=0)
    owner = torch.tensor([i for i, r in enumerate(held) for _ in r.captions])
    heldout = {"short": HeldoutSet(held, torch.from_numpy(hstore.array.astype("float32")), owner)}
    cfg = config_io.load(RunConfig, None, TINY + overrides)
    from fault_driver import run_inputs, stage2_data  # what commands.run_stage2 passes (data.stream too)

    inputs = run_inputs(cfg, out, on_step=kw.pop("on_step", None))
    data = stage2_data(cfg, train, FakeStore(list(train), seed=0), heldout, load_image, **kw)
    return train_stage2(cfg.stage2, out, data, inputs)


class _Killed(Exception):
    pass


@pytest.mark.parametrize("workers", [0, 2])
def test_a_killed_streamed_run_resumes_to_identical_weights(tmp_path: Path, workers: int) -> None:
    common = ["stage2.loop.max_steps=8", "stage2.loop.save_every_steps=3", f"stage2.num_workers={workers}"]
    full = _run(tmp_path / "data", tmp_path / "full", common)

    def kill(step: int, loss: float) -> None:
        if step == 5:  # after the step-3 checkpoint, mid-epoch of every unit
            raise _Killed

    with pytest.raises(_Killed):
        _run(tmp_path / "data", tmp_path / "cut", common, on_step=kill)
    assert Checkpointer(tmp_path / "cut" / CHECKPOINTS).latest().name == "step-0000003"  # type: ignore[union-attr]
    resumed = _run(tmp_path / "data", tmp_path / "cut", common)
    assert resumed["train"]["losses"] == full["train"]["losses"]
    a = load_file(str(tmp_path / "full" / CHECKPOINTS / "step-0000008" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / CHECKPOINTS / "step-0000008" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((tmp_path / "cut" / CHECKPOINTS / "step-0000008" / "checkpoint.json").read_text())
    position = state["state"]["extra"]["data"]
    assert position["batches"] == 8 and sum(p for p, _ in position["units"].values()) == 64


def test_a_killed_weighted_stream_of_two_sets_resumes_to_identical_weights(tmp_path: Path) -> None:
    """Set weights with data.stream (open_clip's upsampling factors, drawn per shard; see
    tests/test_stream_weights.py for the source): the draw is in the resume state."""
    data = tmp_path / "data"
    sets = [
        CaptionSetConfig(path=str(write_world_shards(data / "cc3m", 48, 4)), weight=0.5),
        CaptionSetConfig(path=str(write_world_shards(data / "cc12m", 24, 3)), weight=2.0),
    ]
    common = ["stage2.loop.max_steps=8", "stage2.loop.save_every_steps=3"]
    full = _run(data, tmp_path / "full", common, sets=sets)

    def kill(step: int, loss: float) -> None:
        if step == 5:
            raise _Killed

    with pytest.raises(_Killed):
        _run(data, tmp_path / "cut", common, sets=sets, on_step=kill)
    resumed = _run(data, tmp_path / "cut", common, sets=sets)
    assert resumed["train"]["losses"] == full["train"]["losses"]
    a = load_file(str(tmp_path / "full" / CHECKPOINTS / "step-0000008" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / CHECKPOINTS / "step-0000008" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((tmp_path / "cut" / CHECKPOINTS / "step-0000008" / "checkpoint.json").read_text())
    assert state["state"]["extra"]["data"]["weights"] == [0.5, 2.0]


def test_a_streamed_list_of_one_set_is_the_same_run(tmp_path: Path) -> None:
    common = ["stage2.loop.max_steps=4", "stage2.loop.save_every_steps=4"]
    plain = _run(tmp_path / "data", tmp_path / "plain", common)
    one = [CaptionSetConfig(path=str(tmp_path / "data" / "shards"), weight=1.0)]
    listed = _run(tmp_path / "data", tmp_path / "listed", common, sets=one)
    assert listed["train"]["losses"] == plain["train"]["losses"]
    a = load_file(str(tmp_path / "plain" / CHECKPOINTS / "step-0000004" / "model.safetensors"))
    b = load_file(str(tmp_path / "listed" / CHECKPOINTS / "step-0000004" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _worker(rank: int, world: int, port: int, root: str, out: str, overrides: list[str]) -> None:
    join_as_rank(rank, world, port)
    torch.set_num_threads(1)
    metrics = _run(Path(root), Path(out), overrides)
    Path(out, f"losses.rank{rank}.json").write_text(json.dumps(metrics["train"]["losses"]))


@pytest.mark.slow  # spawns 2 processes: ~30-60 s on a shared 2-core CPU
def test_two_processes_stream_disjoint_shards(tmp_path: Path) -> None:
    overrides = ["stage2.loop.max_steps=4", "stage2.loop.save_every_steps=4"]
    write_world_shards(tmp_path / "data", 48, 4)
    mp.spawn(
        _worker, args=(2, free_port(), str(tmp_path / "data"), str(tmp_path / "two"), overrides), nprocs=2
    )
    losses = [json.loads((tmp_path / "two" / f"losses.rank{r}.json").read_text()) for r in range(2)]
    assert losses[0] == losses[1] and len(losses[0]) == 4  # one global loss per step
    state = json.loads((tmp_path / "two" / CHECKPOINTS / "step-0000004" / "checkpoint.json").read_text())
    position = state["state"]["extra"]["data"]
    assert position["world"] == 2 and set(position["units"]) == {"0", "1"}
    # Rebuild what each rank read from the saved positions: disjoint records from its own shards.
    os.environ["LLM2CLIP_VLM_CACHE"] = str(tmp_path / "data" / "cache")
    index = record_index(load_caption_set(CaptionSetConfig(path=str(tmp_path / "data" / "shards"))))
    assert index is not None
    plan = StreamPlan.of_index(index, len(index), seed=position["seed"], units=2, buffer=6)
    read = {}
    for unit, (pos, _bad) in position["units"].items():
        assert pos == 4 * 4  # 4 steps of a local batch of 4
        read[unit] = set(plan.epoch_order(0, int(unit))[0][:pos].tolist())
        shards = {int(index.column("shard")[i]) for i in plan.epoch_ids(0, int(unit))}
        assert len(shards) == 2  # two of the four shards each
    assert not read["0"] & read["1"]
    assert np.isfinite(losses[0]).all()


@pytest.mark.slow  # accelerate launch, 2 processes: ~1 min on a shared 2-core CPU
def test_accelerate_launch_two_cpu_processes_stream_disjoint_shards(tmp_path: Path) -> None:
    """The reference DDP launcher config, as users run it (``accelerate launch``), on 2 CPU processes.

    The FSDP config cannot run on a CPU (see docs/BENCHMARKS.md, "FSDP on CPU"): accelerate
    1.15 builds FSDP only with an accelerator device.
    """
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    write_world_shards(tmp_path / "data", 48, 4)
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(repo / "recipes/accelerate/ddp-8gpu.yaml"),
        "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port()),
        str(repo / "tests/stage2_stream_driver.py"), str(tmp_path / "data"), str(tmp_path / "out"),
        "stage2.loop.max_steps=3", "stage2.loop.save_every_steps=3",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [json.loads((tmp_path / "out" / f"losses.rank{r}.json").read_text()) for r in range(2)]
    assert losses[0] == losses[1] and len(losses[0]) == 3
    state = json.loads((tmp_path / "out" / CHECKPOINTS / "step-0000003" / "checkpoint.json").read_text())
    position = state["state"]["extra"]["data"]
    assert position["world"] == 2 and {u: p for u, (p, _) in position["units"].items()} == {"0": 12, "1": 12}
    os.environ["LLM2CLIP_VLM_CACHE"] = str(tmp_path / "data" / "cache")
    index = record_index(load_caption_set(CaptionSetConfig(path=str(tmp_path / "data" / "shards"))))
    assert index is not None
    plan = StreamPlan.of_index(index, len(index), seed=position["seed"], units=2, buffer=6)
    assert not set(plan.epoch_order(0, 0)[0][:12].tolist()) & set(plan.epoch_order(0, 1)[0][:12].tolist())
