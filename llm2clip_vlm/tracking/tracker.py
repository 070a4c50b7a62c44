"""One object per training run that logs from the main process: ``metrics.jsonl`` + trackers.

The trackers are accelerate's own classes (``accelerate.tracking``: TensorBoard, W&B, trackio,
MLflow), built here rather than through ``Accelerator(log_with=...)`` so that a trainer keeps its
Accelerator as it is and a run dir gets its own TensorBoard folder per stage (``build-tower``
runs several stages in one process, with one Accelerator state).

What a training step logs every ``log_every_steps`` steps (and at the last one): ``loss``, ``lr``,
``grad_norm``, stage extras (``logit_scale``), throughput over the steps since the previous line
(``samples_per_s``, ``tokens_per_s``) and peak memory (``peak_rss_gib``; ``peak_gpu_gib`` on a GPU).
"""

from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm2clip_vlm.logging import get_logger
from llm2clip_vlm.tracking.config import BACKENDS, TrackingConfig
from llm2clip_vlm.tracking.metrics_log import MetricsLog, flatten

log = get_logger(__name__)

TENSORBOARD_DIR = "tensorboard"

# accelerate's availability probe per backend, and the pip package that provides it.
_PROBES = {
    "tensorboard": ("is_tensorboard_available", "tensorboard"),
    "wandb": ("is_wandb_available", "wandb"),
    "trackio": ("is_trackio_available", "trackio"),
    "mlflow": ("is_mlflow_available", "mlflow"),
}


def backend_available(name: str) -> bool:
    """Whether accelerate can use tracker ``name`` in this environment."""
    import accelerate.utils

    probe = getattr(accelerate.utils, _PROBES[name][0], None)
    return bool(probe()) if probe is not None else False


def peak_memory() -> dict[str, float]:
    """Peak resident memory of this process, and peak GPU memory allocated by torch (GiB)."""
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    rss = rss_kb / 2**30 if sys.platform == "darwin" else rss_kb / 2**20
    out = {"peak_rss_gib": round(rss, 3)}
    torch = sys.modules.get("torch")  # never import torch just to ask
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return out


def _number(value: Any) -> float | None:
    if value is None:
        return None
    if hasattr(value, "item"):
        value = value.item()  # a tensor: read only on logged steps (a GPU sync)
    return float(value)


@dataclass
class _Window:
    """Samples and tokens since the previous training line, and when that window began."""

    start: float = field(default_factory=time.perf_counter)
    samples: int = 0
    tokens: int = 0
    steps: int = 0

    def rates(self) -> dict[str, float]:
        seconds = max(time.perf_counter() - self.start, 1e-9)
        rates = {
            "samples_per_s": round(self.samples / seconds, 3),
            "seconds_per_step": round(seconds / max(1, self.steps), 4),
        }
        if self.tokens:
            rates["tokens_per_s"] = round(self.tokens / seconds, 1)
        return rates


class RunTracker:
    """Logs a run's scalars to ``RUN/metrics.jsonl`` and to the configured trackers (main only).

    On other processes every method is a no-op, so a trainer calls it unconditionally.
    """

    def __init__(
        self,
        run_dir: Path,
        cfg: TrackingConfig,
        stage: str,
        metrics: MetricsLog | None,
        trackers: list[Any],
    ) -> None:
        self.run_dir, self.cfg, self.stage = run_dir, cfg, stage
        self.metrics, self.trackers = metrics, trackers
        self._window = _Window()

    # ----------------------------------------------------------------------------------------
    @classmethod
    def start(
        cls,
        run_dir: str | Path,
        cfg: TrackingConfig,
        *,
        stage: str,
        main: bool,
        resume_step: int | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> RunTracker:
        """Open ``metrics.jsonl`` (truncated past ``resume_step``) and start the trackers.

        Args:
            run_dir: the run directory (``metrics.jsonl`` and ``tensorboard/`` go there).
            cfg: the ``tracking`` section.
            stage: a short name (``stage1``, ``stage2``, ``llava-pretrain``...), for run names.
            main: whether this is the process that logs (rank 0).
            resume_step: the step a resumed run continues from; None for a fresh run.
            config: the resolved run config, stored as the trackers' hyperparameters.
        """
        run_dir = Path(run_dir)
        if cfg.log_every_steps < 1:
            raise ValueError(f"tracking.log_every_steps must be >= 1, got {cfg.log_every_steps}")
        unknown = [b for b in cfg.log_with if b not in BACKENDS]
        if unknown:
            raise ValueError(
                f"tracking.log_with: unknown backend {unknown[0]!r} (known: {', '.join(BACKENDS)})"
            )
        if not main:
            return cls(run_dir, cfg, stage, None, [])
        metrics = MetricsLog(run_dir, resume_step, stage)
        run_name = cfg.run_name or f"{run_dir.resolve().name}-{stage}"
        trackers = []
        for backend in dict.fromkeys(cfg.log_with):  # once each, in order
            tracker = _make_tracker(backend, run_dir, cfg, run_name, resume_step, config)
            if tracker is not None:
                trackers.append(tracker)
        return cls(run_dir, cfg, stage, metrics, trackers)

    @property
    def enabled(self) -> bool:
        return self.metrics is not None

    @property
    def tensorboard_dir(self) -> Path | None:
        """Where the TensorBoard event files go (None when TensorBoard is not in use)."""
        if any(getattr(t, "name", "") == "tensorboard" for t in self.trackers):
            return self.run_dir / TENSORBOARD_DIR
        return None

    # ----------------------------------------------------------------------------------------
    def train_step(
        self,
        step: int,
        *,
        loss: Any,
        lr: Any = None,
        grad_norm: Any = None,
        samples: int = 0,
        tokens: int | Callable[[], int] = 0,
        last: bool = False,
        **extra: Any,
    ) -> None:
        """Count one optimizer step; log a training line every ``log_every_steps`` and at ``last``.

        ``loss``, ``grad_norm`` and ``extra`` may be tensors: they are read only on logged steps.
        ``samples`` / ``tokens`` are this step's global counts (for throughput). ``tokens`` may be a
        function where counting costs time (stage 1 tokenizes the step's texts again): it is
        called on logged steps only, and its count stands for every step of the window.
        """
        if not self.enabled:
            return
        self._window.samples += samples
        self._window.steps += 1
        if not callable(tokens):
            self._window.tokens += tokens
        if not (last or step % self.cfg.log_every_steps == 0):
            return
        if callable(tokens):
            self._window.tokens = tokens() * self._window.steps
        values: dict[str, Any] = {"loss": _number(loss), "lr": _number(lr), "grad_norm": _number(grad_norm)}
        values.update({k: _number(v) for k, v in extra.items()})
        values = {k: v for k, v in values.items() if v is not None}
        values.update(self._window.rates())
        values.update(peak_memory())
        self._emit(step, values, "train")
        self._window = _Window()

    def log(self, step: int, values: Mapping[str, Any], kind: str = "eval") -> None:
        """Log an evaluation (CRA, retrieval, held-out accuracy) at ``step``; nested dicts flatten."""
        if not self.enabled:
            return
        self._emit(step, values, kind)
        self._window = _Window()  # evaluation time is not training throughput

    def finish(self) -> None:
        """Close ``metrics.jsonl`` and end every tracker's run."""
        if not self.enabled:
            return
        for tracker in self.trackers:
            try:
                tracker.finish()
            except Exception as e:  # a tracker must never cost the finished run
                log.warning("tracker %s did not finish cleanly: %s", tracker.name, e)
        self.metrics.close()  # type: ignore[union-attr]

    # ----------------------------------------------------------------------------------------
    def _emit(self, step: int, values: Mapping[str, Any], kind: str) -> None:
        row = self.metrics.write(step, values, kind)  # type: ignore[union-attr]
        if row is None:
            return  # already recorded before a resume
        scalars = {
            f"{self.stage}/{k}" if kind == "train" else k: v
            for k, v in row.items()
            if k not in ("step", "kind", "stage", "time") and isinstance(v, (int, float)) and math.isfinite(v)
        }
        for tracker in list(self.trackers):
            try:
                tracker.log(scalars, step=step)
            except Exception as e:
                log.warning("tracker %s failed to log (%s); it is switched off for this run", tracker.name, e)
                self.trackers.remove(tracker)


def _make_tracker(
    backend: str,
    run_dir: Path,
    cfg: TrackingConfig,
    run_name: str,
    resume_step: int | None,
    config: Mapping[str, Any] | None,
) -> Any | None:
    """An accelerate tracker, started; None (with one line saying why) when it cannot be used."""
    if not backend_available(backend):
        log.warning(
            "tracking: %s is not installed (pip install %s); this run logs without it",
            backend, _PROBES[backend][1],
        )  # fmt: skip
        return None
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, TrackioTracker, WandBTracker

    try:
        if backend == "tensorboard":
            # purge_step hides the events a killed run wrote past its checkpoint.
            kwargs = {"purge_step": resume_step + 1} if resume_step else {}
            tracker: Any = TensorBoardTracker(TENSORBOARD_DIR, str(run_dir), **kwargs)
        elif backend == "wandb":
            tracker = WandBTracker(cfg.project, name=run_name, dir=str(run_dir))
        elif backend == "trackio":
            tracker = TrackioTracker(cfg.project, name=run_name)
        else:
            tracker = MLflowTracker(experiment_name=cfg.project, run_name=run_name)
        tracker.start()
        # TensorBoard's hparams would add a timestamped sub-run per (re)start; config.yaml holds it.
        if config is not None and backend != "tensorboard":
            tracker.store_init_configuration(flatten(config))
    except Exception as e:  # not logged in, no server...: the run goes on without this tracker
        log.warning(
            "tracking: %s could not start (%s); this run logs without it",
            backend,
            str(e).splitlines()[0] if str(e) else type(e).__name__,
        )
        return None
    return tracker
