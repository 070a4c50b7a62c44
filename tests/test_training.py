"""The training layer: one lr schedule, TrainState, and the one loop on a toy model (resume,
checkpoints kept, hooks, time budget, the NaN guard)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from llm2clip_vlm.training import dist
from llm2clip_vlm.training.checkpoint import Checkpointer
from llm2clip_vlm.training.config import LoopConfig
from llm2clip_vlm.training.guards import NonFiniteError
from llm2clip_vlm.training.loop import Run, Stage, StepOutput, TrainState
from llm2clip_vlm.training.optim import adamw, grouped, lr_factor, make_scheduler, warmup_steps


def test_warmup_is_the_reference_formula_then_each_schedule() -> None:
    # Warm-up: (step + 1) / warmup, so the last warm-up step already runs at the full lr.
    assert [lr_factor(k, 4, 20, "cosine") for k in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 4, 20, "cosine") == 1.0 and lr_factor(20, 4, 20, "cosine") == pytest.approx(0.0)
    assert lr_factor(12, 4, 20, "cosine") == pytest.approx(0.5)
    assert lr_factor(12, 4, 20, "linear") == pytest.approx(0.5) and lr_factor(25, 4, 20, "linear") == 0.0
    assert lr_factor(19, 4, 20, "constant") == 1.0
    assert lr_factor(0, 0, 10, "cosine") == 1.0  # no warm-up: the full lr from the first step
    # After warm-up the linear decay is transformers' get_linear_schedule_with_warmup, to the bit.
    from transformers import get_linear_schedule_with_warmup

    ref = get_linear_schedule_with_warmup(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), 3, 11)
    ours = [lr_factor(k, 3, 11, "linear") for k in range(3, 12)]
    assert ours == [ref.lr_lambdas[0](k) for k in range(3, 12)]
    assert warmup_steps(LoopConfig(warmup_steps=0, warmup_ratio=0.03), 100) == 3
    assert warmup_steps(LoopConfig(warmup_steps=7, warmup_ratio=0.5), 100) == 7


def test_groups_exclude_biases_and_norms_from_weight_decay() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    groups = grouped(
        model.named_parameters(), lambda n: ("head" if n.startswith("2") else "body", 0.1), 0.05, 0.1
    )
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"body.decay", "body.no_decay", "head.decay", "head.no_decay"}
    assert by_name["body.no_decay"]["weight_decay"] == 0.0 and by_name["body.decay"]["weight_decay"] == 0.05
    assert len(by_name["body.no_decay"]["params"]) == 3  # bias, norm weight, norm bias
    assert "name" not in adamw(groups, 0.1, torch.device("cpu")).param_groups[0]


def test_state_from_an_older_checkpoint_keeps_unknown_keys_in_extra() -> None:
    s = TrainState.from_dict({"step": 3, "losses": [1.0], "truncated": 2, "heldout_before": {"a": 1}})
    assert (s.step, s.losses, s.extra) == (3, [1.0], {"truncated": 2, "heldout_before": {"a": 1}})


class _Stop(Exception):
    pass


def _toy_run(out: Path, loop: LoopConfig, on_step=None, nan_at: int = 0, skip: bool = False, tracker=None):
    """A noisy linear regression on the one loop: data and dropout from (seed, step) and the RNG."""
    torch.manual_seed(0)
    acc = dist.make_accelerator(loop.precision)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 1))
    run = Run("toy", loop, out, acc, skip_nonfinite=skip)
    if run.resumed_weights is not None:
        model.load_state_dict(run.resumed_weights)
    optimizer = adamw(list(model.parameters()), 0.05, acc.device)
    scheduler = make_scheduler(optimizer, loop, loop.max_steps)
    model, optimizer = run.prepare(model, optimizer, scheduler)
    clamps: list[int] = []
    started_at = dict(run.state.extra.get("data", {"position": 0}))  # where a stream would restart

    def batches():
        for k in range(run.state.step, loop.max_steps):
            g = torch.Generator().manual_seed(k)
            x = torch.randn(16, 4, generator=g)
            yield x, x.sum(1, keepdim=True)

    def step(batch):
        x, y = batch
        loss = ((model(x) - y) ** 2).mean()
        if nan_at and run.state.step + 1 == nan_at:
            loss = loss * float("nan")
        acc.backward(loss)
        return StepOutput(dist.reduce_float(acc, loss), metrics={"tokens": 16})

    stage = Stage("toy", model, optimizer, scheduler, step, lambda: dict(model.state_dict()), model.parameters,
                  after_update=lambda: clamps.append(1), data_state=lambda: {"position": run.state.step})  # fmt: skip
    state = run.train(stage, batches(), loop.max_steps, on_step, tracker)
    state.extra["started_at"] = started_at
    return state, {k: v.clone() for k, v in model.state_dict().items()}, len(clamps)


def test_the_loop_resumes_exactly_keeps_n_checkpoints_and_calls_hooks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    loop = LoopConfig(precision="fp32", max_steps=6, warmup_steps=2, save_every_steps=2, keep_checkpoints=1)
    full, w_full, hooks = _toy_run(tmp_path / "full", loop)
    assert full.step == 6 and hooks == 6 and len(full.losses) == 6
    assert [p.name for p in Checkpointer(tmp_path / "full").complete()] == ["step-0000006"]

    def stop(step: int, loss: float) -> None:
        if step == 5:
            raise _Stop

    with pytest.raises(_Stop):
        _toy_run(tmp_path / "cut", loop, on_step=stop)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        resumed, w_cut, hooks = _toy_run(tmp_path / "cut", loop)
    # Said once, naming the stage (the checkpoint is read twice: weights, then optimizer).
    said = [r.getMessage() for r in caplog.records if "resuming from" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("toy: resuming from") and "step-0000004" in said[0]
    assert hooks == 2  # steps 5 and 6 only
    assert resumed.extra["started_at"] == {"position": 4}  # the data state saved with step 4
    assert resumed.losses == full.losses  # history restored, the rest recomputed bit for bit
    assert all(torch.equal(w_full[k], w_cut[k]) for k in w_full)


def test_the_nan_guard_stops_or_skips_and_the_budget_stops(tmp_path: Path) -> None:
    loop = LoopConfig(precision="fp32", max_steps=4, save_every_steps=0)
    with pytest.raises(NonFiniteError, match="step 3"):
        _toy_run(tmp_path / "stop", loop, nan_at=3)
    state, _, _ = _toy_run(tmp_path / "skip", loop, nan_at=3, skip=True)
    assert state.skipped_steps == [3] and state.step == 4 and math.isnan(state.losses[2])
    budget = LoopConfig(precision="fp32", max_steps=50, max_seconds=1e-9, save_every_steps=0)
    state, _, _ = _toy_run(tmp_path / "budget", budget)
    assert state.step == 1  # stopped after the first step, and saved it
    assert Checkpointer(tmp_path / "budget").latest().name == "step-0000001"  # type: ignore[union-attr]


def test_a_tracker_sees_every_step_with_the_lr_and_the_steps_own_metrics(tmp_path: Path) -> None:
    class Tracker:
        def __init__(self) -> None:
            self.calls: list[dict] = []

        def train_step(self, step: int, **kw) -> None:
            self.calls.append(dict(kw, step=step))

    tracker = Tracker()
    loop = LoopConfig(precision="fp32", max_steps=3, warmup_steps=2, save_every_steps=0)
    state, _, _ = _toy_run(tmp_path / "run", loop, tracker=tracker)
    assert [c["step"] for c in tracker.calls] == [1, 2, 3]
    assert [c["last"] for c in tracker.calls] == [False, False, True]
    assert [c["loss"] for c in tracker.calls] == state.losses
    # lr after each step's scheduler step: warm-up 2/2 (full), then cosine at 1 of 1 (0).
    assert [round(c["lr"], 6) for c in tracker.calls] == [0.05, 0.05, 0.0]
    assert all(c["tokens"] == 16 and c["grad_norm"] is not None and c["samples"] == 0 for c in tracker.calls)


def test_one_process_runs_at_one_precision_and_a_conflict_is_one_clear_error() -> None:
    from llm2clip_vlm.errors import describe

    acc = dist.make_accelerator("fp32")
    assert acc.mixed_precision == "no"
    assert dist.make_accelerator("fp32").mixed_precision == "no"  # the same precision again: fine
    with pytest.raises(
        dist.PrecisionConflictError, match="asks for bf16: accelerate fixes one per process"
    ) as e:
        dist.make_accelerator("bf16")
    assert describe(e.value).exit_code == 2  # one line through the CLI, not a traceback
    dist.check_one_precision({"stage1": "bf16", "stage2": "bf16"})
    with pytest.raises(
        dist.PrecisionConflictError, match=r"stage1.loop.precision=bf16, stage2.loop.precision=fp32"
    ):
        dist.check_one_precision({"stage1": "bf16", "stage2": "fp32"})


def test_the_package_uses_no_private_accelerate_state() -> None:
    root = Path(__file__).resolve().parents[1] / "llm2clip_vlm"
    private = ("_reset_state", "_shared_state", "_set_sync_gradients")
    offenders = [
        f"{p.relative_to(root)}: {name}"
        for p in sorted(root.rglob("*.py"))
        for name in private
        if name in p.read_text()
    ]
    assert not offenders, offenders


def _fp16_run(out: Path, loop: LoopConfig, on_step=None):
    """The toy regression under an fp16 loss scaler. accelerate makes one only on GPUs
    (``torch.amp.GradScaler``); here a CPU GradScaler is put where accelerate keeps it, before
    ``prepare`` (which hands it to the optimizer), so the loop's scaler path runs on the CPU. The
    first scale, 2**20, overflows the fp16 gradients (accelerate autocasts the forward to fp16): the scaler must skip and halve."""
    torch.manual_seed(0)
    acc = dist.make_accelerator("fp16")  # on a CPU: fp16 without a scaler (and no autocast)
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20, growth_interval=2)
    acc.native_amp = True  # with fp16, the clip then unscales (accelerate's rule)
    model = nn.Linear(4, 1)
    run = Run("toy", loop, out, acc)
    if run.resumed_weights is not None:
        model.load_state_dict(run.resumed_weights)
    optimizer = adamw(list(model.parameters()), 0.05, acc.device)
    scheduler = make_scheduler(optimizer, loop, loop.max_steps)
    model, optimizer = run.prepare(model, optimizer, scheduler)
    scales: list[float] = []

    def batches():
        for k in range(run.state.step, loop.max_steps):
            x = torch.randn(16, 4, generator=torch.Generator().manual_seed(k))
            yield x, 3 * x.sum(1, keepdim=True) + 5

    def step(batch):
        x, y = batch
        loss = ((model(x) - y) ** 2).mean()
        acc.backward(loss)
        return StepOutput(dist.reduce_float(acc, loss))

    def record(step: int, loss: float) -> None:
        scales.append(acc.scaler.get_scale())
        if on_step is not None:
            on_step(step, loss)

    stage = Stage(
        "toy", model, optimizer, scheduler, step, lambda: dict(model.state_dict()), model.parameters
    )
    state = run.train(stage, batches(), loop.max_steps, record)
    return state, {k: v.clone() for k, v in model.state_dict().items()}, scales


@pytest.fixture
def fp16_process() -> Iterator[None]:
    """accelerate fixes one mixed precision per process: start and leave this test without one."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_fp16_loss_scaler_skips_overflows_lowers_the_scale_and_resumes_exactly(
    tmp_path: Path, fp16_process: None
) -> None:
    loop = LoopConfig(precision="fp32", max_steps=12, warmup_steps=0, grad_clip=5.0, save_every_steps=3,
                      keep_checkpoints=3)  # fmt: skip
    torch.manual_seed(0)
    w0 = {k: v.clone() for k, v in nn.Linear(4, 1).state_dict().items()}
    full, w_full, scales = _fp16_run(tmp_path / "full", loop)
    # No NonFiniteError: the first steps overflow, the scaler halves the scale and skips them.
    assert full.step == 12 and full.skipped_steps == []
    assert scales[0] == 2.0**19 and min(scales) < scales[0]
    assert not torch.equal(w_full["weight"], w0["weight"])  # later steps did update
    assert full.losses[-1] < full.losses[0]

    def stop(step: int, loss: float) -> None:
        if step == 5:
            raise _Stop

    with pytest.raises(_Stop):
        _fp16_run(tmp_path / "cut", loop, on_step=stop)
    resumed, w_cut, scales_cut = _fp16_run(tmp_path / "cut", loop)
    assert scales_cut == scales[3:]  # the scale continues from the checkpoint of step 3
    assert resumed.losses == full.losses
    assert all(torch.equal(w_full[k], w_cut[k]) for k in w_full)
