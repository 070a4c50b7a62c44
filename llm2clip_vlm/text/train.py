"""Stage 1 training loop: optional MNTP, then supervised SimCSE with LoRA, then merge and save.

Reads top to bottom: load data -> load the bidirectional LLM -> CRA before -> (MNTP) -> LoRA ->
SimCSE steps (checkpointed, resumable) -> merge -> save ``encoder/`` -> CRA after -> metrics.

Multi-process training goes through accelerate (``accelerate launch`` / ``torchrun``): each process
embeds ``batch_size / world`` queries of the step's global batch (see
:mod:`llm2clip_vlm.text.simcse`), and the SimCSE loss gathers positives and hard negatives from
all processes with gradient, so N processes compute the same loss and update as one.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llm2clip_vlm import configuration
from llm2clip_vlm.checkpointing import Checkpointer, GracefulExit, NonFiniteGuard, Resumed
from llm2clip_vlm.config import RunConfig
from llm2clip_vlm.data.records import ImageCaptions
from llm2clip_vlm.logging import get_logger
from llm2clip_vlm.losses import SupervisedSimCSELoss
from llm2clip_vlm.progress import make_progress
from llm2clip_vlm.text.config import Stage1Config
from llm2clip_vlm.text.cra import caption_pairs, caption_retrieval_accuracy
from llm2clip_vlm.text.encoder import CaptionEncoder
from llm2clip_vlm.text.modeling import (
    DTYPES,
    ModelRef,
    decoder_of,
    load_bidirectional,
    load_tokenizer,
    resolve_model_ref,
)
from llm2clip_vlm.text.pooling import mean_pool, tokenize
from llm2clip_vlm.text.simcse import SimCSEBatches, Triplet

log = get_logger(__name__)

CHECKPOINTS = "checkpoints"
MNTP_CHECKPOINTS = "mntp"  # under CHECKPOINTS: the MNTP warm-up's own checkpoints


@dataclass
class TrainState:
    """What a checkpoint restores besides weights, optimizer and RNG: the step (= the data
    position, since a step's batch is a function of (seed, step)) and the history."""

    step: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------
def run_stage1(cfg: RunConfig, output_dir: str | Path) -> dict[str, Any]:
    """``llm2clip-vlm stage1``: resolve the data of ``cfg`` and train (see :func:`train_stage1`)."""
    from llm2clip_vlm.data import resolve_data

    train_set, heldout = resolve_data(cfg.data, Path(output_dir))
    if "short" not in heldout:
        raise ValueError("stage 1 needs a held-out set of short captions (key 'short') for CRA")
    return train_stage1(cfg, output_dir, list(train_set), list(heldout["short"]))


def train_stage1(
    cfg: RunConfig,
    output_dir: str | Path,
    train_records: Sequence[ImageCaptions],
    heldout_records: Sequence[ImageCaptions],
) -> dict[str, Any]:
    """Train a caption embedder and write ``encoder/``, ``metrics.json`` and ``config.yaml``.

    Args:
        cfg: the run config (``cfg.stage1`` drives training; ``cfg.data`` the text-corpus mix).
        output_dir: run directory; a run with checkpoints in it resumes from the latest.
        train_records: training images with their captions.
        heldout_records: held-out images with >= 2 short captions each (for CRA).

    Returns:
        The metrics written to ``metrics.json``.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    s = cfg.stage1
    out = Path(output_dir)
    accelerator = Accelerator(mixed_precision=_mixed_precision(s), cpu=not torch.cuda.is_available())
    main = accelerator.is_main_process
    set_seed(s.seed)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        configuration.dump(cfg, out / "config.yaml")
    world = accelerator.num_processes
    if s.mntp.enabled and s.lora.quantization != "none":
        raise ValueError(
            "stage1.mntp with a quantized base is not supported: run MNTP on a full-precision base"
        )
    if s.batch_size % world:
        raise ValueError(f"stage1.batch_size {s.batch_size} is not divisible by the {world} processes")

    ref = resolve_model_ref(s.model)
    tokenizer = load_tokenizer(ref)
    weight_dtype = _weight_dtype(s, accelerator.device)
    instructions = {"short": s.instruction_short_query, "long": s.instruction_long_query}
    batches = SimCSEBatches(train_records, instructions, s.seed, s.hard_negatives, s.similar_negatives)
    pairs = caption_pairs(heldout_records, s.cra_captions)
    total_steps = _total_steps(s, batches)
    log.info(
        "stage 1: %s, %d training images, %d steps of %d queries (%d per process), CRA on %d captions",
        s.model, len(batches), total_steps, s.batch_size, s.batch_size // world, 2 * len(pairs),
    )  # fmt: skip

    model = load_bidirectional(
        ref,
        with_lm_head=s.mntp.enabled,
        attn_implementation=s.attn_implementation,
        dtype=weight_dtype,
        quantization=s.lora.quantization,
        device_map={"": accelerator.device} if s.lora.quantization != "none" else None,
        allow_pickle=cfg.reliability.allow_pickle_weights,
    )
    if s.lora.quantization == "none":
        model.to(accelerator.device)

    cra_before = _cra_before(decoder_of(model), tokenizer, s, pairs, accelerator, out) if main else None
    accelerator.wait_for_everyone()

    if s.mntp.enabled:
        model = _run_mntp(
            model, tokenizer, cfg, train_records, out / CHECKPOINTS / MNTP_CHECKPOINTS, accelerator
        )

    peft_model = _wrap_lora(decoder_of(model), s)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    # fused: one kernel for all parameters on a GPU (not available for CPU tensors).
    optimizer = torch.optim.AdamW(
        trainable, lr=s.lr, weight_decay=s.weight_decay, fused=accelerator.device.type == "cuda"
    )
    scheduler = _scheduler(optimizer, s.lr_schedule, s.warmup_steps, total_steps)
    checkpointer = Checkpointer(out / CHECKPOINTS, accelerator, keep=s.keep_checkpoints)
    resumed = _resume(checkpointer, peft_model, optimizer, scheduler)
    state = TrainState(**resumed.state) if resumed else TrainState()
    # The scheduler is stepped by hand once per optimizer step (accelerate's wrapper would step it
    # once per process).
    ddp_model, optimizer = accelerator.prepare(peft_model, optimizer)
    loss_fn = SupervisedSimCSELoss(scale=s.scale)
    guard = NonFiniteGuard("stage1", cfg.reliability.skip_nonfinite_steps, cfg.reliability.max_skipped_steps)

    state = _train_loop(ddp_model, peft_model, optimizer, scheduler, loss_fn, tokenizer, batches, s, state, total_steps, checkpointer, resumed, guard, accelerator)  # fmt: skip

    merged = _merge(accelerator.unwrap_model(ddp_model), ref, s, weight_dtype)
    metrics: dict[str, Any] = {}
    if main:
        encoder = CaptionEncoder(
            merged, tokenizer, s.max_length, _instruction_settings(s), s.pooling, s.pad_to_multiple_of
        )
        encoder.save_pretrained(out / "encoder")
        # Zero steps leave the weights as they were (the LoRA's B is zero): CRA is unchanged.
        cra_after = _cra(merged, tokenizer, s, pairs, accelerator) if state.step else cra_before
        metrics = {
            "cra_before": cra_before,
            "cra_after": cra_after,
            "cra_captions": 2 * len(pairs),
            "steps": state.step,
            "planned_steps": total_steps,
            "train_seconds": round(state.seconds, 1),
            "seconds_per_step": round(state.seconds / max(1, len(state.losses)), 3),
            "global_batch": s.batch_size,
            "processes": world,
            "loss": state.losses,
            "skipped_steps": state.skipped_steps,
            "encoder": str(out / "encoder"),
            "encoder_identity": encoder.identity(),
        }
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        log.info(
            "stage 1 done: CRA %.1f -> %.1f after %d steps (%.0f s)",
            cra_before,
            cra_after,
            state.step,
            state.seconds,
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


# --------------------------------------------------------------------------------------------
# Set-up helpers
# --------------------------------------------------------------------------------------------
def _mixed_precision(s: Stage1Config) -> str:
    return {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[s.precision]


def _weight_dtype(s: Stage1Config, device: torch.device) -> torch.dtype:
    """Base weights in bf16/fp16 on a GPU (memory); fp32 on a CPU, where bf16 runs under autocast."""
    if device.type == "cpu" or s.precision == "fp32":
        return torch.float32
    return DTYPES[s.precision]


def _instruction_settings(s: Stage1Config) -> dict[str, str]:
    return {"short_query": s.instruction_short_query, "long_query": s.instruction_long_query}


def _total_steps(s: Stage1Config, batches: SimCSEBatches) -> int:
    if s.epochs == 0:
        return 0  # no training: the encoder is the base LLM (bidirectional, mean pooled)
    steps = max(1, math.ceil(s.epochs * batches.steps_per_epoch(s.batch_size)))
    return min(steps, s.max_steps) if s.max_steps > 0 else steps


def _scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup: int, total: int) -> Any:
    from transformers import get_scheduler

    return get_scheduler(kind if kind != "constant" else "constant_with_warmup", optimizer, warmup, total)


def _wrap_lora(decoder: nn.Module, s: Stage1Config) -> nn.Module:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    gc_kwargs = {"use_reentrant": False}  # non-reentrant: works with DDP and several forwards per step
    if s.lora.quantization != "none":
        decoder = prepare_model_for_kbit_training(
            decoder,
            use_gradient_checkpointing=s.gradient_checkpointing,
            gradient_checkpointing_kwargs=gc_kwargs,
        )
    elif s.gradient_checkpointing:
        decoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    lora = LoraConfig(
        r=s.lora.r,
        lora_alpha=s.lora.alpha,
        lora_dropout=s.lora.dropout,
        target_modules=_lora_targets(decoder, s.lora.target_modules, s.lora.top_layers),
    )
    model = get_peft_model(decoder, lora)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log.info(
        "LoRA r=%d on %s%s: %d trainable of %d parameters (base frozen)",
        s.lora.r,
        s.lora.target_modules,
        f" of the last {s.lora.top_layers} layers" if s.lora.top_layers > 0 else "",
        n_train,
        n_all,
    )
    return model


def _lora_targets(decoder: nn.Module, targets: Sequence[str], top_layers: int) -> list[str]:
    """The LoRA target modules: ``targets`` by name, or (``top_layers`` > 0) the full names of
    those modules in the last ``top_layers`` decoder layers (peft matches names by suffix, and its
    ``layers_to_transform`` does not find the layers of a bare decoder)."""
    if top_layers <= 0:
        return list(targets)
    n = int(decoder.config.num_hidden_layers)
    if top_layers > n:
        raise ValueError(f"stage1.lora.top_layers={top_layers} but the model has {n} layers")
    keep = {str(i) for i in range(n - top_layers, n)}
    names = []
    for name, _ in decoder.named_modules():
        parts = name.split(".")
        # ...layers.<i>.<block>.<target>, e.g. layers.29.self_attn.q_proj
        if parts[-1] in targets and "layers" in parts:
            index = parts[parts.index("layers") + 1]
            if index in keep:
                names.append(name)
    if not names:
        raise ValueError(f"stage1.lora.top_layers={top_layers}: no {list(targets)} found in the last layers")
    return names


CRA_BEFORE = "cra_before.json"


def _cra_before(
    decoder: nn.Module, tokenizer: Any, s: Stage1Config, pairs: list[tuple[str, str]], accelerator: Any, out: Path
) -> float:
    """CRA of the untrained model, computed once per run directory: a resumed run reads it back
    (it only depends on the base model, the caption pairs and the encoding settings)."""
    import hashlib

    key = hashlib.sha256(
        json.dumps([s.model, s.max_length, s.pad_to_multiple_of, s.precision, pairs]).encode()
    ).hexdigest()
    cached = out / CRA_BEFORE
    if cached.is_file():
        try:
            saved = json.loads(cached.read_text())
        except json.JSONDecodeError:
            saved = {}
        if saved.get("key") == key:
            log.info("CRA before training: %.1f (computed by an earlier run, %s)", saved["cra"], cached)
            return float(saved["cra"])
    cra = _cra(decoder, tokenizer, s, pairs, accelerator)
    cached.write_text(json.dumps({"key": key, "cra": cra}) + "\n")
    return cra


def _cra(
    decoder: nn.Module, tokenizer: Any, s: Stage1Config, pairs: list[tuple[str, str]], accelerator: Any
) -> float:
    encoder = CaptionEncoder(decoder, tokenizer, s.max_length, pad_to_multiple_of=s.pad_to_multiple_of)
    if s.precision != "fp32":
        encoder.autocast_dtype = DTYPES[s.precision]
    return round(caption_retrieval_accuracy(encoder, pairs, s.eval_batch_size), 2)


# --------------------------------------------------------------------------------------------
# The SimCSE loop
# --------------------------------------------------------------------------------------------
def embed_triplets(
    model: nn.Module, tokenizer: Any, triplets: list[Triplet], s: Stage1Config, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Embed queries (with instructions), positives and negatives, with gradient.

    All sequences of the step are sorted by length and embedded in chunks of ``s.chunk_size``
    (0 = one chunk), each padded to a multiple of ``s.pad_to_multiple_of``: little padding, and
    stable shapes (on a CPU, bf16 steps were erratic without it).
    """
    items: list[tuple[str, str | None]] = [(t.query, t.instruction) for t in triplets]
    items += [(t.positive, None) for t in triplets]
    if triplets[0].negative is not None:
        items += [(t.negative, None) for t in triplets if t.negative is not None]
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]) + len(items[i][1] or ""))
    chunk = s.chunk_size or len(items)
    pooled: list[torch.Tensor | None] = [None] * len(items)
    for start in range(0, len(order), chunk):
        idx = order[start : start + chunk]
        enc = tokenize(
            tokenizer,
            [items[i][0] for i in idx],
            [items[i][1] for i in idx],
            s.max_length,
            s.pad_to_multiple_of,
        )
        hidden = model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device))
        emb = mean_pool(hidden.last_hidden_state.float(), enc["embed_mask"].to(device))
        for row, i in enumerate(idx):
            pooled[i] = emb[row]
    stacked = torch.stack(pooled)  # type: ignore[arg-type]
    n = len(triplets)
    negatives = stacked[2 * n :] if len(items) > 2 * n else None
    return stacked[:n], stacked[n : 2 * n], negatives


def _train_loop(
    ddp_model: nn.Module,
    peft_model: nn.Module,
    optimizer: Any,
    scheduler: Any,
    loss_fn: SupervisedSimCSELoss,
    tokenizer: Any,
    batches: SimCSEBatches,
    s: Stage1Config,
    state: TrainState,
    total_steps: int,
    checkpointer: Checkpointer,
    resumed: Resumed | None,
    guard: NonFiniteGuard,
    accelerator: Any,
) -> TrainState:
    rank, world = accelerator.process_index, accelerator.num_processes
    local = s.batch_size // world
    guard.skipped = list(state.skipped_steps)
    ddp_model.train()
    started = time.perf_counter() - state.seconds

    def save() -> None:
        _save_checkpoint(checkpointer, peft_model, optimizer, scheduler, state)

    with make_progress(disable=not accelerator.is_main_process) as progress, GracefulExit() as signals:
        task = progress.add_task("stage 1 SimCSE", total=total_steps, completed=state.step, status="")
        while state.step < total_steps:
            t0 = time.perf_counter()
            triplets = batches.batch(state.step, s.batch_size)[rank * local : (rank + 1) * local]
            if resumed is not None:  # dropout continues exactly where the checkpointed run was
                resumed.restore_rng()
                resumed = None
            with accelerator.autocast():
                q, p, n = embed_triplets(ddp_model, tokenizer, triplets, s, accelerator.device)
            loss = loss_fn(q, p, n)
            accelerator.backward(loss)
            grad_norm = None
            if s.max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(peft_model.parameters(), s.max_grad_norm)
            # Each rank's loss is the mean over its rows; their mean is the global-batch loss.
            global_loss = accelerator.reduce(loss.detach(), reduction="mean").item()
            if guard.check(global_loss, state.step + 1, grad_norm):
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.losses.append(round(global_loss, 6))
            state.skipped_steps = list(guard.skipped)
            state.seconds = time.perf_counter() - started
            progress.update(
                task,
                advance=1,
                status=f"loss {global_loss:.4f}  {time.perf_counter() - t0:.2f} s/step  lr {scheduler.get_last_lr()[0]:.2e}",
            )
            out_of_time = _out_of_time(s, state, accelerator)
            interrupted = signals.should_stop(accelerator)
            periodic = s.save_every_steps > 0 and state.step % s.save_every_steps == 0
            if periodic or out_of_time or interrupted or state.step == total_steps:
                save()
            signals.raise_if_requested(accelerator, checkpointer.latest())
            if out_of_time:
                log.info("stage1.max_seconds=%s reached after %d steps", s.max_seconds, state.step)
                break
    return state


def _out_of_time(s: Stage1Config, state: TrainState, accelerator: Any) -> bool:
    if s.max_seconds <= 0:
        return False
    # Decided on rank 0's clock and shared, so every process stops at the same step.
    flag = torch.tensor([float(state.seconds >= s.max_seconds)], device=accelerator.device)
    flag = accelerator.reduce(flag, reduction="sum") if accelerator.num_processes > 1 else flag
    return bool(flag.item() > 0)


# --------------------------------------------------------------------------------------------
# Checkpoints (llm2clip_vlm.checkpointing): LoRA adapter + optimizer + scheduler + RNG + step
# --------------------------------------------------------------------------------------------
def _adapter_state(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu() for k, v in get_peft_model_state_dict(peft_model).items()}


def _save_checkpoint(
    checkpointer: Checkpointer, peft_model: nn.Module, optimizer: Any, scheduler: Any, state: Any
) -> None:
    main = checkpointer.accelerator is None or checkpointer.accelerator.is_main_process
    weights = _adapter_state(peft_model) if main else None
    checkpointer.save(
        state.step, weights=weights, optimizer=optimizer, scheduler=scheduler, state=vars(state)
    )


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint directory under ``root`` (None if there is none)."""
    return Checkpointer(root).latest()


def _resume(
    checkpointer: Checkpointer, peft_model: nn.Module, optimizer: Any, scheduler: Any
) -> Resumed | None:
    from peft import set_peft_model_state_dict

    resumed = checkpointer.load(optimizer=optimizer, scheduler=scheduler)
    if resumed is not None:
        set_peft_model_state_dict(peft_model, resumed.weights)
    return resumed


# --------------------------------------------------------------------------------------------
# MNTP warm-up and the final merge
# --------------------------------------------------------------------------------------------
def _run_mntp(
    model: nn.Module,
    tokenizer: Any,
    cfg: RunConfig,
    records: Sequence[ImageCaptions],
    ckpt_root: Path,
    accelerator: Any,
) -> nn.Module:
    """MNTP with its own LoRA on the causal-LM model; the LoRA is merged before SimCSE (as LLM2Vec).

    Checkpointed like SimCSE (``ckpt_root``), including once at its end, so a run killed later
    never redoes it. Masking draws from the torch RNG, which the checkpoints carry.
    """
    from transformers import get_scheduler

    from llm2clip_vlm.text.mntp import mix_texts, mntp_collator, mntp_step_loss, read_text_corpus

    s, m = cfg.stage1, cfg.stage1.mntp
    captions = [c.text for r in records for c in r.captions]
    corpus = read_text_corpus(cfg.data.text_corpus) if cfg.data.text_corpus else []
    collator = mntp_collator(tokenizer, m.mlm_probability, s.pad_to_multiple_of)
    lm = _wrap_lora(model, s)
    params = [p for p in lm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=m.lr)
    scheduler = get_scheduler("constant_with_warmup", optimizer, m.warmup_steps, m.steps)
    checkpointer = Checkpointer(ckpt_root, accelerator, keep=s.keep_checkpoints)
    resumed = _resume(checkpointer, lm, optimizer, scheduler)
    state = TrainState(**resumed.state) if resumed else TrainState()
    if resumed is not None and state.step >= m.steps:
        resumed.restore_rng()  # SimCSE starts from the RNG state the finished MNTP left
        resumed = None
    guard = NonFiniteGuard(
        "stage1 MNTP", cfg.reliability.skip_nonfinite_steps, cfg.reliability.max_skipped_steps
    )
    guard.skipped = list(state.skipped_steps)
    ddp_lm, optimizer = accelerator.prepare(lm, optimizer)
    ddp_lm.train()
    rank, world = accelerator.process_index, accelerator.num_processes
    local = max(1, m.batch_size // world)
    with make_progress(disable=not accelerator.is_main_process) as progress, GracefulExit() as signals:
        task = progress.add_task("stage 1 MNTP", total=m.steps, completed=state.step, status="")
        while state.step < m.steps:
            texts = mix_texts(
                captions, corpus, cfg.data.text_corpus_ratio, m.batch_size, seed=s.seed * 100_003 + state.step
            )
            if resumed is not None:
                resumed.restore_rng()
                resumed = None
            with accelerator.autocast():
                loss = mntp_step_loss(
                    ddp_lm, collator, texts[rank * local : (rank + 1) * local], s.max_length
                )
            accelerator.backward(loss)
            global_loss = accelerator.reduce(loss.detach(), "mean").item()
            if guard.check(global_loss, state.step + 1):
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.losses.append(round(global_loss, 6))
            state.skipped_steps = list(guard.skipped)
            progress.update(task, advance=1, status=f"loss {global_loss:.4f}")
            interrupted = signals.should_stop(accelerator)
            periodic = s.save_every_steps > 0 and state.step % s.save_every_steps == 0
            if periodic or interrupted or state.step == m.steps:
                _save_checkpoint(checkpointer, lm, optimizer, scheduler, state)
            signals.raise_if_requested(accelerator, checkpointer.latest())
    merged = accelerator.unwrap_model(ddp_lm).merge_and_unload()
    accelerator.free_memory()
    return merged


def _merge(peft_model: nn.Module, ref: ModelRef, s: Stage1Config, weight_dtype: torch.dtype) -> nn.Module:
    """Merge the LoRA into a full-precision base (a quantized base is reloaded unquantized first)."""
    if s.lora.quantization != "none":
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        adapter = get_peft_model_state_dict(peft_model)
        base = decoder_of(
            load_bidirectional(ref, attn_implementation=s.attn_implementation, dtype=weight_dtype)
        )
        peft_model = _wrap_lora(base, s)
        set_peft_model_state_dict(peft_model, adapter)
    merged = peft_model.merge_and_unload()
    merged.eval()
    if hasattr(merged, "gradient_checkpointing_disable") and getattr(
        merged, "is_gradient_checkpointing", False
    ):
        merged.gradient_checkpointing_disable()
    return merged
