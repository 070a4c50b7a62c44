"""``bench stage1``: one supervised-SimCSE training step with LoRA (and QLoRA), the package's real step.

The step is the trainer's own :class:`~llm2clip_vlm.text.step.SimCSEStep` (what
:mod:`llm2clip_vlm.text.train` hands the loop), then what the loop does after it: the global batch of
:class:`~llm2clip_vlm.text.simcse.SimCSEBatches` (query with instruction, positive, hard negative
per image), :func:`~llm2clip_vlm.text.simcse.embed_triplets` (length-sorted chunks, mean pooling
over caption tokens), :class:`~llm2clip_vlm.training.losses.SupervisedSimCSELoss` (scale 50), backward,
grad clip, AdamW step, on a LoRA-wrapped bidirectional LLM (r16/alpha32 on all 7 projections,
:func:`~llm2clip_vlm.text.lora.wrap_lora`). ``qlora`` loads the same random weights 4-bit
(bitsandbytes NF4) through :func:`~llm2clip_vlm.text.modeling.load_bidirectional`; it is skipped,
with the reason in the results, where bitsandbytes cannot run on the device.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

import torch

from llm2clip_vlm.bench.common import (
    LLAMA3_8B,
    LLMShape,
    caption_tokenizer,
    count_params,
    demo_captions,
    fused_adamw_kwargs,
    llama_config,
    resolve_run,
    trainer_accelerator,
)
from llm2clip_vlm.bench.harness import (
    BenchReport,
    cpu_threads,
    device_name,
    measure,
    peak_mb,
)
from llm2clip_vlm.text.config import LoraConfig, Stage1Config
from llm2clip_vlm.text.lora import wrap_lora
from llm2clip_vlm.text.modeling import ModelRef, bidirectional_from_config, load_bidirectional
from llm2clip_vlm.text.pooling import tokenize
from llm2clip_vlm.text.simcse import SimCSEBatches
from llm2clip_vlm.text.step import SimCSEStep
from llm2clip_vlm.training.optim import DTYPES


@dataclass(frozen=True)
class Stage1Preset:
    """One benchmark set-up."""

    llm: LLMShape
    # Queries per step (each brings a positive and a hard negative: 3 sequences).
    batch_size: int
    max_length: int
    chunk_size: int
    # Base weight dtype and autocast precision ("fp32" = none).
    dtype: str
    precision: str
    gradient_checkpointing: bool
    device: str
    warmup: int
    repeats: int
    variants: tuple[str, ...] = ("lora", "qlora")
    full_vocab: bool = False
    pad_to_multiple_of: int = 16
    cpu_threads: int | None = None


PRESETS: dict[str, Stage1Preset] = {
    # The demo recipe's step (batch 8, max length 64, chunks of 8, fp32, no checkpointing) on a
    # 3.5M Llama. On the CPU, qlora runs bitsandbytes' CPU fallback (see docs/BENCHMARKS.md).
    "tiny": Stage1Preset(
        LLMShape(256, 896, 4, 4, 2, 0), 8, 64, 8, "fp32", "fp32", False, "cpu", 1, 3, cpu_threads=1
    ),
    # Llama-3-8B-Instruct's shape, bf16, gradient checkpointing, 32 queries (96 sequences) per step.
    "llama3-8b": Stage1Preset(LLAMA3_8B, 32, 512, 0, "bf16", "bf16", True, "cuda", 2, 5, full_vocab=True),
}


def step_tokens(tokenizer: Any, triplets: list[Any], s: Any) -> tuple[int, int]:
    """(real, computed) tokens of one step, chunked and padded exactly as ``embed_triplets`` does."""
    items = [(t.query, t.instruction) for t in triplets] + [(t.positive, None) for t in triplets]
    items += [(t.negative, None) for t in triplets if t.negative is not None]
    items.sort(key=lambda it: len(it[0]) + len(it[1] or ""))
    chunk = s.chunk_size or len(items)
    real = computed = 0
    for start in range(0, len(items), chunk):
        part = items[start : start + chunk]
        enc = tokenize(
            tokenizer, [t for t, _ in part], [i for _, i in part], s.max_length, s.pad_to_multiple_of
        )
        real += int(enc["attention_mask"].sum())
        computed += enc["input_ids"].numel()
    return real, computed


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

    s = Stage1Config(
        max_length=p.max_length,
        chunk_size=p.chunk_size,
        gradient_checkpointing=p.gradient_checkpointing,
        batch_size=p.batch_size,
        pad_to_multiple_of=p.pad_to_multiple_of,
    )
    instructions = {"short": s.instruction_short_query, "long": s.instruction_long_query}
    records = demo_captions(max(8 * p.batch_size, 64), seed=0)
    tokenizer = caption_tokenizer(records, extra=tuple(instructions.values()))
    batches = SimCSEBatches(records, instructions, seed=0)
    triplets = batches.batch(0, p.batch_size)
    config = llama_config(p.llm, None if p.full_vocab else len(tokenizer))
    # The trainer's accelerator (its autocast is the step's mixed precision).
    accelerator = trainer_accelerator(p.precision, dev)
    results: dict[str, Any] = {}

    def make_step(model: torch.nn.Module, cfg: Stage1Config) -> Any:
        peft_model = wrap_lora(model, cfg)
        peft_model.train()
        trainable = [q for q in peft_model.parameters() if q.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=cfg.lr, **fused_adamw_kwargs(dev))
        results.setdefault("lora_trainable_params", sum(q.numel() for q in trainable))
        constant = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)  # the step shows the lr
        real = SimCSEStep(accelerator, peft_model, tokenizer, cfg, constant)

        def step() -> None:
            real(triplets)
            torch.nn.utils.clip_grad_norm_(trainable, cfg.loop.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    with cpu_threads(p.cpu_threads, dev), tempfile.TemporaryDirectory(prefix="bench-stage1-") as tmp:
        torch.manual_seed(0)
        base = bidirectional_from_config(config, dtype=DTYPES[p.dtype], device=dev)
        results["llm_params"] = count_params(base)
        steps: dict[str, Any] = {}
        if "qlora" in p.variants:
            qlora = _quantized_copy(base, tmp, p, dev)
            if isinstance(qlora, str):
                results["qlora_skipped"] = qlora
            else:
                steps["qlora"] = make_step(
                    qlora, dataclasses.replace(s, lora=LoraConfig(quantization="4bit"))
                )
        if "lora" in p.variants:
            steps = {"lora": make_step(base, s), **steps}
        timings = measure(
            steps, device=dev, warmup=warmup, repeats=repeats, items_per_call=p.batch_size,
            description=f"bench stage1 [{preset}]",
        )  # fmt: skip
        dev_name = device_name(dev)

    real, computed = step_tokens(tokenizer, triplets, s)
    variants = {
        t.name: {
            "samples_per_s": round(t.items_per_s, 3),
            "tokens_per_s": round(real / t.median_s, 1),
            "computed_tokens_per_s": round(computed / t.median_s, 1),
            "peak_mem_mb": peak_mb(t),
            "median_ms": round(1e3 * t.median_s, 1),
        }
        for t in timings
    }
    results.update(
        {
            "sequences_per_step": 3 * p.batch_size,
            "real_tokens_per_step": real,
            "computed_tokens_per_step": computed,
        }
    )
    settings = {**asdict(p), "warmup": warmup, "repeats": repeats, "device": str(dev)}
    return BenchReport(
        suite="stage1",
        preset=preset,
        device=dev_name,
        settings=settings,
        timings=timings,
        results=results,
        variants=variants,
        memory_note="" if dev.type == "cuda" else "CPU peak = process peak RSS during one step",
    )


def _quantized_copy(base: torch.nn.Module, tmp: str, p: Stage1Preset, dev: torch.device) -> Any:
    """The same weights loaded 4-bit (NF4) via the package's loader, or why that is not possible."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:  # pragma: no cover - bitsandbytes is a dependency
        return f"bitsandbytes is not importable: {e}"
    base.save_pretrained(tmp)
    try:
        model = load_bidirectional(
            ModelRef(tmp), dtype=DTYPES[p.dtype], quantization="4bit", device_map={"": dev}
        )
        with torch.no_grad():  # one forward proves the 4-bit kernels run on this device
            model(input_ids=torch.ones(1, 4, dtype=torch.long, device=dev))
    except Exception as e:  # noqa: BLE001 - any failure means "not on this device"; say which
        return f"4-bit bitsandbytes does not run on {dev}: {type(e).__name__}: {e}"
    return model
