"""Config section shared by every trainer: what to do with non-finite steps and pickle weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from llm2clip_vlm.config_io import COUNT, Range


@dataclass
class ReliabilityConfig:
    # A NaN/inf loss or gradient norm: False = stop with a message naming the step;
    # True = skip the step (no update) and go on, but stop after ``max_skipped_steps`` of them.
    skip_nonfinite_steps: bool = False
    max_skipped_steps: int = 100
    # Accept pickled weights (pytorch_model.bin, .pt): loading a pickle can run code, so it is
    # refused unless set (even then only through torch.load(weights_only=True)).
    allow_pickle_weights: bool = False
    # How ``build-tower`` identifies its input files (data, weights) to decide whether a stage's
    # artifact is still valid: "sampled" = size, mtime and three sampled 64 KiB blocks per file
    # (cheap); "full" = the whole content's sha256 (exact; reads everything once per run).
    input_identity: Literal["sampled", "full"] = "sampled"

    # Accepted values, checked when a recipe is read (llm2clip_vlm.config_io.Range).
    RANGES: ClassVar[dict[str, Range]] = {
        "max_skipped_steps": COUNT,
    }
