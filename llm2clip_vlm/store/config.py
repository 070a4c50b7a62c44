"""Config section of the caption embedding store (``llm2clip-vlm embed``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from llm2clip_vlm.config_io import COUNT, SIZE, Range


@dataclass
class EmbedConfig:
    # Stage-1 embedder directory; empty = the stage-1 output of this run.
    encoder: str = ""
    dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    batch_size: int = 64
    # Rows per shard; a killed run restarts at the last complete shard.
    shard_size: int = 4096
    # Sort captions by token length so batches carry little padding.
    bucket_by_length: bool = True
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    # Embed (and train stage 2 on) at most this many captions of each kind per *training* image,
    # the first ones (0 = all). Held-out sets are always embedded whole. Where the LLM pass is
    # the bottleneck (a CPU), more images with fewer captions each is the better trade.
    train_captions_per_kind: int = 0
    # Pad every length-sorted batch up to a multiple of this many tokens; 0 = as the encoder's
    # stage 1 padded (recorded in it), 1 = only to the batch's longest caption. Padding is masked
    # out of every embedding, so this changes only float rounding and the time: on a CPU in fp32
    # rounding up to 8 or 16 only adds tokens to compute (GPU tensor cores like multiples of 8).
    pad_to_multiple_of: int = 0

    # Accepted values, checked when a recipe is read (llm2clip_vlm.config_io.Range).
    RANGES: ClassVar[dict[str, Range]] = {
        "batch_size": SIZE,
        "shard_size": SIZE,
        "train_captions_per_kind": COUNT,
        "pad_to_multiple_of": COUNT,
    }
