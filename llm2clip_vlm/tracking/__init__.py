"""Experiment tracking: ``metrics.jsonl`` in every run directory, plus accelerate's trackers.

A trainer makes three calls (see :class:`~llm2clip_vlm.tracking.tracker.RunTracker`)::

    tracker = RunTracker.start(out, cfg.tracking, stage="stage2", main=main, resume_step=state.step,
                               config=configuration.to_dict(cfg))
    tracker.train_step(step, loss=..., lr=..., grad_norm=..., samples=..., tokens=...)  # every step
    tracker.log(step, {"retrieval": ...}, kind="eval")                                 # evaluations
    tracker.finish()

``metrics.jsonl`` is the single source the ``report`` command reads; TensorBoard (default), W&B,
trackio and MLflow receive the same scalars through accelerate's tracker classes.
"""

from llm2clip_vlm.tracking.config import TrackingConfig

__all__ = ["TrackingConfig"]
