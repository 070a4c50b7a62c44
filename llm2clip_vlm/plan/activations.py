"""Activation memory of a transformer stack in training: bytes that autograd keeps per token.

The model is Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models", section 4.1: ``s*b*h*(34 + 5*a*s/h)`` bytes per layer for GPT in 16-bit), re-derived
tensor by tensor for the blocks this package trains, because their terms differ from GPT's: no
dropout (CLIP, SigLIP, Llama train without it), SwiGLU MLPs, grouped K/V, RMSNorm that computes in
fp32, fused attention (sdpa/flash keeps Q, K, V, the output and a log-sum-exp instead of the
``a*s*s`` score matrices), and frozen weights. The last matters most: a linear layer whose weight
is frozen keeps nothing for its backward (the input gradient needs only the weight), so a LoRA
stage or a frozen LLM that only passes gradients through keeps far less than full training.

Per layer and token, with ``h`` the width, ``g`` the K/V width (GQA), ``f`` the MLP width, ``a``
the heads, ``e`` the bytes of the compute dtype and ``r`` those of the residual stream (4 when
fp32 master weights run under autocast, else ``e``):

- attention (sdpa): ``e*(2h + 2g)`` (Q, K, V after RoPE, output) ``+ 4a`` (fp32 log-sum-exp);
  eager attention adds the fp32 softmax and its cast: ``a*s*(4 + e)`` (``4*a*s`` in fp32);
- RMSNorm (Llama): ``4h`` (its fp32 input, kept by ``pow``/``mul``) ``+ r*h`` when its weight
  trains (the normalised input); LayerNorm (ViT): ``r*h`` (its input);
- the input of each group of linear layers that read the same tensor (QKV, the output
  projection, the MLP's first layer(s), its last): ``e*width`` when the weights train (once per
  layer of the group when the tensor is a norm's fp32 output under autocast: each linear keeps its
  own cast); ``0`` when frozen; with LoRA, ``(e + 1)*width`` per adapted layer when LoRA dropout is on (each adapter
  draws its own dropout output and bool mask) or ``e*width`` once when it is off;
- the MLP's activation: SwiGLU ``3*e*f`` (SiLU's input, its output and the up projection, kept by
  the product), GELU ``e*f``, quick-GELU ``2*e*f`` (its input and the sigmoid).

Check: a full-precision Llama layer trained in full gives ``9h + 2g + 4f`` fp32 elements, a CLIP
layer ``9h + 3f`` (``tests/test_plan_activations.py`` measures both against autograd's saved tensors
at three sizes). With per-layer gradient checkpointing a layer keeps only its input (``r*h``);
the backward recomputes one layer at a time, which adds one layer's activations at the peak.
Under autocast, fp32 master weights are also kept as 16-bit copies until the backward
(:func:`autocast_weight_bytes`). A causal LM's loss keeps the fp32 log-softmax of its logits
and, during its backward, their gradient and the logits themselves: ``(8 + e)*V`` bytes per token
(``V`` the vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Training = Literal["full", "frozen", "lora"]


@dataclass(frozen=True)
class Stack:
    """A transformer stack's shape, as the activation model needs it."""

    layers: int
    hidden: int
    kv_width: int
    ffn: int
    heads: int
    mlp: Literal["swiglu", "gelu", "quick_gelu"]
    norm: Literal["rms", "layer"]


@dataclass(frozen=True)
class Precision:
    """Bytes per element: ``compute`` (activations), ``residual`` (the residual stream) and
    ``mask`` (a dropout mask: CUDA's fused dropout keeps bool, the CPU's a float noise tensor)."""

    compute: int = 2
    residual: int = 2
    mask: int = 1


def _inputs(
    width: int, consumers: int, training: Training, lora_dropout: bool, p: Precision, from_norm: bool = False
) -> int:
    """Bytes per token kept for ``consumers`` linear layers reading one ``width``-wide tensor.

    ``from_norm``: the tensor is a norm's output, which is fp32 when fp32 weights run under autocast
    (``residual > compute``): autocast then casts it to the compute dtype once per consumer.
    """
    if training == "full":
        return p.compute * width * (consumers if from_norm and p.residual > p.compute else 1)
    if training == "lora":
        return consumers * (p.compute + p.mask) * width if lora_dropout else p.compute * width
    return 0


def layer_bytes_per_token(
    stack: Stack,
    seq_len: int,
    p: Precision,
    training: Training = "full",
    lora_dropout: bool = False,
    attention: str = "sdpa",
    lora_rank: int = 0,
) -> float:
    """Bytes one layer keeps for its backward, per token (see the module docstring)."""
    h, g, f, a, e, r = stack.hidden, stack.kv_width, stack.ffn, stack.heads, p.compute, p.residual
    trains = training == "full"
    attn = e * (2 * h + 2 * g) + 4 * a
    if attention == "eager":
        attn += a * seq_len * (4 + (e if e < 4 else 0))
    if stack.norm == "rms":
        norm = 4 * h + (r * h if trains else 0)
    else:
        norm = r * h
    act = {"swiglu": 3 * e * f, "gelu": e * f, "quick_gelu": 2 * e * f}[stack.mlp]
    first = 2 if stack.mlp == "swiglu" else 1  # gate + up read the same input
    lin = (
        _inputs(h, 3, training, lora_dropout, p, from_norm=True)  # q, k, v
        + _inputs(h, 1, training, lora_dropout, p)  # output projection
        + _inputs(h, first, training, lora_dropout, p, from_norm=True)  # MLP in
        + _inputs(f, 1, training, lora_dropout, p)  # MLP out
    )
    if training == "lora":
        lin += 7 * e * lora_rank  # each adapter's B keeps A's output (7 adapted projections)
    return 2 * norm + attn + act + lin


def norm_bytes_per_token(stack: Stack, p: Precision, training: Training = "full") -> float:
    """Bytes a norm outside the layers (a final RMSNorm, a ViT's pre-norm) keeps per token."""
    if stack.norm == "rms":
        return 4 * stack.hidden + (p.residual * stack.hidden if training == "full" else 0)
    return p.residual * stack.hidden


def kept_bytes(
    stack: Stack,
    sequences: int,
    seq_len: int,
    p: Precision,
    training: Training = "full",
    lora_dropout: bool = False,
    checkpointing: bool = False,
    attention: str = "sdpa",
    lora_rank: int = 0,
    outer_norms: int = 1,
) -> float:
    """Bytes kept at the end of the forward of ``sequences`` x ``seq_len`` tokens through the stack.

    Without checkpointing: every layer's activations; with it, every layer's input. Plus
    ``outer_norms`` norms outside the layers over every token (a decoder's final norm, a ViT's
    pre-norm); what comes after (a head, a loss) is the caller's.
    """
    tokens = sequences * seq_len
    outer = outer_norms * norm_bytes_per_token(stack, p, training) * tokens
    if checkpointing:
        return stack.layers * p.residual * stack.hidden * tokens + outer
    per_layer = layer_bytes_per_token(stack, seq_len, p, training, lora_dropout, attention, lora_rank)
    return stack.layers * per_layer * tokens + outer


def recompute_bytes(
    stack: Stack,
    sequences: int,
    seq_len: int,
    p: Precision,
    training: Training = "full",
    lora_dropout: bool = False,
    attention: str = "sdpa",
    lora_rank: int = 0,
) -> float:
    """With checkpointing, the backward recomputes one layer at a time: its activations for the
    ``sequences`` that one checkpointed call ran (a chunk, a micro-batch) come on top at the peak."""
    per_layer = layer_bytes_per_token(stack, seq_len, p, training, lora_dropout, attention, lora_rank)
    return per_layer * sequences * seq_len


def autocast_weight_bytes(trainable_params: int, p: Precision) -> float:
    """The 16-bit copies of fp32 trainable weights that autocast makes for the forward's matmuls
    and autograd keeps for the backward (when fp32 masters run under autocast)."""
    return float(p.compute * trainable_params) if p.residual > p.compute else 0.0


def lm_loss_bytes(tokens: int, vocab: int, p: Precision) -> float:
    """A causal LM loss's log-softmax (fp32) and, at its backward, the gradient and logits."""
    return float((8 + p.compute) * vocab * tokens)
