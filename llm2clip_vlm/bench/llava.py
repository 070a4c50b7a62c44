"""``bench llava``: one LLaVA-1.5 training step of a transformers ``LlavaForConditionalGeneration``.

Variants (each its own model, measured one after the other so a 7B model is resident once):

- ``pretrain``: projector pretraining: tower and LLM frozen, only the ``mlp2x_gelu`` projector
  trains (gradients still flow back through the whole LLM to the image positions);
- ``finetune-full``: instruction tuning of projector + LLM (tower frozen);
- ``finetune-lora``: projector + LoRA r128/alpha256 on the LLM's 7 projections (LLaVA-1.5's LoRA).

The ``tiny`` preset assembles the model with :func:`llm2clip_vlm.llava.assemble.build_llava_model`
from a random tower and a random LLM saved to a temporary directory (the real path); the
``vicuna-7b`` preset builds LLaVA-1.5-7B's shape (CLIP ViT-L/14-336 + Vicuna-7B) from configs
directly on the GPU (random weights, nothing saved). A batch is ``image_seq_length`` image
positions followed by text tokens, ``seq_len`` in all, loss on the text.

The step is the trainer's own :class:`~llm2clip_vlm.llava.step.LlavaStep` (token-mean loss over the
supervised tokens, only those positions through the LM head), followed by what the loop does after
it (clip, update): a change to LLaVA's step moves these numbers.
"""

from __future__ import annotations

import gc
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from llm2clip_vlm.bench.common import (
    VICUNA_7B,
    LLMShape,
    count_params,
    fused_adamw_kwargs,
    llama_config,
    resolve_run,
    trainer_accelerator,
)
from llm2clip_vlm.bench.harness import BenchReport, cpu_threads, device_name, measure, peak_mb
from llm2clip_vlm.llava.assemble import build_llava_model
from llm2clip_vlm.llava.data import Batch
from llm2clip_vlm.llava.step import LlavaStep
from llm2clip_vlm.text.tiny import save_tiny_llm
from llm2clip_vlm.tower.synthetic import VIT_L_14_336, TowerShape, save_random_tower
from llm2clip_vlm.training.optim import DTYPES

VARIANTS = ("pretrain", "finetune-full", "finetune-lora")
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass(frozen=True)
class LlavaPreset:
    """One benchmark set-up."""

    tower: TowerShape
    llm: LLMShape
    seq_len: int
    batch_size: int
    # Weight dtype; "bf16" also runs under bf16 autocast.
    dtype: str
    gradient_checkpointing: bool
    device: str
    warmup: int
    repeats: int
    # "saved": tiny models saved and assembled by build_llava_model; "config": built on the device.
    build: str = "saved"
    lora_r: int = 128
    lora_alpha: int = 256
    cpu_threads: int | None = None


PRESETS: dict[str, LlavaPreset] = {
    # 64 px / 8 -> 64 image tokens (CLS dropped) + 64 text tokens, on a 2-layer 64-d Llama.
    "tiny": LlavaPreset(
        TowerShape(64, 8, 64, 2, 2, 256),
        LLMShape(64, 128, 2, 4, 2, 0),
        128,
        4,
        "fp32",
        False,
        "cpu",
        1,
        3,
        cpu_threads=1,
    ),  # fmt: skip
    # LLaVA-1.5-7B: ViT-L/14-336 (576 image tokens) + Vicuna-7B, bf16, checkpointing, 2048 tokens.
    "vicuna-7b": LlavaPreset(VIT_L_14_336, VICUNA_7B, 2048, 4, "bf16", True, "cuda", 2, 5, build="config"),
}


def _tiny_builder(p: LlavaPreset, tmp: Path) -> Callable[[], Any]:
    tower = save_random_tower(tmp / "tower", "clip", p.tower, seed=0)
    llm = save_tiny_llm(tmp / "llm", hidden_size=p.llm.hidden_size, layers=p.llm.num_layers)
    return lambda: build_llava_model(tower, llm, dtype=DTYPES[p.dtype])[0]


def _config_builder(p: LlavaPreset, dev: torch.device) -> Callable[[], Any]:
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    t = p.tower
    vision = CLIPVisionConfig(
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        image_size=t.image_size,
        patch_size=t.patch_size,
    )
    text = llama_config(p.llm, vocab_size=p.llm.vocab_size + 64)  # + <image>, padded as LLaVA-HF
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=p.llm.vocab_size,
        image_seq_length=(t.image_size // t.patch_size) ** 2,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        multimodal_projector_bias=True,
    )

    def build() -> Any:
        with torch.device(dev):
            return LlavaForConditionalGeneration._from_config(config, dtype=DTYPES[p.dtype])

    return build


def _prepare(model: Any, variant: str, p: LlavaPreset) -> Any:
    """Freeze/unfreeze (and LoRA-wrap) ``model`` for ``variant``; return the model to call."""
    model.requires_grad_(False)
    projector = model.model.multi_modal_projector
    if variant == "finetune-full":
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    if variant == "finetune-lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=p.lora_r, lora_alpha=p.lora_alpha, lora_dropout=0.05, target_modules=LORA_TARGETS)
        model = get_peft_model(model, lora)
    projector.requires_grad_(True)
    if p.gradient_checkpointing:
        # Non-reentrant: text embeddings of a frozen LLM carry no grad, which it handles.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def _batch(model: Any, p: LlavaPreset, dev: torch.device) -> Batch:
    cfg = model.config
    n_img = cfg.image_seq_length
    if p.seq_len <= n_img + 1:
        raise ValueError(f"seq_len {p.seq_len} leaves no text after {n_img} image tokens")
    g = torch.Generator().manual_seed(0)
    vocab = cfg.text_config.vocab_size
    ids = torch.randint(2, min(vocab, cfg.image_token_index), (p.batch_size, p.seq_len), generator=g)
    ids[:, 0] = 1 if cfg.text_config.bos_token_id is None else cfg.text_config.bos_token_id
    ids[:, 1 : 1 + n_img] = cfg.image_token_index
    labels = ids.clone()
    labels[:, : 1 + n_img] = -100  # loss on the text only
    s = cfg.vision_config.image_size
    pixels = torch.randn(p.batch_size, 3, s, s, generator=g).to(dev, DTYPES[p.dtype])
    rows = torch.ones(p.batch_size, dtype=torch.long)
    return Batch(ids.to(dev), torch.ones_like(ids).to(dev), labels.to(dev), pixels, rows)


def run(
    preset: str,
    *,
    device: str | None = None,
    warmup: int | None = None,
    repeats: int | None = None,
) -> BenchReport:
    """Measure preset ``preset``; ``device``/``warmup``/``repeats`` override the preset's.

    Raises:
        RuntimeError: a CUDA device was asked for and there is none.
    """
    p = PRESETS[preset]
    dev, warmup, repeats = resolve_run(preset, p, device, warmup, repeats)
    # The trainer's accelerator (its autocast is the step's mixed precision).
    accelerator = trainer_accelerator("bf16" if p.dtype != "fp32" else "fp32", dev)
    timings = []
    results: dict[str, Any] = {}
    with cpu_threads(p.cpu_threads, dev), tempfile.TemporaryDirectory(prefix="bench-llava-") as tmp:
        build = _tiny_builder(p, Path(tmp)) if p.build == "saved" else _config_builder(p, dev)
        for variant in VARIANTS:
            model = build().to(dev)
            results.setdefault("tower_params", count_params(model.model.vision_tower))
            results.setdefault(
                "llm_params", count_params(model.model.language_model) + count_params(model.lm_head)
            )
            results.setdefault("projector_params", count_params(model.model.multi_modal_projector))
            results.setdefault("image_tokens", model.config.image_seq_length)
            model = _prepare(model, variant, p)
            trainable = [q for q in model.parameters() if q.requires_grad]
            results[f"{variant}_trainable_params"] = sum(q.numel() for q in trainable)
            opt = torch.optim.AdamW(trainable, lr=2e-5, weight_decay=0.0, **fused_adamw_kwargs(dev))
            batch = _batch(model, p, dev)

            # The whole batch is one micro batch; no DeepSpeed, no FSDP2.
            real = LlavaStep(accelerator, model, p.batch_size, False, {})

            def step(
                real: Any = real, opt: Any = opt, trainable: Any = trainable, batch: Any = batch
            ) -> None:
                real(batch)
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)

            timings += measure(
                {variant: step}, device=dev, warmup=warmup, repeats=repeats, items_per_call=p.batch_size,
                description=f"bench llava [{preset}] {variant}",
            )  # fmt: skip
            del model, opt, trainable, batch, step, real
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        dev_name = device_name(dev)
    variants = {
        t.name: {
            "samples_per_s": round(t.items_per_s, 3),
            "tokens_per_s": round(t.items_per_s * p.seq_len, 1),
            "peak_mem_mb": peak_mb(t),
            "median_ms": round(1e3 * t.median_s, 1),
        }
        for t in timings
    }
    settings = {**asdict(p), "warmup": warmup, "repeats": repeats, "device": str(dev)}
    return BenchReport(
        suite="llava",
        preset=preset,
        device=dev_name,
        settings=settings,
        timings=timings,
        results=results,
        variants=variants,
        memory_note="" if dev.type == "cuda" else "CPU peak = process peak RSS during one step",
    )
