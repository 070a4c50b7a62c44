"""The one training loop every stage runs (stage 1's MNTP and SimCSE, stage 2, both LLaVA phases).

A stage supplies a :class:`Stage`: its prepared model, optimizer and scheduler, a ``step`` that
turns one batch into a backward pass and returns the global loss, what a checkpoint stores, and
hooks such as clamping the logit scale. :class:`Run` owns everything else, top to bottom:

    resume (weights before ``prepare``, optimizer/scheduler after) -> for each batch:
    RNG restore (first step after a resume) -> stage.step -> grad clip -> NaN guard ->
    optimizer/scheduler step -> hooks -> state, progress, ``on_step`` -> time budget ->
    periodic / final / on-signal checkpoint -> exit on signal

fp16 (``loop.precision: fp16``, the reference stage 2's ``--precision fp16``) runs with
accelerate's loss scaler (a ``torch.amp.GradScaler`` on GPUs): ``accelerator.backward`` scales the
loss, the clip unscales, the prepared optimizer's ``step`` skips an update whose gradients
overflowed and lowers the scale. The loop therefore always calls ``step`` under a scaler and
guards only the loss (an inf gradient is the scaler's business), and checkpoints the scaler's
state so a resumed run continues with the same scale.

[IMPORTANT] Every decision that ends or saves a step (time budget, signals, the loss the guard
checks) is the same on every rank: the budget and the signal flags are reduced over processes,
and the stage's step returns a loss already reduced. A rank stopping alone would hang the others.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from llm2clip_vlm.logging import get_logger
from llm2clip_vlm.progress import make_progress
from llm2clip_vlm.signals import GracefulExit
from llm2clip_vlm.training import dist, fsdp
from llm2clip_vlm.training.checkpoint import Checkpointer, Resumed
from llm2clip_vlm.training.config import LoopConfig
from llm2clip_vlm.training.guards import NonFiniteError, NonFiniteGuard

log = get_logger(__name__)

OnStep = Callable[[int, float], None]
GRAD_SCALER = "grad_scaler"  # TrainState.extra key of the fp16 loss scaler's state


@dataclass
class TrainState:
    """What a checkpoint restores besides weights, optimizer, scheduler and RNG.

    ``step`` is also the data position: every stage's batch of step ``k`` is a function of
    ``(seed, k)``. ``extra`` holds a stage's own history (held-out results measured before
    training, counters of truncated samples, ...).
    """

    step: int = 0
    seconds: float = 0.0
    world_size: int = 1
    losses: list[float] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        """Read a checkpoint's state; keys that are not fields (older checkpoints) go to ``extra``."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        extra = dict(data.get("extra", {}))
        extra.update({k: v for k, v in data.items() if k not in known and k != "extra"})
        return cls(**{k: v for k, v in data.items() if k in known}, extra=extra)


@dataclass
class StepOutput:
    """What a stage's step returns: the global loss (same value on every rank), log text, and
    measurements for a tracker (e.g. ``tokens``, ``logit_scale``)."""

    loss: float
    status: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)


class StepTracker(Protocol):
    """Receives every optimizer step (an experiment tracker; main process only)."""

    def train_step(self, step: int, *, loss: float, lr: float, grad_norm: Any, samples: int, last: bool,
                   **metrics: Any) -> None: ...  # fmt: skip


@dataclass
class Stage:
    """What a stage hands to the loop.

    Attributes:
        name: shown in the progress bar and in messages (``"stage 2"``, ``"llava finetune"``).
        model: the prepared (DDP/FSDP/DeepSpeed-wrapped) model; set to train mode by the loop.
        optimizer, scheduler: stepped once per optimizer step by the loop.
        step: forward + backward of this rank's part of one global batch; returns the global loss.
        weights: what a checkpoint stores (called on every rank: a collective under FSDP); the
            main process returns the tensors, the others may return None.
        clip_parameters: the parameters whose global norm ``loop.grad_clip`` clips; None when the
            stage's engine clips inside ``backward`` (DeepSpeed).
        after_update: called after every optimizer step (e.g. clamp the logit scale).
        data_state: for a data stream whose position is not a function of the step (streamed
            shards): its resumable state (JSON-able), stored in ``state.extra["data"]`` with every
            checkpoint; the stage reads it back from ``run.state.extra`` to restart the stream.
        samples_per_step: global samples per step (for the throughput shown).
        unit: what a sample is called in the progress line.
    """

    name: str
    model: nn.Module
    optimizer: Any
    scheduler: Any
    step: Callable[[Any], StepOutput]
    weights: Callable[[], dict[str, torch.Tensor] | None]
    clip_parameters: Callable[[], Iterable[torch.nn.Parameter]] | None
    after_update: Callable[[], None] | None = None
    data_state: Callable[[], dict[str, Any]] | None = None
    samples_per_step: int = 0
    unit: str = "samples"


class Run:
    """One stage's training run: its checkpoints, the resumed state, and the loop.

    Args:
        name: named in messages (the NaN guard, logs).
        loop: the stage's :class:`LoopConfig`.
        checkpoints: the folder of this run's checkpoints.
        accelerator: the run's ``accelerate.Accelerator``.
        skip_nonfinite, max_skipped: the NaN guard's policy (``reliability.*``).
        same_world_size: refuse a checkpoint of another process count (per-rank data slices).
    """

    def __init__(
        self,
        name: str,
        loop: LoopConfig,
        checkpoints: Path,
        accelerator: Any,
        *,
        skip_nonfinite: bool = False,
        max_skipped: int = 100,
        same_world_size: bool = False,
    ) -> None:
        self.name, self.loop, self.accelerator = name, loop, accelerator
        self.skip_nonfinite, self.max_skipped = skip_nonfinite, max_skipped
        self.checkpointer = Checkpointer(checkpoints, accelerator, keep=loop.keep_checkpoints)
        # Weights and state now; optimizer and scheduler after ``prepare`` (see :meth:`prepare`).
        self.resumed: Resumed | None = self.checkpointer.load(same_world_size=same_world_size)
        self.state = (
            TrainState.from_dict(self.resumed.state)
            if self.resumed is not None
            else TrainState(world_size=dist.world(accelerator))
        )
        if self.resumed is not None:
            log.info("%s: resuming from %s at step %d", name, self.resumed.path, self.state.step)
        self.samples_seen = 0
        self.loop_seconds = 0.0
        self.fsdp2 = dist.wants_fsdp2(accelerator, loop.distributed)
        if self.resumed is not None and self.resumed.sharded != self.fsdp2:
            kind = "FSDP2 shards" if self.resumed.sharded else "full weights"
            raise ValueError(
                f"{self.resumed.path} holds {kind}: resume it with the same {name} loop.distributed "
                f"({'fsdp2' if self.resumed.sharded else 'accelerate'})"
            )

    @property
    def resumed_weights(self) -> dict[str, torch.Tensor] | None:
        """The checkpoint's weights, to load into the model before :meth:`prepare` (None: fresh, or
        FSDP2 shards, which :meth:`prepare` loads into the sharded model)."""
        if self.resumed is None or self.resumed.sharded:
            return None
        return self.resumed.weights

    def shard(
        self, model: nn.Module, blocks: Iterable[nn.Module], forward_methods: Iterable[str] = ()
    ) -> nn.Module:
        """Under ``loop.distributed: fsdp2``: ``fully_shard`` every block, then the root (the
        model's wrapping hook names the blocks); otherwise the model unchanged.

        Call it before building the optimizer: FSDP2's optimizer holds the sharded parameters.
        """
        if not self.fsdp2:
            return model
        return fsdp.shard(model, blocks, self.loop.precision, self.accelerator.device, forward_methods)

    def prepare(self, model: nn.Module, optimizer: Any, scheduler: Any) -> tuple[Any, Any]:
        """``accelerator.prepare(model, optimizer)``, then the optimizer and scheduler states of the
        checkpoint (after wrapping: under FSDP the optimizer state is per-shard).

        Under FSDP2 the model is already sharded (:meth:`shard`) and accelerate wraps nothing; a
        sharded checkpoint's weights and optimizer state are loaded here (DCP, every rank).
        """
        if self.fsdp2:
            if not fsdp.is_sharded(model):
                raise ValueError(
                    f"{self.name} does not shard with FSDP2 (loop.distributed=fsdp2 or an accelerate FSDP "
                    "config): stage 2 and LLaVA do; run this stage with DDP or DeepSpeed"
                )
            if self.resumed is not None:
                self.checkpointer.load(self.resumed.path, scheduler=scheduler, with_weights=False)
                fsdp.load_sharded(self.resumed.path, model, optimizer)
            return model, optimizer
        model, optimizer = self.accelerator.prepare(model, optimizer)
        if self.resumed is not None:
            self.checkpointer.load(
                self.resumed.path, optimizer=optimizer, scheduler=scheduler, with_weights=False
            )
            saved = self.state.extra.get(GRAD_SCALER)
            if saved is not None and self.scaler is not None:
                self.scaler.load_state_dict(saved)
        return model, optimizer

    def full_weights(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The model's full state dict on the main process (None elsewhere); a collective under
        FSDP (every rank calls it): for the export after training."""
        if self.fsdp2:
            full = fsdp.full_state_dict(model)
        else:
            full = self.accelerator.get_state_dict(model)
        return full if dist.is_main(self.accelerator) else None

    def clip(self, parameters: Iterable[torch.nn.Parameter], max_norm: float) -> Any:
        """Clip the global gradient norm (FSDP2: over the shards); returns the norm before clipping."""
        if self.fsdp2:
            return fsdp.clip_grad_norm(parameters, max_norm)
        return self.accelerator.clip_grad_norm_(parameters, max_norm)

    @property
    def scaler(self) -> Any:
        """accelerate's fp16 loss scaler (None in bf16/fp32, and under DeepSpeed, which scales itself)."""
        return getattr(self.accelerator, "scaler", None)

    @property
    def samples_per_second(self) -> float:
        return self.samples_seen / max(self.loop_seconds, 1e-9)

    def save(self, stage: Stage) -> None:
        """Write a checkpoint of the current step (every rank calls it)."""
        if stage.data_state is not None:
            self.state.extra["data"] = stage.data_state()
        if self.scaler is not None:
            self.state.extra[GRAD_SCALER] = dict(self.scaler.state_dict())
        if self.fsdp2:  # every rank writes its shards; no full copy is gathered
            bad = fsdp.nonfinite_parameter(stage.model)
            if dist.any_rank(self.accelerator, bad is not None):  # never written, as full weights
                where = f"{bad} is" if bad else "another process's shard is"
                raise NonFiniteError(f"checkpoint of step {self.state.step}: {where} not finite; not written")

            def write_shards(folder: Path) -> None:
                fsdp.save_sharded(folder, stage.model, stage.optimizer)

            self.checkpointer.save(
                self.state.step, weights=None, scheduler=stage.scheduler,
                state=dataclasses.asdict(self.state), sharded=write_shards,
            )  # fmt: skip
            return
        weights = stage.weights()
        self.checkpointer.save(
            self.state.step,
            weights=weights if dist.is_main(self.accelerator) else None,
            optimizer=stage.optimizer,
            scheduler=stage.scheduler,
            state=dataclasses.asdict(self.state),
        )

    def train(
        self,
        stage: Stage,
        batches: Iterable[Any],
        total_steps: int,
        on_step: OnStep | None = None,
        tracker: StepTracker | None = None,
    ) -> TrainState:
        """Run ``stage`` from ``state.step`` to ``total_steps`` (or the time budget).

        Args:
            stage: what the stage supplies.
            batches: this rank's batches, starting at the resumed step.
            total_steps: the schedule's length.
            on_step: called as ``on_step(step, loss)`` after every optimizer step (main process).
            tracker: told of every step (loss, lr, grad norm, samples, the step's own metrics).

        Returns:
            The final :class:`TrainState` (also ``self.state``).
        """
        acc, loop, state = self.accelerator, self.loop, self.state
        main = dist.is_main(acc)
        resumed, self.resumed = self.resumed, None
        if state.step >= total_steps:
            if resumed is not None:  # what follows starts from the RNG the finished run left
                resumed.restore_rng()
            return state
        guard = NonFiniteGuard(self.name, self.skip_nonfinite, self.max_skipped, list(state.skipped_steps))
        stage.model.train()
        started = time.perf_counter() - state.seconds
        loop_start = time.perf_counter()
        with (
            make_progress(disable=not main) as progress,
            GracefulExit(agree=lambda flag: dist.any_rank(acc, flag)) as signals,
        ):
            task = progress.add_task(stage.name, total=total_steps, completed=state.step, status="")
            for batch in batches:
                if resumed is not None:  # after the loader started: RNG exactly as after the saved step
                    resumed.restore_rng()
                    resumed = None
                out = stage.step(batch)
                grad_norm = None
                if loop.grad_clip > 0 and stage.clip_parameters is not None:
                    grad_norm = self.clip(stage.clip_parameters(), loop.grad_clip)
                scaler = self.scaler
                # Under the fp16 scaler an overflowed gradient is expected: the scaler's step skips
                # it and lowers the scale (it must run for that, even on a skipped step).
                take = guard.check(out.loss, state.step + 1, None if scaler is not None else grad_norm)
                if take or scaler is not None:
                    stage.optimizer.step()
                    if scaler is not None and getattr(stage.optimizer, "step_was_skipped", False):
                        log.info("%s: fp16 gradients overflowed at step %d; update skipped, loss scale "
                                 "now %g", self.name, state.step + 1, scaler.get_scale())  # fmt: skip
                stage.scheduler.step()
                stage.optimizer.zero_grad(set_to_none=True)
                if stage.after_update is not None:
                    stage.after_update()

                state.step += 1
                state.losses.append(out.loss)
                state.skipped_steps = list(guard.skipped)
                state.seconds = time.perf_counter() - started
                self.samples_seen += stage.samples_per_step
                self.loop_seconds = time.perf_counter() - loop_start
                status = f"loss {out.loss:.4f} {out.status} {self.samples_per_second:.1f} {stage.unit}/s"
                progress.update(task, completed=state.step, status=" ".join(status.split()))
                if on_step is not None and main:
                    on_step(state.step, out.loss)

                out_of_time = loop.max_seconds > 0 and dist.any_rank(acc, state.seconds >= loop.max_seconds)
                stop = state.step >= total_steps or out_of_time
                interrupted = signals.should_stop()
                if tracker is not None:
                    tracker.train_step(
                        state.step, loss=out.loss, lr=stage.scheduler.get_last_lr()[0], grad_norm=grad_norm,
                        samples=stage.samples_per_step, last=stop or interrupted, **out.metrics,
                    )  # fmt: skip
                periodic = loop.save_every_steps > 0 and state.step % loop.save_every_steps == 0
                if periodic or stop or interrupted:
                    self.save(stage)
                signals.raise_if_requested(self.checkpointer.latest())
                if out_of_time:
                    log.info(
                        "%s: max_seconds=%s reached after %d steps", self.name, loop.max_seconds, state.step
                    )
                if stop:
                    break
        return state
