"""Model FLOPs of a transformer encoder pass and the share of a GPU's bf16 peak they reach.

FLOPs of one forward pass over a sequence of ``T`` tokens (multiply-add = 2 FLOPs):

    2 * P * T            every non-embedding weight is used once per token
  + 4 * L * d * T**2     attention scores (Q K^T) and weighted values (A V), bidirectional

with ``P`` the non-embedding parameters, ``L`` the layers and ``d`` the attention width
(heads x head_dim). "Model FLOPs" count the real tokens only (padding is wasted work), so the
peak share is comparable to the usual MFU; "hardware FLOPs" count every computed token.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

# The formula and the peak table live with ``plan``, which predicts what these benchmarks measure.
from llm2clip_vlm.plan.flops import BF16_PEAK_FLOPS, bf16_peak_flops, encoder_flops

__all__ = ["BF16_PEAK_FLOPS", "batches_flops", "bf16_peak_flops", "encoder_flops", "peak_share"]


def batches_flops(
    non_embedding_params: int, layers: int, attn_dim: int, batches: Iterable[Sequence[int]]
) -> float:
    """FLOPs of forward passes over ``batches``, each a list of sequence lengths."""
    return sum(encoder_flops(non_embedding_params, layers, attn_dim, t) for b in batches for t in b)


def peak_share(flops: float, seconds: float, peak_flops: float | None) -> float | None:
    """``flops / seconds / peak`` (None when the peak is unknown)."""
    if peak_flops is None or seconds <= 0:
        return None
    return flops / seconds / peak_flops
