"""``plan``'s activation model against what autograd really keeps, at three small sizes each.

Measured: the bytes of every tensor autograd saves for the backward during one training forward
(``torch.autograd.graph.saved_tensors_hooks``, each storage once, the parameters left out: they
are counted as weights), on the CPU in fp32. Predicted: :func:`llm2clip_vlm.plan.activations.kept_bytes`
with 4-byte elements (and, on the CPU, 4-byte dropout masks: the CPU's dropout keeps a float noise
tensor where CUDA keeps a bool mask). The models are the package's own: the bidirectional decoder,
its LoRA wrapping, transformers' CLIP vision tower. docs/BENCHMARKS.md lists the errors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig

from llm2clip_vlm.plan.activations import Precision, autocast_weight_bytes, kept_bytes
from llm2clip_vlm.plan.stages import llm_stack, vit_stack
from llm2clip_vlm.text.config import LoraConfig, Stage1Config
from llm2clip_vlm.text.lora import wrap_lora
from llm2clip_vlm.text.modeling import bidirectional_from_config

FP32_CPU = Precision(compute=4, residual=4, mask=4)
TOLERANCE = 0.25
# (hidden, ffn, layers, heads, kv heads, sequences, length): three sizes of a Llama decoder.
LLAMA_SIZES = [(64, 172, 2, 4, 2, 2, 32), (128, 344, 3, 4, 2, 4, 64), (256, 688, 2, 8, 4, 2, 128)]
# (hidden, layers, heads, image, patch, images): three CLIP vision towers.
VIT_SIZES = [(64, 2, 4, 32, 8, 4), (128, 3, 4, 64, 8, 2), (192, 2, 6, 64, 16, 8)]


def saved_bytes(model: torch.nn.Module, forward: Callable[[], Any]) -> int:
    """Bytes of the tensors autograd saves during ``forward()``, each storage once, no parameters."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(seen.values())


def llama(hidden: int, ffn: int, layers: int, heads: int, kv: int) -> tuple[torch.nn.Module, Any]:
    cfg = LlamaConfig(
        hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, vocab_size=500, max_position_embeddings=512,
    )  # fmt: skip
    torch.manual_seed(0)
    return bidirectional_from_config(cfg).train(), cfg


def check(measured: int, predicted: float) -> None:
    assert abs(predicted / measured - 1) <= TOLERANCE, f"predicted {predicted:.0f} B, measured {measured} B"


@pytest.mark.parametrize("size", LLAMA_SIZES)
def test_llama_full_training(size: tuple[int, ...]) -> None:
    h, f, layers, heads, kv, b, s = size
    model, cfg = llama(h, f, layers, heads, kv)
    ids = torch.randint(0, 500, (b, s))
    got = saved_bytes(model, lambda: model(input_ids=ids).last_hidden_state)
    check(got, kept_bytes(llm_stack(cfg), b, s, FP32_CPU, training="full"))


@pytest.mark.parametrize(
    ("size", "dropout", "checkpointing"),
    [(s, 0.05, False) for s in LLAMA_SIZES]
    + [(s, 0.05, True) for s in LLAMA_SIZES]
    + [(LLAMA_SIZES[1], 0.0, False)],
)
def test_llama_lora_as_stage1_wraps_it(size: tuple[int, ...], dropout: float, checkpointing: bool) -> None:
    h, f, layers, heads, kv, b, s = size
    base, cfg = llama(h, f, layers, heads, kv)
    s1 = Stage1Config(gradient_checkpointing=checkpointing, lora=LoraConfig(r=16, dropout=dropout))
    model = wrap_lora(base, s1).train()
    ids = torch.randint(0, 500, (b, s))
    got = saved_bytes(model, lambda: model(input_ids=ids).last_hidden_state)
    predicted = kept_bytes(
        llm_stack(cfg), b, s, FP32_CPU, training="lora", lora_dropout=dropout > 0, lora_rank=16,
        checkpointing=checkpointing,
    )  # fmt: skip
    check(got, predicted)


@pytest.mark.parametrize("size", LLAMA_SIZES)
def test_frozen_llm_passing_gradients_as_llava_pretraining(size: tuple[int, ...]) -> None:
    h, f, layers, heads, kv, b, s = size
    model, cfg = llama(h, f, layers, heads, kv)
    model.requires_grad_(False)
    # The projector's output: image positions that need a gradient, through a frozen LLM.
    embeds = torch.randn(b, s, h, requires_grad=True)
    got = saved_bytes(model, lambda: model(inputs_embeds=embeds).last_hidden_state)
    check(got, kept_bytes(llm_stack(cfg), b, s, FP32_CPU, training="frozen"))


@pytest.mark.parametrize("size", VIT_SIZES)
def test_clip_vision_tower_full_training(size: tuple[int, ...]) -> None:
    h, layers, heads, image, patch, b = size
    cfg = CLIPVisionConfig(
        hidden_size=h, intermediate_size=4 * h, num_hidden_layers=layers, num_attention_heads=heads,
        image_size=image, patch_size=patch,
    )  # fmt: skip
    torch.manual_seed(0)
    model = CLIPVisionModel(cfg).train()
    x = torch.randn(b, 3, image, image)
    got = saved_bytes(model, lambda: model(pixel_values=x).pooler_output)
    tokens = (image // patch) ** 2 + 1
    check(got, kept_bytes(vit_stack(model), b, tokens, FP32_CPU, training="full"))


# Mixed precision as the GPU recipes run it, on the CPU's bf16: stage 1's bf16 base with fp32 LoRA
# adapters under autocast (peft casts the adapters' input to fp32, so the CPU's dropout noise is
# fp32: 4-byte masks here, bool on CUDA), stage 2's fp32 ViT under autocast (fp32 residual stream,
# a 16-bit cast of a norm's output per linear layer, 16-bit copies of the weights).
BF16_CPU_LORA = Precision(compute=2, residual=2, mask=4)
AUTOCAST_CPU = Precision(compute=2, residual=4, mask=2)


@pytest.mark.parametrize("size", LLAMA_SIZES)
def test_bf16_lora_under_autocast_as_stage1_on_a_gpu(size: tuple[int, ...]) -> None:
    h, f, layers, heads, kv, b, s = size
    base, cfg = llama(h, f, layers, heads, kv)
    model = wrap_lora(base.to(torch.bfloat16), Stage1Config(gradient_checkpointing=False)).train()
    ids = torch.randint(0, 500, (b, s))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = saved_bytes(model, lambda: model(input_ids=ids).last_hidden_state)
    check(
        got, kept_bytes(llm_stack(cfg), b, s, BF16_CPU_LORA, training="lora", lora_dropout=True, lora_rank=16)
    )


@pytest.mark.parametrize("size", VIT_SIZES)
def test_fp32_vit_under_autocast_as_stage2_on_a_gpu(size: tuple[int, ...]) -> None:
    h, layers, heads, image, patch, b = size
    cfg = CLIPVisionConfig(
        hidden_size=h, intermediate_size=4 * h, num_hidden_layers=layers, num_attention_heads=heads,
        image_size=image, patch_size=patch,
    )  # fmt: skip
    torch.manual_seed(0)
    model = CLIPVisionModel(cfg).train()
    x = torch.randn(b, 3, image, image)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = saved_bytes(model, lambda: model(pixel_values=x).pooler_output)
    tokens = (image // patch) ** 2 + 1
    matmul_weights = sum(
        p.numel() for n, p in model.named_parameters() if p.dim() > 1 and "position" not in n
    )
    predicted = kept_bytes(vit_stack(model), b, tokens, AUTOCAST_CPU, training="full")
    check(got, predicted + autocast_weight_bytes(matmul_weights, AUTOCAST_CPU))


def test_a_gpt_layer_is_korthikantis_34_sbh() -> None:
    # A GPT layer (LayerNorm, GELU MLP of 4h, no GQA) in 16-bit, trained in full. Korthikanti et
    # al. 2022 (section 4.1): 34*s*b*h + 5*a*s^2*b bytes. With sdpa the 5*a*s^2*b term is gone
    # (only a fp32 log-sum-exp per head and token, 4*a), and 34 stays 34: the two dropout masks
    # their count has (2*sbh) are absent here, and the attention output that sdpa keeps for its
    # backward (2*sbh) is present.
    from llm2clip_vlm.plan.activations import Stack, layer_bytes_per_token

    h, a, s = 1024, 16, 512
    gpt = Stack(1, h, h, 4 * h, a, "gelu", "layer")
    bf16 = Precision(2, 2, 1)
    assert layer_bytes_per_token(gpt, s, bf16) == 34 * h + 4 * a
    # Eager attention keeps the softmax: fp32 (transformers upcasts it) and its 16-bit cast.
    assert layer_bytes_per_token(gpt, s, bf16, attention="eager") == 34 * h + 4 * a + 6 * a * s
