"""The ``tracking`` config section: where a run's scalars go, and how often."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from llm2clip_vlm.config_io import SIZE, Range

# Backends accelerate knows under these names (accelerate.tracking.LOGGER_TYPE_TO_CLASS).
BACKENDS = ("tensorboard", "wandb", "trackio", "mlflow")
Backend = Literal["tensorboard", "wandb", "trackio", "mlflow"]


@dataclass
class TrackingConfig:
    """Experiment trackers. Changes what is recorded, never what is trained (no stage
    fingerprint includes this section).

    ``metrics.jsonl`` is always written in the run directory; ``log_with`` adds trackers fed with
    the same scalars. A backend that is not installed gets a one-line message and is left out.
    """

    # Any of tensorboard (event files in RUN/tensorboard, offline), wandb, trackio, mlflow; [] = none.
    log_with: list[Backend] = field(default_factory=lambda: ["tensorboard"])
    # Training scalars every N optimizer steps (and always at the last step); evaluations always.
    log_every_steps: int = 10
    # Project / experiment name for wandb, trackio and mlflow.
    project: str = "llm2clip-vlm"
    # Run name shown by the trackers; "" = the run directory's name (plus the stage).
    run_name: str = ""

    # Accepted values, checked when a recipe is read (llm2clip_vlm.config_io.Range).
    RANGES: ClassVar[dict[str, Range]] = {
        "log_every_steps": SIZE,
    }
