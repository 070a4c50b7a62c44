"""One plan per stage and GPU: memory (states, activations, runtime), compute, data, verdict.

Every figure comes from the model built on the meta device (:mod:`.meta`), the activation model
(:mod:`.activations`), the state arithmetic (:mod:`.memory`) and the FLOP formula (:mod:`.flops`).
Activations are for the worst micro-batch: every sequence at the stage's ``max_length`` (images
have a fixed length). Time per epoch counts model FLOPs at the typical lengths below, at the
stated MFU of the GPUs' dense bf16 peak.

Assumed where the recipe cannot say (each printed with the plan):

- stage 1: DreamLIP sub-captions of ~32 (short) and ~128 (long) tokens padded, ~16 tokens of
  query instruction and chat header;
- LLaVA: 576 image tokens plus ~60 text tokens (LCS-558K captions), or plus ~250 (mix665k turns);
- data-path RAM per rank: the ``bench data`` slopes at 1M records (docs/BENCHMARKS.md): 8 B per
  record for the caption readers, 153 B (map-style) / 156 B (streamed) for stage 2's data, 33 B
  for LLaVA JSON records;
- record counts (SPEC): CC3M + CC12M = 12.87M images; LCS-558K = 558,128; mix665k = 665,298.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from llm2clip_vlm.llava.config import LlavaConfig
from llm2clip_vlm.plan import meta
from llm2clip_vlm.plan.activations import (
    Precision,
    Stack,
    Training,
    autocast_weight_bytes,
    kept_bytes,
    layer_bytes_per_token,
    lm_loss_bytes,
    recompute_bytes,
)
from llm2clip_vlm.plan.flops import encoder_flops
from llm2clip_vlm.plan.memory import Distributed, States, overhead_bytes, state_bytes
from llm2clip_vlm.store.config import EmbedConfig
from llm2clip_vlm.text.config import Stage1Config
from llm2clip_vlm.vision.config import Stage2Config

GIB = 2**30
CC3M_CC12M = 12_873_763  # 2,873,538 + 10,000,225 image-caption pairs
LCS_558K = 558_128
MIX_665K = 665_298
SHORT_TOKENS, LONG_TOKENS, INSTRUCTION_TOKENS = 32, 128, 16
LLAVA_TEXT_TOKENS = {"pretrain": 60, "finetune": 250}
READER_BYTES_PER_RECORD = 8
STAGE2_BYTES_PER_RECORD = {False: 153, True: 156}  # map-style, streamed
LLAVA_BYTES_PER_RECORD = 33
BF16 = Precision(compute=2, residual=2, mask=1)
AUTOCAST_FP32_MASTER = Precision(compute=2, residual=4, mask=1)


@dataclass(frozen=True)
class Cluster:
    gpus: int = 8
    gpu_memory_gib: float = 80.0
    peak_flops: float = 989e12  # H100 SXM dense bf16
    mfu: float = 0.4


@dataclass
class StagePlan:
    """One stage on one GPU (bytes in GiB in :meth:`as_dict`)."""

    stage: str
    model: str
    strategy: str
    strategy_source: str
    gpus: int
    params: int
    trainable: int
    four_bit: int
    micro_batch: int
    seq_len: int
    checkpointing: bool
    states: States
    activations_checkpointing: float
    activations_no_checkpointing: float
    records: int
    epochs: float
    steps_per_epoch: int
    step_flops: float
    epoch_hours: float  # one epoch
    data_ram_per_rank: float
    store_bytes: float = 0.0
    notes: list[str] = field(default_factory=list)
    gpu_memory_gib: float = 80.0
    fits: bool = False
    knob: str = ""

    @property
    def activations(self) -> float:
        return self.activations_checkpointing if self.checkpointing else self.activations_no_checkpointing

    def peak(self, activations: float | None = None, states: States | None = None) -> float:
        rest = (states or self.states).total + (self.activations if activations is None else activations)
        return rest + overhead_bytes(rest)

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (``plan --json``): counts as integers, memory in GiB, time in hours."""
        g = lambda x: round(x / GIB, 3)  # noqa: E731
        out = {k: v for k, v in asdict(self).items() if k not in ("states",)}
        out.update(
            weights_gib=g(self.states.weights),
            gradients_gib=g(self.states.gradients),
            optimizer_gib=g(self.states.optimizer),
            activations_gib=g(self.activations),
            activations_checkpointing_gib=g(self.activations_checkpointing),
            activations_no_checkpointing_gib=g(self.activations_no_checkpointing),
            overhead_gib=g(self.peak() - self.states.total - self.activations),
            peak_gib=g(self.peak()),
            data_ram_per_rank_gib=g(self.data_ram_per_rank),
            store_gib=g(self.store_bytes),
            step_tflop=round(self.step_flops / 1e12, 1),
            epoch_hours=round(self.epoch_hours, 2),
        )
        for k in (
            "activations_checkpointing",
            "activations_no_checkpointing",
            "data_ram_per_rank",
            "store_bytes",
            "step_flops",
        ):
            out.pop(k)
        return out


def llm_stack(config: Any) -> Stack:
    """The activation shape of a Llama-family decoder config."""
    h, heads = int(config.hidden_size), int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or h // heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    return Stack(
        int(config.num_hidden_layers), h, kv * head_dim, int(config.intermediate_size), heads, "swiglu", "rms"
    )


def vit_stack(backbone: nn.Module) -> Stack:
    """The activation shape of a built vision backbone (transformers CLIP/SigLIP, or timm)."""
    config = getattr(backbone, "config", None)
    if config is not None and hasattr(config, "intermediate_size"):
        act = str(getattr(config, "hidden_act", "gelu"))
        mlp = "quick_gelu" if act == "quick_gelu" else "gelu"
        h = int(config.hidden_size)
        return Stack(int(config.num_hidden_layers), h, h, int(config.intermediate_size),
                     int(config.num_attention_heads), mlp, "layer")  # fmt: skip
    block = backbone.blocks[0]  # timm: EVA02 blocks have a SwiGLU MLP
    h = int(backbone.num_features)
    fc = getattr(block.mlp, "fc1_g", None) or block.mlp.fc1
    mlp = "swiglu" if hasattr(block.mlp, "fc1_g") else "gelu"
    return Stack(len(backbone.blocks), h, h, int(fc.out_features), int(block.attn.num_heads), mlp, "layer")


def vit_tokens(backbone: nn.Module) -> int:
    config = getattr(backbone, "config", None)
    if config is not None and hasattr(config, "patch_size"):
        n = (int(config.image_size) // int(config.patch_size)) ** 2
        return n + (1 if getattr(config, "model_type", "") == "clip_vision_model" else 0)
    return int(backbone.patch_embed.num_patches) + int(getattr(backbone, "num_prefix_tokens", 1))


def _finish(p: StagePlan, cluster: Cluster, knobs: list[tuple[str, float]]) -> StagePlan:
    """Set ``fits`` and the knob to turn (the first candidate whose peak fits)."""
    budget = cluster.gpu_memory_gib * GIB
    p.gpu_memory_gib = cluster.gpu_memory_gib
    p.fits = p.peak() <= budget
    if p.fits:
        p.knob = "fits"
        return p
    for text, peak in knobs:
        if peak <= budget:
            p.knob = text
            return p
    p.knob = "does not fit on this many GPUs of this size with any single knob"
    return p


def _halvings(n: int, floor: int) -> list[int]:
    """``n/2, n/4, ...`` down to ``floor`` (the smaller micro-batches to try, largest first)."""
    out, q = [], n // 2
    while q >= floor:
        out.append(q)
        q //= 2
    return out


def _time(steps: int, step_flops: float, cluster: Cluster) -> float:
    return steps * step_flops / (cluster.gpus * cluster.peak_flops * cluster.mfu) / 3600


def plan_stage1(s: Stage1Config, llm_config: Any, dist: Distributed, cluster: Cluster,
                records: int | None = None) -> StagePlan:  # fmt: skip
    """Stage 1: SimCSE steps of LoRA (or QLoRA) on the bidirectional LLM."""
    model = meta.stage1_model(s, llm_config)
    c = meta.count(model)
    stack = llm_stack(llm_config)
    n = cluster.gpus
    seqs = max(1, s.batch_size // n) * (3 if s.hard_negatives else 2)
    chunk = min(s.chunk_size or seqs, seqs)
    lora: Training = "lora"
    kw = dict(
        training=lora, lora_dropout=s.lora.dropout > 0, lora_rank=s.lora.r, attention=s.attn_implementation
    )
    pooled = BF16.compute * stack.hidden * seqs * s.max_length  # mean pooling keeps the last states

    def acts(sequences: int, ckpt: bool) -> float:
        c_ = min(chunk, sequences)
        kept = kept_bytes(stack, sequences, s.max_length, BF16, checkpointing=ckpt, **kw)  # type: ignore[arg-type]
        extra = recompute_bytes(stack, c_, s.max_length, BF16, **kw) if ckpt else 0.0  # type: ignore[arg-type]
        return kept + extra + pooled * sequences / seqs

    states = state_bytes(c, dist.strategy, n, meta.largest_block(model))
    records = records or CC3M_CC12M
    steps = math.ceil(records / s.batch_size)
    tokens = (SHORT_TOKENS + LONG_TOKENS) / 2
    p_ne = c.params - meta.embedding_params(model)
    fwd = (
        s.batch_size
        * (3 if s.hard_negatives else 2)
        * encoder_flops(p_ne, stack.layers, stack.hidden, int(tokens))
    )
    fwd += s.batch_size * 2.0 * p_ne * INSTRUCTION_TOKENS
    step = 2 * fwd  # forward + a backward that passes gradients through frozen weights
    plan = StagePlan(
        "stage1", s.model, dist.strategy, dist.source, n, c.params, c.trainable, c.four_bit, seqs, s.max_length,
        s.gradient_checkpointing, states, acts(seqs, True), acts(seqs, False), records, s.loop.epochs, steps,
        step, _time(steps, step, cluster), READER_BYTES_PER_RECORD * records,
        notes=[f"{seqs} sequences per rank per step (batch {s.batch_size} / {n} GPUs x "
               f"{'3' if s.hard_negatives else '2'}), all kept until the loss; activations at max_length "
               f"{s.max_length}, time at ~{SHORT_TOKENS}/{LONG_TOKENS}-token captions"],
    )  # fmt: skip
    knobs = []
    if not s.gradient_checkpointing:
        knobs.append(("turn on stage1.gradient_checkpointing", plan.peak(plan.activations_checkpointing)))
    smaller = _halvings(seqs, 3)
    for q in smaller:
        knobs.append((f"more GPUs or a smaller stage1.batch_size: {q} sequences per rank fit",
                      plan.peak(acts(q, s.gradient_checkpointing))))  # fmt: skip
    if s.lora.quantization == "none":
        # The same model with its frozen linear weights in NF4 and the rest in fp32 (peft's k-bit prep).
        emb = meta.embedding_params(model)
        frozen_linear = c.params - c.trainable - emb
        q4 = meta.Counts(c.params, c.trainable, frozen_linear,
                         c.trainable_bytes + frozen_linear * meta.NF4_BYTES + 4.0 * emb, c.trainable_bytes)  # fmt: skip
        states4 = state_bytes(q4, dist.strategy, n)
        knobs.append(("QLoRA: stage1.lora.quantization=4bit", plan.peak(states=states4)))
        for q in smaller:
            knobs.append((f"QLoRA (stage1.lora.quantization=4bit) and {q} sequences per rank (more GPUs or a "
                          "smaller stage1.batch_size)", plan.peak(acts(q, s.gradient_checkpointing), states4)))  # fmt: skip
    return _finish(plan, cluster, knobs)


def plan_embed(e: EmbedConfig, llm_name: str, llm_config: Any, cluster: Cluster, records: int | None = None,
               max_length: int = 512) -> StagePlan:  # fmt: skip
    """The embed pass: the merged stage-1 LLM over every kept caption once (no gradients)."""
    model = meta.embed_model(llm_config, e.precision)
    c = meta.count(model)
    stack = llm_stack(llm_config)
    records = records or CC3M_CC12M
    per_image = 2 * max(1, e.train_captions_per_kind)  # the reference stores a short and a long one
    rows = records * per_image
    # Inference keeps nothing: the peak is one layer's working set for one batch.
    work = layer_bytes_per_token(stack, max_length, BF16) * e.batch_size * max_length
    p_ne = c.params - meta.embedding_params(model)
    flops = rows * encoder_flops(p_ne, stack.layers, stack.hidden, (SHORT_TOKENS + LONG_TOKENS) // 2)
    batches = math.ceil(rows / (e.batch_size * cluster.gpus))
    dtype_bytes = {"fp16": 2, "bf16": 2, "fp32": 4}[e.dtype]
    plan = StagePlan(
        "embed", llm_name, "ddp", "each rank embeds its own shards", cluster.gpus, c.params, 0, 0, e.batch_size,
        max_length, False, States(c.weight_bytes, 0.0, 0.0), work, work, records, 1.0, batches,
        flops / batches, flops / (cluster.gpus * cluster.peak_flops * cluster.mfu) / 3600,
        READER_BYTES_PER_RECORD * records, store_bytes=rows * llm_config.hidden_size * dtype_bytes,
        notes=[f"store: {rows:,} rows ({per_image} captions per image) x {llm_config.hidden_size}-d {e.dtype}"],
    )  # fmt: skip
    return _finish(plan, cluster, [])


def plan_stage2(s: Stage2Config, vision_config: Any, text_dim: int, dist: Distributed, cluster: Cluster,
                records: int | None = None, streamed: bool = False) -> StagePlan:  # fmt: skip
    """Stage 2: the whole ViT, image head, adaptor and logit scale, on stored caption embeddings."""
    model = meta.stage2_model(s, vision_config, text_dim)
    c = meta.count(model)
    backbone = model.vision.model
    stack = vit_stack(backbone)
    tokens = vit_tokens(backbone)
    n = cluster.gpus
    b = max(1, s.batch_size // n)
    # DDP runs the fp32 weights under autocast (16-bit copies kept); FSDP gathers them in bf16.
    copies = autocast_weight_bytes(c.trainable, AUTOCAST_FP32_MASTER) if dist.strategy == "ddp" else 0.0

    def acts(images: int, ckpt: bool) -> float:
        kept = kept_bytes(stack, images, tokens, AUTOCAST_FP32_MASTER, checkpointing=ckpt)
        extra = recompute_bytes(stack, images, tokens, AUTOCAST_FP32_MASTER) if ckpt else 0.0
        # The adaptor's 4 blocks on the caption embeddings and the batch x global-batch logits.
        side = images * text_dim * 2 * 12 + 2 * 4 * images * s.batch_size
        return kept + extra + side + copies

    states = state_bytes(c, dist.strategy, n, meta.largest_block(model))
    records = records or CC3M_CC12M
    steps = math.ceil(records / s.batch_size)
    vit_ne = meta.count(model.vision).params
    fwd = s.batch_size * encoder_flops(vit_ne, stack.layers, stack.hidden, tokens)
    fwd += s.batch_size * 2.0 * meta.count(model.text_adaptor).params
    step = 3 * fwd  # everything trains: forward + backward (twice the forward)
    hours = _time(steps, step, cluster)
    rate = records / max(hours * 3600, 1e-9)
    plan = StagePlan(
        "stage2", s.backbone.name_or_path or f"random ViT ({s.backbone.kind})", dist.strategy, dist.source, n,
        c.params, c.trainable, 0, b, tokens, s.gradient_checkpointing, states, acts(b, True), acts(b, False),
        records, s.loop.epochs, steps, step, hours, STAGE2_BYTES_PER_RECORD[streamed] * records,
        notes=[f"{b} images per rank (batch {s.batch_size} / {n} GPUs), {tokens} tokens each; "
               f"{text_dim}-d caption embeddings into the adaptor",
               f"the loader must deliver {rate:,.0f} images/s ({rate / n:,.0f} per GPU) at this MFU"],
    )  # fmt: skip
    knobs = []
    if not s.gradient_checkpointing:
        knobs.append(("turn on stage2.gradient_checkpointing", plan.peak(plan.activations_checkpointing)))
    if dist.strategy == "ddp":
        knobs.append(
            ("shard: FSDP (recipes/accelerate/fsdp-8gpu.yaml)", plan.peak(states=state_bytes(c, "fsdp", n)))
        )
    for q in _halvings(b, 1):
        if q >= 1:
            knobs.append((f"more GPUs or a smaller stage2.batch_size: {q} images per rank fit",
                          plan.peak(acts(q, s.gradient_checkpointing))))  # fmt: skip
    return _finish(plan, cluster, knobs)


def plan_llava(llava: LlavaConfig, phase: str, vision_config: Any, llm_config: Any, dist: Distributed,
               cluster: Cluster, records: int | None = None) -> StagePlan:  # fmt: skip
    """A LLaVA-1.5 phase: frozen tower, projector, and the LLM frozen / full / LoRA / QLoRA."""
    p = getattr(llava, phase)
    model = meta.llava_model(llava, phase, vision_config, llm_config)
    c = meta.count(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    stack = llm_stack(llm_config)
    image_tokens = int(base.config.image_seq_length)
    vocab = int(base.config.text_config.vocab_size)
    training: Training = {"projector": "frozen", "full": "full"}.get(p.tune, "lora")  # type: ignore[assignment]
    # DeepSpeed runs the model in bf16; otherwise trainable weights are fp32 masters under autocast.
    prec = AUTOCAST_FP32_MASTER if training == "full" and not dist.strategy.startswith("zero") else BF16
    kw = dict(
        training=training, lora_dropout=p.lora_dropout > 0, lora_rank=p.lora_r if training == "lora" else 0
    )
    mb = p.micro_batch_size
    copies = autocast_weight_bytes(c.trainable, prec) if dist.strategy == "ddp" else 0.0

    def acts(micro: int, ckpt: bool) -> float:
        kept = kept_bytes(stack, micro, p.max_length, prec, checkpointing=ckpt, **kw)  # type: ignore[arg-type]
        extra = recompute_bytes(stack, micro, p.max_length, prec, **kw) if ckpt else 0.0  # type: ignore[arg-type]
        return kept + extra + lm_loss_bytes(micro * p.max_length, vocab, prec) + copies

    states = state_bytes(c, dist.strategy, cluster.gpus, meta.largest_block(base.model.language_model))
    default_records = LCS_558K if phase == "pretrain" else MIX_665K
    records = records or default_records
    steps = math.ceil(records / p.batch_size)
    tokens = image_tokens + LLAVA_TEXT_TOKENS[phase]
    llm_ne = meta.count(base.model.language_model).params + meta.count(base.lm_head).params
    llm_ne -= meta.embedding_params(base.model.language_model)
    tower = base.model.vision_tower
    tstack = vit_stack(tower)
    fwd_llm = p.batch_size * encoder_flops(llm_ne, stack.layers, stack.hidden, tokens)
    fwd_tower = p.batch_size * encoder_flops(
        meta.count(tower).params, tstack.layers, tstack.hidden, vit_tokens(tower)
    )
    step = fwd_llm * (3 if training == "full" else 2) + fwd_tower  # the frozen tower: forward only
    plan = StagePlan(
        f"llava-{phase}", f"{llava.llm} + {getattr(vision_config, 'model_type', 'tower')} ({p.tune})", dist.strategy,
        dist.source, cluster.gpus, c.params, c.trainable, c.four_bit, mb, p.max_length, p.gradient_checkpointing,
        states, acts(mb, True), acts(mb, False), records, p.loop.epochs, steps, step,
        _time(steps, step, cluster), LLAVA_BYTES_PER_RECORD * records,
        notes=[f"{image_tokens} image tokens of {tower.config.hidden_size}-d into the "
               f"{stack.hidden}-d projector; activations at max_length {p.max_length}, time at ~{tokens} tokens"],
    )  # fmt: skip
    knobs = []
    if not p.gradient_checkpointing:
        knobs.append(
            (f"turn on llava.{phase}.gradient_checkpointing", plan.peak(plan.activations_checkpointing))
        )
    if dist.strategy in ("ddp", "zero1", "zero2", "fsdp-grad-op"):
        knobs.append(("shard: ZeRO-3 (recipes/accelerate/llava-deepspeed-zero3-8gpu.yaml)",
                      plan.peak(states=state_bytes(c, "zero3", cluster.gpus))))  # fmt: skip
    for q in _halvings(mb, 1):
        if q >= 1:
            knobs.append((f"llava.{phase}.micro_batch_size={q} (accumulation keeps the global batch)",
                          plan.peak(acts(q, p.gradient_checkpointing))))  # fmt: skip
    return _finish(plan, cluster, knobs)
