"""Model FLOPs of a transformer pass, and the dense bf16 peaks of GPUs by name.

FLOPs of one forward pass over a sequence of ``T`` tokens (multiply-add = 2 FLOPs):

    2 * P * T            every non-embedding weight is used once per token
  + 4 * L * d * T**2     attention scores (Q K^T) and weighted values (A V), bidirectional

with ``P`` the non-embedding parameters, ``L`` the layers and ``d`` the attention width
(heads x head_dim). A causal model computes the same with sdpa/flash kernels that skip the upper
triangle only partly; the plan counts the full square (an upper bound on the attention term).
A training step costs the forward, plus twice it for a backward through trainable weights, or
once it for a backward that only passes gradients through frozen weights (LoRA, a frozen LLM):
"model FLOPs" (recomputation by gradient checkpointing is not counted), as MFU is defined.
"""

from __future__ import annotations

# Dense bf16 peak (tensor cores, no sparsity), in FLOP/s, by device-name fragment. The first
# fragment found in the name wins, so the more specific ones come first.
BF16_PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM (HBM3)
    ("H200", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("A6000", 155e12),
    ("A10", 125e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
)


def bf16_peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by its name (``torch.cuda.get_device_name``), None if unknown."""
    for fragment, peak in BF16_PEAK_FLOPS:
        if fragment.lower() in device_name.lower():
            return peak
    return None


def encoder_flops(non_embedding_params: int, layers: int, attn_dim: int, seq_len: int) -> float:
    """FLOPs of one forward pass over one sequence of ``seq_len`` tokens (see the module docstring)."""
    return 2.0 * non_embedding_params * seq_len + 4.0 * layers * attn_dim * seq_len**2
