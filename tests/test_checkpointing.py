"""The shared checkpoint module: round trip, atomicity, full disk, NaN refusal, pickles, signals."""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from llm2clip_vlm.errors import PickleRefusedError
from llm2clip_vlm.signals import GracefulExit, TrainingInterrupted
from llm2clip_vlm.training import checkpoint as checkpointing
from llm2clip_vlm.training.checkpoint import Checkpointer, CheckpointError, CheckpointWriteError
from llm2clip_vlm.training.guards import NonFiniteError, NonFiniteGuard
from llm2clip_vlm.weights import from_pretrained_kwargs, require_safetensors


def _setup(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def _step(model: nn.Module, opt: torch.optim.Optimizer, sched: object) -> float:
    x = torch.randn(16, 4)  # consumes the torch RNG, like dropout does
    loss = model(x).pow(2).mean() + random.random() * 0 + float(np.random.rand()) * 0
    loss.backward()
    opt.step()
    sched.step()  # type: ignore[attr-defined]
    opt.zero_grad()
    return loss.item()


def test_resume_continues_bit_identically(tmp_path: Path) -> None:
    model, opt, sched = _setup()
    ref = [_step(model, opt, sched) for _ in range(6)]
    ref_weights = {k: v.clone() for k, v in model.state_dict().items()}

    model, opt, sched = _setup()
    ckpt = Checkpointer(tmp_path / "ck", keep=2)
    for step in range(1, 4):
        _step(model, opt, sched)
        ckpt.save(step, weights=model.state_dict(), optimizer=opt, scheduler=sched, state={"step": step})
    # Only the 2 newest remain, no temp folders, and python/numpy RNG were captured too.
    assert [p.name for p in ckpt.complete()] == ["step-0000002", "step-0000003"]
    assert not list((tmp_path / "ck").glob(".tmp-*"))
    py_next, np_next = random.random(), np.random.rand()

    model, opt, sched = _setup(seed=123)  # a fresh process: other init, other RNG position
    random.seed(5)
    np.random.seed(5)
    resumed = Checkpointer(tmp_path / "ck").load(optimizer=opt, scheduler=sched)
    assert resumed is not None and resumed.step == 3 and resumed.state == {"step": 3}
    model.load_state_dict(resumed.weights)
    resumed.restore_rng()
    assert (random.random(), np.random.rand()) == (py_next, np_next)
    resumed.restore_rng()
    rest = [_step(model, opt, sched) for _ in range(3)]
    assert rest == ref[3:]
    assert all(torch.equal(ref_weights[k], v) for k, v in model.state_dict().items())
    assert sched.get_last_lr() == [1e-2 / 7]


def test_full_disk_keeps_the_last_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, opt, sched = _setup()
    ckpt = Checkpointer(tmp_path, keep=1)
    good = ckpt.save(1, weights=model.state_dict(), optimizer=opt, scheduler=sched, state={"step": 1})
    _step(model, opt, sched)

    def full_disk(*a: object, **k: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpointing, "_save_tensors", full_disk)
    with pytest.raises(CheckpointWriteError, match=r"no space left on its disk.*step-0000001 is intact"):
        ckpt.save(2, weights=model.state_dict(), optimizer=opt, scheduler=sched, state={"step": 2})
    monkeypatch.undo()
    assert ckpt.latest() == good and sorted(p.name for p in tmp_path.iterdir()) == ["step-0000001"]
    assert Checkpointer(tmp_path).load(optimizer=opt, scheduler=sched).state == {"step": 1}  # type: ignore[union-attr]


def test_nan_weights_are_never_written(tmp_path: Path) -> None:
    model, opt, _ = _setup()
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, weights=model.state_dict(), optimizer=opt, state={})
    with torch.no_grad():
        model[2].weight[0, 3] = float("nan")
    with pytest.raises(NonFiniteError, match=r"'2.weight' holds NaN"):
        ckpt.save(2, weights=model.state_dict(), optimizer=opt, state={})
    assert [p.name for p in tmp_path.iterdir()] == ["step-0000001"]


def test_truncated_or_incomplete_checkpoints(tmp_path: Path) -> None:
    model, opt, _ = _setup()
    ckpt = Checkpointer(tmp_path)
    path = ckpt.save(4, weights=model.state_dict(), optimizer=opt, state={})
    (tmp_path / ".tmp-step-0000005").mkdir()  # a write killed half-way
    (tmp_path / "step-0000006").mkdir()  # no checkpoint.json: never completed
    assert ckpt.latest() == path
    with open(path / "optimizer.pt", "r+b") as f:
        f.truncate(10)
    with pytest.raises(
        CheckpointError, match=r"step-0000004 cannot be resumed from: optimizer.pt is 10 bytes"
    ):
        ckpt.load(optimizer=opt)


class _Evil:
    def __reduce__(self) -> tuple:
        return (os.system, ("echo pwned",))


def test_pickle_weights_refused_unless_allowed(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(PickleRefusedError, match="pytorch_model.bin.*allow_pickle_weights"):
        require_safetensors(tmp_path, allow_pickle=False)
    require_safetensors(tmp_path, allow_pickle=True)


def test_a_checkpoint_never_unpickles_code(tmp_path: Path) -> None:
    model, opt, sched = _setup()
    path = Checkpointer(tmp_path).save(1, weights=model.state_dict(), scheduler=sched, state={})
    with open(path / "scheduler.pt", "wb") as f:  # a scheduler state that runs code when unpickled
        pickle.dump({"w": _Evil()}, f)
    meta = json.loads((path / "checkpoint.json").read_text())
    meta["files"].pop("scheduler.pt"), meta["sha256"].pop("scheduler.pt")  # past the checksums
    (path / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="cannot be resumed from: UnpicklingError"):
        Checkpointer(tmp_path).load(scheduler=sched)
    assert from_pretrained_kwargs() == {"trust_remote_code": False, "use_safetensors": True}
    assert from_pretrained_kwargs(allow_pickle=True) == {"trust_remote_code": False}


def test_nonfinite_guard_stops_or_skips() -> None:
    with pytest.raises(NonFiniteError, match="stage 2: loss is nan at step 7"):
        NonFiniteGuard("stage 2").check(float("nan"), 7)
    guard = NonFiniteGuard("stage 2", skip=True, max_skipped=2)
    assert guard.check(1.5, 1) and not guard.check(float("inf"), 2)
    assert not guard.check(0.3, 3, grad_norm=torch.tensor(float("nan")))
    assert guard.skipped == [2, 3]
    with pytest.raises(NonFiniteError, match="3 steps had a non-finite loss"):
        guard.check(float("nan"), 4)


def test_sigterm_finishes_the_step_then_raises() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with GracefulExit() as stop:
        assert not stop.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)  # delivered at once, the process keeps running
        assert stop.should_stop()
        with pytest.raises(TrainingInterrupted, match="SIGTERM.*resume") as e:
            stop.raise_if_requested(checkpoint=Path("ck/step-0000003"))
        assert e.value.exit_code == 143 and e.value.checkpoint == Path("ck/step-0000003")
    assert signal.getsignal(signal.SIGTERM) is before


def test_same_world_size_refuses_a_checkpoint_of_another_process_count(tmp_path: Path) -> None:
    from types import SimpleNamespace

    model, opt, _ = _setup()
    Checkpointer(tmp_path).save(1, weights=model.state_dict(), optimizer=opt, state={})
    two = SimpleNamespace(
        num_processes=2, process_index=0, is_main_process=True, distributed_type="MULTI_CPU"
    )
    # Replicated optimizer state is loadable by any process count unless the trainer needs the same one.
    assert Checkpointer(tmp_path, two).load().step == 1
    with pytest.raises(CheckpointError, match="written by 1 processes; resume it with the same number"):
        Checkpointer(tmp_path, two).load(same_world_size=True)
