"""``bench stage2``: one stage-2 training step, three ways of providing the text side.

Same device, same vision model (a fresh :class:`~llm2clip_vlm.vision.model.LLM2CLIP` per variant,
same seed), same global batch of images and captions, same loss (:class:`~llm2clip_vlm.training.losses.ClipLoss`),
same optimiser (AdamW with the stage-2 parameter groups), grad clip and logit-scale clamp:

- ``offline``: caption embeddings precomputed (as read from the store), moved to the device;
- ``online``: the frozen stage-1 LLM embeds the batch's captions inside the step, under no_grad
  (tokenize, forward, mean pooling over caption tokens: :class:`~llm2clip_vlm.text.encoder.CaptionEncoder`);
- ``lora``: the LLM with LoRA (r16/alpha32 on all 7 projections, as stage 1) trained in the loop,
  gradients through it: the baseline the paper compares with.

Every variant's image side is the trainer's own step, :meth:`Stage2Step.forward_backward
<llm2clip_vlm.vision.step.Stage2Step.forward_backward>` (forward, loss, backward), followed by what
the loop does after it (clip, update, clamp): a change to stage 2's step moves these numbers.

Targets on the tiny preset: offline >= 4x the samples/s of lora and >= 3x online.
What the ratios depend on: the LLM's forward FLOPs per sample against the ViT's (``flops_ratio``
in the results; see docs/BENCHMARKS.md).
"""

from __future__ import annotations

import random
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
    non_embedding_params,
    resolve_run,
    trainer_accelerator,
)
from llm2clip_vlm.bench.flops import encoder_flops
from llm2clip_vlm.bench.harness import (
    BenchReport,
    cpu_threads,
    device_name,
    measure,
    paired_ratio,
    peak_mb,
)
from llm2clip_vlm.text.config import Stage1Config
from llm2clip_vlm.text.encoder import CaptionEncoder
from llm2clip_vlm.text.lora import wrap_lora
from llm2clip_vlm.text.modeling import bidirectional_from_config
from llm2clip_vlm.training.optim import DTYPES
from llm2clip_vlm.vision.config import Stage2Config, VisionBackboneConfig
from llm2clip_vlm.vision.model import LLM2CLIP, LLM2CLIPConfig
from llm2clip_vlm.vision.step import Stage2Step
from llm2clip_vlm.vision.train import build_param_groups

TARGET_VS_LORA = 4.0
TARGET_VS_ONLINE = 3.0
VARIANTS = ("offline", "online", "lora")


@dataclass(frozen=True)
class ViTShape:
    """A CLIP vision encoder's sizes (intermediate = 4 x hidden, as ViT-B/L)."""

    image_size: int
    patch_size: int
    hidden_size: int
    num_layers: int
    num_heads: int

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1  # patches + CLS


VIT_L_14_336 = ViTShape(336, 14, 1024, 24, 16)


@dataclass(frozen=True)
class Stage2Preset:
    """One benchmark set-up."""

    vit: ViTShape
    llm: LLMShape
    batch_size: int
    embed_dim: int
    # LLM weight dtype; "bf16" also runs the step under bf16 autocast (the stage-2 mixed precision).
    dtype: str
    gradient_checkpointing: bool
    device: str
    warmup: int
    repeats: int
    full_vocab: bool = False
    # Batch lengths rounded up to this multiple (the stage-1 default is 16; see bench embed).
    pad_to_multiple_of: int = 1
    cpu_threads: int | None = None
    long_caption_ratio: float = 0.5


PRESETS: dict[str, Stage2Preset] = {
    # The real pair's proportion: Llama-3-8B has ~25x the non-embedding parameters of ViT-L/14
    # (7.5B vs 0.30B); here a 19.4M-parameter Llama (384-d, 10 layers) against a 0.8M ViT
    # (128-d, 4 layers, 64 px / 8 = 65 tokens, like the demo recipe's image size). No gradient
    # checkpointing on the CPU (it would only slow lora down further).
    "tiny": Stage2Preset(
        ViTShape(64, 8, 128, 4, 4),
        LLMShape(384, 1344, 10, 6, 2, 0),
        32,
        256,
        "fp32",
        False,
        "cpu",
        1,
        3,
        cpu_threads=1,
    ),  # fmt: skip
    # The same pair at ViT-L/14-336's image-token count (192 px / 8 = 577 tokens): the LLM's
    # share of a step's FLOPs is then the reference pair's on the same captions (flops_ratio ~1).
    "tiny-577": Stage2Preset(
        ViTShape(192, 8, 128, 4, 4),
        LLMShape(384, 1344, 10, 6, 2, 0),
        32,
        256,
        "fp32",
        False,
        "cpu",
        1,
        3,
        cpu_threads=1,
    ),  # fmt: skip
    # The GPU proof's dry run (scripts/gpu-proof.sh --dry-run): every variant, smallest sizes.
    "dry": Stage2Preset(
        ViTShape(32, 8, 32, 2, 2),
        LLMShape(64, 128, 2, 4, 2, 0),
        8,
        16,
        "fp32",
        False,
        "cpu",
        0,
        1,
        cpu_threads=1,
    ),  # fmt: skip
    # Reference: CLIP ViT-L/14-336 + Llama-3-8B-Instruct, bf16, gradient checkpointing, batch 64.
    "vit-l-336-llama3-8b": Stage2Preset(
        VIT_L_14_336, LLAMA3_8B, 64, 1280, "bf16", True, "cuda", 2, 5, full_vocab=True
    ),
}


def _batch_captions(n: int, long_ratio: float, seed: int = 0) -> list[str]:
    """``n`` captions of ``n`` demo images, each long with probability ``long_ratio`` (as stage 2 draws)."""
    rng = random.Random(seed)
    out = []
    for r in demo_captions(n, seed=seed):
        kind = "long" if rng.random() < long_ratio else "short"
        out.append(rng.choice([c.text for c in r.captions if c.kind == kind]))
    return out


def _make_clip(p: Stage2Preset, dev: torch.device) -> Any:
    backbone = VisionBackboneConfig(
        kind="clip",
        image_size=p.vit.image_size,
        patch_size=p.vit.patch_size,
        hidden_size=p.vit.hidden_size,
        num_layers=p.vit.num_layers,
        num_heads=p.vit.num_heads,
    )
    s = Stage2Config(backbone=backbone, embed_dim=p.embed_dim)
    torch.manual_seed(0)
    model = LLM2CLIP(LLM2CLIPConfig(backbone=backbone, text_dim=p.llm.hidden_size, embed_dim=p.embed_dim))
    if p.gradient_checkpointing:
        model.vision.set_grad_checkpointing(True)
    model.to(dev).train()
    groups = [{k: v for k, v in g.items() if k != "name"} for g in build_param_groups(model, s)]
    return model, groups, s


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
    autocast = p.dtype != "fp32"
    amp_dtype = DTYPES[p.dtype]

    captions = _batch_captions(p.batch_size, p.long_caption_ratio)
    tokenizer = caption_tokenizer(demo_captions(200, seed=1))
    llm_config = llama_config(p.llm, None if p.full_vocab else len(tokenizer))
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(p.batch_size, 3, p.vit.image_size, p.vit.image_size, generator=g).to(dev)

    def llm() -> CaptionEncoder:
        torch.manual_seed(1)
        model = bidirectional_from_config(llm_config, dtype=amp_dtype, device=dev)
        return CaptionEncoder(model, tokenizer, 512, pad_to_multiple_of=p.pad_to_multiple_of)

    # The trainer's accelerator (its autocast is the step's mixed precision).
    accelerator = trainer_accelerator("bf16" if autocast else "fp32", dev)
    with cpu_threads(p.cpu_threads, dev):
        frozen = llm()
        # Offline embeddings: the frozen LLM's, computed once, kept on the host as the store is.
        offline_emb = frozen.encode(captions, batch_size=p.batch_size).to(torch.float16)
        if dev.type == "cuda":
            offline_emb = offline_emb.pin_memory()

        lora_enc = llm()
        s1 = Stage1Config(gradient_checkpointing=p.gradient_checkpointing)
        lora_enc.model = wrap_lora(lora_enc.model, s1)
        lora_enc.model.train()

        steps: dict[str, Any] = {}
        sizes: dict[str, int] = {}
        for name in VARIANTS:
            model, groups, s = _make_clip(p, dev)
            if name == "lora":
                lora_params = [q for q in lora_enc.model.parameters() if q.requires_grad]
                groups.append({"params": lora_params, "lr": s1.lr, "weight_decay": 0.0})
                sizes["lora_trainable_params"] = sum(q.numel() for q in lora_params)
            opt = torch.optim.AdamW(
                groups, lr=s.lr, betas=tuple(s.betas), eps=s.eps, **fused_adamw_kwargs(dev)
            )
            real = Stage2Step(accelerator, model, s.loss)  # the trainer's step
            steps[name] = _step_fn(name, real, opt, s.loop.grad_clip, pixels, captions, offline_emb,
                                   frozen, lora_enc, dev, autocast, amp_dtype)  # fmt: skip
            sizes.setdefault("vit_params", count_params(model.vision))
            sizes.setdefault("clip_trainable_params", count_params(model, trainable_only=True))
            sizes.setdefault("vit_non_embedding_params", _vit_compute_params(model.vision))

        timings = measure(
            steps, device=dev, warmup=warmup, repeats=repeats, items_per_call=p.batch_size,
            description=f"bench stage2 [{preset}]",
        )  # fmt: skip
        dev_name = device_name(dev)

    by = {t.name: t for t in timings}
    lengths = [int(x.sum()) for x in frozen.tokenize(captions)["attention_mask"]]
    llm_compute = non_embedding_params(frozen.model)
    vit_fwd = encoder_flops(
        sizes["vit_non_embedding_params"], p.vit.num_layers, p.vit.hidden_size, p.vit.tokens
    )
    llm_fwd = sum(encoder_flops(llm_compute, p.llm.num_layers, p.llm.hidden_size, t) for t in lengths) / len(
        lengths
    )
    vs_lora = paired_ratio(by["lora"], by["offline"])
    vs_online = paired_ratio(by["online"], by["offline"])
    results = {
        "offline_vs_lora": vs_lora,
        "offline_vs_online": vs_online,
        "target_vs_lora": TARGET_VS_LORA,
        "target_vs_online": TARGET_VS_ONLINE,
        "meets_targets": vs_lora >= TARGET_VS_LORA and vs_online >= TARGET_VS_ONLINE,
        "llm_params": count_params(frozen.model),
        "llm_non_embedding_params": llm_compute,
        **sizes,
        "llm_to_vit_param_ratio": round(llm_compute / sizes["vit_non_embedding_params"], 2),
        "image_tokens": p.vit.tokens,
        "mean_caption_tokens": round(sum(lengths) / len(lengths), 1),
        "vit_fwd_gflops_per_sample": round(vit_fwd / 1e9, 4),
        "llm_fwd_gflops_per_sample": round(llm_fwd / 1e9, 4),
        "flops_ratio": round(llm_fwd / vit_fwd, 2),
    }
    variants = {
        t.name: {"samples_per_s": round(t.items_per_s, 3), "peak_mem_mb": peak_mb(t), "median_ms": round(1e3 * t.median_s, 1)}
        for t in timings
    }  # fmt: skip
    settings = {**asdict(p), "warmup": warmup, "repeats": repeats, "device": str(dev)}
    return BenchReport(
        suite="stage2",
        preset=preset,
        device=dev_name,
        settings=settings,
        timings=timings,
        results=results,
        variants=variants,
        memory_note=""
        if dev.type == "cuda"
        else "CPU peak = process peak RSS during one step (all variants' models resident)",
    )


def _vit_compute_params(vision: torch.nn.Module) -> int:
    """ViT parameters used per token: all but the patch and position embeddings."""
    skip = ("embeddings.",)
    return sum(q.numel() for n, q in vision.named_parameters() if not any(k in n for k in skip))


def _step_fn(
    name: str,
    real: Stage2Step,
    opt: torch.optim.Optimizer,
    grad_clip: float,
    pixels: torch.Tensor,
    captions: list[str],
    offline_emb: torch.Tensor,
    frozen: Any,
    lora_enc: Any,
    dev: torch.device,
    autocast: bool,
    amp_dtype: torch.dtype,
) -> Any:
    """One training step of variant ``name``: its text embeddings, then stage 2's own
    ``forward_backward`` and the loop's clip / update / clamp (no ``.item()`` inside)."""
    params = [q for g in opt.param_groups for q in g["params"]]

    def text_embeddings() -> torch.Tensor:
        if name == "offline":
            return offline_emb.to(dev, non_blocking=True)
        enc = frozen if name == "online" else lora_enc
        batch = {k: v.to(dev, non_blocking=True) for k, v in enc.tokenize(captions).items()}
        if name == "online":
            with torch.no_grad():
                return enc(**batch)
        return enc(**batch)

    def step() -> None:
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=autocast):
            emb = text_embeddings()
        real.forward_backward(pixels, emb)
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        real.model.clamp_logit_scale()

    return step
