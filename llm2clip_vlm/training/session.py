"""Open and close one stage's training run: the scaffold every trainer shares.

A trainer (stage 1, stage 2, each LLaVA phase) opens a :class:`Session` on its output folder and
reads, top to bottom::

    session = Session(out, "stage2", loop.precision, inputs)   # accelerator, rank, world
    ...build the model from the inputs...
    session.ready()                                            # output folder + config.yaml
    run = session.open_run("stage2", loop)                     # checkpoints, resumed state
    tracker = session.start_tracker(run)                       # metrics.jsonl + trackers
    run.train(stage, batches, steps, session.on_step, tracker)
    ...evaluate, save the model...
    session.close(metrics)                                     # metrics.json, tracker, barrier

and writes **one** ``metrics.json`` schema for every stage (:func:`metrics_document`, version
:data:`SCHEMA`; documented in docs/DATA.md):

- ``schema``, ``stage``;
- ``train``: the loop's figures under the same names everywhere (:func:`train_summary`);
- ``eval``: what the stage measures before and after training (``metric``: ``cra``,
  ``retrieval`` or ``heldout``; ``before``, ``after``);
- ``details``: what only this stage has (the saved encoder, bad images, the LLaVA phase...);
- ``data``: records read and skipped per set (the command layer fills it; ``{}`` otherwise).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm2clip_vlm.reliability import ReliabilityConfig
from llm2clip_vlm.tracking.config import TrackingConfig
from llm2clip_vlm.tracking.tracker import RunTracker
from llm2clip_vlm.training import dist
from llm2clip_vlm.training.config import LoopConfig
from llm2clip_vlm.training.loop import OnStep, Run, TrainState

SCHEMA = 1
METRICS_FILE = "metrics.json"
# The top-level keys of every stage's metrics.json (pinned by tests/test_metrics_schema.py).
SECTIONS = ("schema", "stage", "train", "eval", "details", "data")


@dataclass
class RunInputs:
    """What the command layer gives every trainer besides its config section and its data.

    Attributes:
        reliability: non-finite steps and pickled weights (default: stop / refuse).
        tracking, run_config: the ``tracking`` section and the resolved config it records.
        on_ready: called on the main process once the inputs are usable (writes config.yaml).
        on_step: called as ``on_step(step, loss)`` after every optimizer step (main process).
    """

    reliability: ReliabilityConfig = field(default_factory=ReliabilityConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run_config: dict[str, Any] | None = None
    on_ready: Callable[[], None] | None = None
    on_step: OnStep | None = None


class Session:
    """One stage's run in ``output_dir``: its accelerator and processes, its loop ``Run`` and
    tracker, and its ``metrics.json``.

    Args:
        output_dir: the run directory (a checkpoint in it is resumed from).
        stage: the stage's short name in ``metrics.json`` and the trackers (``stage1``,
            ``stage2``, ``llava-pretrain``, ``llava-finetune``).
        precision: the stage's ``loop.precision`` (one per process: accelerate's rule).
        inputs: the command layer's explicit inputs.
    """

    def __init__(
        self, output_dir: str | Path, stage: str, precision: str, inputs: RunInputs | None = None
    ) -> None:
        self.out, self.stage = Path(output_dir), stage
        self.inputs = inputs or RunInputs()
        self.accelerator = dist.make_accelerator(precision)
        acc = self.accelerator
        self.main, self.rank, self.world = acc.is_main_process, acc.process_index, acc.num_processes
        self.tracker: RunTracker | None = None

    @property
    def device(self) -> Any:
        return self.accelerator.device

    @property
    def reliability(self) -> ReliabilityConfig:
        return self.inputs.reliability

    @property
    def on_step(self) -> OnStep | None:
        return self.inputs.on_step

    def ready(self) -> None:
        """The inputs (data, base weights) are usable: create the output folder and call
        ``on_ready`` (config.yaml), on the main process only. A run refused before this leaves no
        config.yaml behind."""
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.inputs.on_ready is not None:
                self.inputs.on_ready()

    def open_run(
        self, name: str, loop: LoopConfig, checkpoints: Path, *, same_world_size: bool = False
    ) -> Run:
        """The loop's :class:`Run` on the folder ``checkpoints`` with the reliability policy.

        ``same_world_size``: the stage slices the global batch per rank, so only the same number
        of processes continues a run.
        """
        rel = self.reliability
        return Run(
            name,
            loop,
            checkpoints,
            self.accelerator,
            skip_nonfinite=rel.skip_nonfinite_steps,
            max_skipped=rel.max_skipped_steps,
            same_world_size=same_world_size,
        )

    def start_tracker(self, run: Run) -> RunTracker:
        """``metrics.jsonl`` (truncated past a resumed step) and the configured trackers."""
        self.tracker = RunTracker.start(
            self.out,
            self.inputs.tracking,
            stage=self.stage,
            main=self.main,
            resume_step=run.state.step if run.resumed is not None else None,
            config=self.inputs.run_config,
        )
        return self.tracker

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        """``metrics.json`` on the main process (callers pass :func:`metrics_document`'s)."""
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")

    def close(self, *, end_training: bool = False) -> None:
        """Finish the tracker and wait for every process. ``end_training``: also end accelerate's
        training (destroys the process group; stage 1 has always done it, the others not)."""
        if self.tracker is not None:
            self.tracker.finish()
        self.accelerator.wait_for_everyone()
        if end_training:
            self.accelerator.end_training()


def train_summary(
    state: TrainState, planned_steps: int, run: Run, global_batch: int, processes: int
) -> dict[str, Any]:
    """The ``train`` section: the loop's figures, named alike in every stage."""
    losses = state.losses
    k = max(1, min(10, len(losses) // 5))  # means over the first/last k steps: single steps are noisy
    return {
        "steps": state.step,
        "planned_steps": planned_steps,
        "seconds": round(state.seconds, 2),
        "seconds_per_step": round(state.seconds / max(1, len(losses)), 3),
        "samples_per_second": round(run.samples_per_second, 3),
        "global_batch": global_batch,
        "processes": processes,
        "losses": losses,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "loss_start_mean": sum(losses[:k]) / k if losses else None,
        "loss_end_mean": sum(losses[-k:]) / k if losses else None,
        "skipped_steps": state.skipped_steps,
    }


def untrained_summary(seconds: float) -> dict[str, Any]:
    """The ``train`` section of a stage that trained nothing (``build-tower --without-stage1``'s
    raw encoder): the same keys as :func:`train_summary`, zero steps."""
    return {
        "steps": 0,
        "planned_steps": 0,
        "seconds": round(seconds, 2),
        "seconds_per_step": 0.0,
        "samples_per_second": 0.0,
        "global_batch": 0,
        "processes": 1,
        "losses": [],
        "first_loss": None,
        "final_loss": None,
        "loss_start_mean": None,
        "loss_end_mean": None,
        "skipped_steps": 0,
    }


def metrics_document(
    stage: str, train: dict[str, Any], evaluation: dict[str, Any], details: dict[str, Any]
) -> dict[str, Any]:
    """A stage's ``metrics.json`` in the versioned schema (module docstring, docs/DATA.md)."""
    return {
        "schema": SCHEMA,
        "stage": stage,
        "train": train,
        "eval": evaluation,
        "details": details,
        "data": {},
    }


def read_metrics(path: Path) -> dict[str, Any]:
    """A stage's ``metrics.json``.

    Raises:
        ValueError: one line naming the file when it is not JSON or not of this schema (an older
            run: its keys differ by stage; re-run the stage or read the file as it is).
    """
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a metrics.json ({e})") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        found = doc.get("schema") if isinstance(doc, dict) else None
        if found is None:
            raise ValueError(
                f"{path}: written before metrics.json schema {SCHEMA} (an older run): its figures are left out"
            )
        raise ValueError(
            f"{path}: metrics.json schema {found}, this version reads schema {SCHEMA}: its figures are left out"
        )
    return doc
