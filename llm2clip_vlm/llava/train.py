"""LLaVA-1.5 training on a tower: projector pretraining and instruction tuning, top to bottom.

1. data: LLaVA records, checked up front (:mod:`llm2clip_vlm.llava.data`); the demo world's
   LLaVA splits when no data is given;
2. model: :func:`~llm2clip_vlm.llava.assemble.build_llava_model` (tower + LLM + ``mlp2x_gelu``
   projector, transformers' ``LlavaForConditionalGeneration``); finetuning loads the projector
   that pretraining wrote. The tower is always frozen; the projector always trains; the LLM is
   frozen (``projector``), fully trained (``full``), or gets LoRA adapters (``lora``, ``qlora`` on
   a 4-bit base);
3. optimiser: AdamW, no weight decay on biases and norms, the projector with its own lr, warm-up
   ratio then cosine (or constant);
4. loop: accelerate (DDP, FSDP or DeepSpeed through an accelerate config), mixed precision,
   gradient checkpointing, gradient accumulation up to the global batch, grad clipping,
   checkpoints (:mod:`llm2clip_vlm.checkpointing`: atomic, RNG included) that a killed run
   resumes from exactly, SIGTERM/SIGINT save before exiting, non-finite steps stop or are skipped;
5. held-out questions answered before and after training -> ``metrics.json``; the model saved in
   transformers' LLaVA format (LoRA merged), plus the projector alone in LLaVA's format.

[IMPORTANT] The loss of a step is the mean over every supervised token of the *global* batch:
each micro batch adds ``sum of its token losses / global token count``, times the number of
processes because DDP averages gradients. So the loss and the update do not depend on the
micro-batch size or the process count (a 2-process test pins it), unlike a mean of per-batch means.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from llm2clip_vlm import configuration
from llm2clip_vlm.checkpointing import Checkpointer, GracefulExit, NonFiniteGuard
from llm2clip_vlm.config import RunConfig
from llm2clip_vlm.data.images import BadRecords, write_report
from llm2clip_vlm.errors import PickleRefusedError
from llm2clip_vlm.llava.config import LlavaPhaseConfig
from llm2clip_vlm.llava.data import (
    Batch,
    Collator,
    LlavaDataset,
    LlavaRecord,
    ModalityBatchSampler,
    load_llava_records,
)
from llm2clip_vlm.llava.templates import IGNORE_INDEX, TEMPLATE_FILE, VICUNA_SYSTEM, VICUNA_V1_JINJA
from llm2clip_vlm.logging import get_logger
from llm2clip_vlm.progress import make_progress
from llm2clip_vlm.tracking.tracker import RunTracker

log = get_logger(__name__)

Phase = Literal["pretrain", "finetune"]
CHECKPOINTS = "checkpoints"
PROJECTOR_FILE = "mm_projector.safetensors"
# transformers' projector names -> LLaVA's (``model.mm_projector.{0,2}``, mlp2x_gelu).
LLAVA_PROJECTOR_KEYS = {
    "linear_1.weight": "model.mm_projector.0.weight",
    "linear_1.bias": "model.mm_projector.0.bias",
    "linear_2.weight": "model.mm_projector.2.weight",
    "linear_2.bias": "model.mm_projector.2.bias",
}
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


# A projector given as a pickle (LLaVA's own mm_projector.bin): never torch.load'ed.
_PICKLED_PROJECTOR = (
    "{path}: only a mm_projector.safetensors projector is read (a .bin is a pickle, which can run "
    "code when loaded): pass --from the llava-pretrain output directory, or convert the file with "
    "safetensors if you trust it"
)


class MissingInputError(FileNotFoundError):
    """A required input (tower, pretrained projector) is not where the config says."""


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
def demo_llava_dir(cfg: RunConfig, output_dir: Path) -> Path:
    """The demo world's LLaVA splits (written once, next to the run, when missing)."""
    from llm2clip_vlm.data.synthetic_llava import SPEC_VERSION, write_llava_demo

    root = Path(cfg.data.demo_dir) / "llava" if cfg.data.demo_dir else output_dir / "demo-llava"
    info = root / "llava_dataset.json"
    if info.is_file():
        spec = json.loads(info.read_text())
        if spec.get("seed") == cfg.data.demo_seed and spec.get("version") == SPEC_VERSION:
            return root
    log.info("writing the synthetic LLaVA demo data to %s", root)
    write_llava_demo(root, seed=cfg.data.demo_seed)
    return root


def phase_data(cfg: RunConfig, phase: Phase, output_dir: Path) -> tuple[Path, str, Path | None]:
    """``(records file, image folder, held-out file)`` of a phase."""
    p: LlavaPhaseConfig = getattr(cfg.llava, phase)
    if p.data.path:
        held = Path(p.data.heldout_path) if p.data.heldout_path else None
        return Path(p.data.path), p.data.image_folder, held
    root = demo_llava_dir(cfg, output_dir)
    if phase == "pretrain":
        # A caption-trained model is not asked questions: the demo's held-out questions measure
        # finetuning (their "before" is the pretrained model).
        held = Path(p.data.heldout_path) if p.data.heldout_path else None
        return root / "llava_pretrain.json", "", held
    held = Path(p.data.heldout_path) if p.data.heldout_path else root / "llava_heldout.json"
    return root / "llava_instruct.json", "", held


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------
def projector_state_for_llava(projector: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The projector's weights under LLaVA's names (usable as ``pretrain_mm_mlp_adapter``)."""
    return {
        LLAVA_PROJECTOR_KEYS[k]: v.detach().float().cpu().contiguous()
        for k, v in projector.state_dict().items()
    }


def load_projector(projector: torch.nn.Module, path: Path) -> None:
    """Load a projector from a ``mm_projector.safetensors`` (our names or LLaVA's), or a run directory.

    Only safetensors are read: a ``.bin`` is a pickle and is refused (load it yourself with
    ``torch.load(..., weights_only=True)`` and save it with safetensors if you trust it).
    """
    if path.is_dir():
        path = path / PROJECTOR_FILE
    if not path.is_file():
        raise MissingInputError(
            f"pretrained projector {path} does not exist: run `llm2clip-vlm llava-pretrain` first "
            "or set llava.finetune init with --from"
        )
    if path.suffix != ".safetensors":
        raise PickleRefusedError(_PICKLED_PROJECTOR.format(path=path))
    state = load_file(str(path))
    inverse = {v: k for k, v in LLAVA_PROJECTOR_KEYS.items()}
    state = {inverse.get(k, k): v for k, v in state.items()}
    projector.load_state_dict(state)


def check_inputs(cfg: RunConfig, phase: Phase, init: Path | None) -> None:
    """Fail before any loading when the tower or (finetuning) the pretrained projector is missing."""
    tower = cfg.llava.tower
    if not tower:
        raise MissingInputError(
            "llava.tower is not set: pass --tower DIR (an exported tower, e.g. the `tower/` folder "
            "that `llm2clip-vlm build-tower` writes) or set llava.tower in the recipe"
        )
    if not Path(tower.removeprefix("llm2clip:")).is_dir():
        raise MissingInputError(
            f"tower {tower} does not exist: build one with `llm2clip-vlm build-tower --output DIR` "
            "and pass --tower DIR/tower"
        )
    if phase == "finetune":
        if init is None:
            raise MissingInputError(
                "llava-finetune starts from a pretrained projector: pass --from DIR (a llava-pretrain "
                "output) or a mm_projector.safetensors file"
            )
        path = init / PROJECTOR_FILE if init.is_dir() else init
        if path.is_file() and path.suffix != ".safetensors":
            raise PickleRefusedError(_PICKLED_PROJECTOR.format(path=path))
        if not path.is_file():
            raise MissingInputError(
                f"pretrained projector {path} does not exist: run `llm2clip-vlm llava-pretrain` first "
                "or pass --from a mm_projector.safetensors file"
            )


def build_model(
    cfg: RunConfig, phase: Phase, init: Path | None, compute_dtype: torch.dtype
) -> tuple[Any, Any]:
    """The LLaVA model for ``phase`` with the right parts frozen, and its processor."""
    from llm2clip_vlm.llava.assemble import build_llava_model

    p: LlavaPhaseConfig = getattr(cfg.llava, phase)
    tower = cfg.llava.tower
    check_inputs(cfg, phase, init)
    quant = "4bit" if p.tune == "qlora" else "none"
    model, processor = build_llava_model(
        tower,
        cfg.llava.llm,
        vision_feature_layer=cfg.llava.vision_feature_layer,
        select_strategy=cfg.llava.select_strategy,
        dtype=torch.float32,
        quantization=quant,
        allow_pickle=cfg.reliability.allow_pickle_weights,
    )
    if init is not None:
        load_projector(model.model.multi_modal_projector, init)
        log.info("projector loaded from %s", init)
    model.requires_grad_(False)
    # Frozen parts need no fp32 master copy: keep them in the compute dtype (memory, speed).
    model.model.vision_tower.to(compute_dtype)
    if p.tune == "projector":
        model.model.language_model.to(compute_dtype)
        model.lm_head.to(compute_dtype)
    elif p.tune == "full":
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    else:  # lora / qlora
        from peft import LoraConfig, get_peft_model

        if quant == "none":
            model.model.language_model.to(compute_dtype)
            model.lm_head.to(compute_dtype)
        lora = LoraConfig(
            r=p.lora_r,
            lora_alpha=p.lora_alpha,
            lora_dropout=p.lora_dropout,
            target_modules=LORA_TARGETS,
            bias="none",
        )
        model = get_peft_model(model, lora)
    projector = _projector(model)
    projector.to(torch.float32).requires_grad_(True)
    if p.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        # The LLM's first layer input comes from frozen embeddings: its output must require grad
        # for non-reentrant checkpointing to build a graph back to the projector.
        _base(model).enable_input_require_grads()
    return model, processor


def _base(model: Any) -> Any:
    """The LlavaForConditionalGeneration under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _projector(model: Any) -> torch.nn.Module:
    return _base(model).model.multi_modal_projector


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    """Every trainable tensor by name (what a checkpoint stores)."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------------------------
# Optimiser and schedule
# --------------------------------------------------------------------------------------------
def param_groups(model: Any, p: LlavaPhaseConfig) -> list[dict[str, Any]]:
    """AdamW groups: (projector / LLM) x (decay / no decay on biases and norms)."""
    groups: dict[tuple[str, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = "projector" if "multi_modal_projector" in name else "llm"
        no_decay = param.ndim < 2
        lr = (p.projector_lr or p.lr) if part == "projector" else p.lr
        g = groups.setdefault(
            (part, no_decay),
            {"name": f"{part}.{'no_decay' if no_decay else 'decay'}", "params": [], "lr": lr,
             "weight_decay": 0.0 if no_decay else p.weight_decay},
        )  # fmt: skip
        g["params"].append(param)
    return list(groups.values())


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Linear warm-up from ``1/warmup``, then cosine to 0 at ``total`` (or constant)."""
    if step < warmup:
        # (step + 1) / warmup: full lr at the last warm-up step, as open_clip's and the LLM2CLIP
        # trainer's _warmup_lr (microsoft/LLM2CLIP llm2clip/training/scheduler.py:9-10).
        # transformers' schedule under LLaVA's Trainer is step / warmup, i.e. the same ramp one
        # step later, starting from lr 0.
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------
def token_loss_sum(model: Any, batch: Batch, device: torch.device) -> torch.Tensor:
    """Sum of next-token cross-entropies over the supervised tokens of a micro batch.

    Only positions that predict a supervised token in some row go through the LM head
    (``logits_to_keep``): image tokens, prompts and padding never need the vocabulary-wide logits,
    which are the largest activation of a step (``[B, T, vocab]``). The loss is unchanged.
    """
    targets = batch.labels[:, 1:]
    # Position p predicts token p + 1; keep the positions where any row has a target.
    keep = (targets != IGNORE_INDEX).any(0).nonzero().squeeze(1)
    if keep.numel() == 0:  # nothing supervised (all truncated away): a zero loss still in the graph
        keep = torch.zeros(1, dtype=torch.long)
    kwargs: dict[str, Any] = {
        "input_ids": batch.input_ids.to(device),
        "attention_mask": batch.attention_mask.to(device),
        "logits_to_keep": keep.to(device),
    }
    if batch.pixel_values is not None:
        kwargs["pixel_values"] = batch.pixel_values.to(device)
    logits = model(**kwargs).logits  # [B, len(keep), vocab]
    labels = targets[:, keep].to(device)
    return F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
@dataclass
class TrainState:
    step: int = 0
    seconds: float = 0.0
    world_size: int = 1
    losses: list[float] = field(default_factory=list)
    truncated: int = 0
    dropped: int = 0
    heldout_before: dict[str, Any] = field(default_factory=dict)
    skipped_steps: list[int] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------
def _merged_model(cfg: RunConfig, phase: Phase, model: Any, init: Path | None) -> Any:
    """A plain LlavaForConditionalGeneration with the LoRA merged (full precision for QLoRA)."""
    p: LlavaPhaseConfig = getattr(cfg.llava, phase)
    if p.tune in ("projector", "full"):
        return model
    if p.tune == "lora":
        return model.merge_and_unload()
    # QLoRA: merging into 4-bit weights would re-quantize them; rebuild the base in full precision,
    # load the adapters and the projector into it, merge there.
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    adapters = get_peft_model_state_dict(model, save_embedding_layers=False)  # no embedding LoRA
    projector = {k: v.detach().clone() for k, v in _projector(model).state_dict().items()}
    from llm2clip_vlm.llava.assemble import build_llava_model

    base, _ = build_llava_model(
        cfg.llava.tower, cfg.llava.llm, vision_feature_layer=cfg.llava.vision_feature_layer,
        select_strategy=cfg.llava.select_strategy, dtype=torch.float32,
        allow_pickle=cfg.reliability.allow_pickle_weights,
    )  # fmt: skip
    fresh = get_peft_model(base, model.peft_config["default"])
    set_peft_model_state_dict(fresh, adapters)
    merged = fresh.merge_and_unload()
    merged.model.multi_modal_projector.load_state_dict(projector)
    return merged


def save_llava(
    model: Any, processor: Any, out: Path, template: str, system: str | None, dtype: torch.dtype
) -> None:
    """``out``: the model in transformers' LLaVA format + processor + which template it learnt."""
    model = model.to(dtype)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    if template == "vicuna_v1":
        # transformers (lmms-eval, serving engines) then build the prompt the model was trained on.
        processor.chat_template = VICUNA_V1_JINJA
    processor.save_pretrained(out)
    info = {
        "template": template,
        "system": system if system is not None else (VICUNA_SYSTEM if template == "vicuna_v1" else ""),
    }
    (out / TEMPLATE_FILE).write_text(json.dumps(info, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------
def run_llava(
    cfg: RunConfig,
    output_dir: str | Path,
    phase: Phase,
    init: str | Path | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """``llava-pretrain`` / ``llava-finetune``: train one phase into ``output_dir``.

    Args:
        cfg: the run config (``cfg.llava``).
        output_dir: the run directory (resumes from its checkpoint).
        phase: ``pretrain`` (projector only) or ``finetune``.
        init: the pretrained projector (a ``llava-pretrain`` output or a ``mm_projector.safetensors``);
            required for ``finetune``.
        on_step: called as ``on_step(step, loss)`` after every optimizer step (main process).

    Returns:
        The metrics written to ``metrics.json`` (empty on non-main processes).
    """
    from accelerate.utils import set_seed

    from llm2clip_vlm.llava.evaluate import answer_questions, is_correct, score
    from llm2clip_vlm.vision.train import _make_accelerator, _time_up

    p: LlavaPhaseConfig = getattr(cfg.llava, phase)
    out = Path(output_dir)
    init_path = Path(init) if init else None
    mixed = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[p.precision]
    compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[p.precision]
    from accelerate import Accelerator

    accelerator = _make_accelerator(Accelerator, mixed)
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    check_inputs(cfg, phase, init_path)
    data_file, image_folder, heldout_file = phase_data(cfg, phase, out)
    bad = BadRecords(
        p.data.skip_bad, p.data.max_bad_fraction, name=data_file.name, option=f"llava.{phase}.data.skip_bad"
    )
    records = load_llava_records(
        data_file, image_folder, max_samples=p.data.max_samples, skip_bad=p.data.skip_bad,
        max_bad_fraction=p.data.max_bad_fraction, bad=bad, verify_images=p.data.verify_images,
        check_workers=p.data.check_workers,
    )  # fmt: skip
    heldout: list[LlavaRecord] = []
    if heldout_file is not None and heldout_file.is_file():
        heldout = load_llava_records(
            heldout_file, max_samples=p.data.heldout_max_samples, skip_bad=p.data.skip_bad,
            max_bad_fraction=p.data.max_bad_fraction, verify_images=p.data.verify_images,
            check_workers=p.data.check_workers,
        )  # fmt: skip
    if main:  # only once the inputs are known to be usable (a refused run leaves no config.yaml)
        out.mkdir(parents=True, exist_ok=True)
        configuration.dump(cfg, out / "config.yaml")

    set_seed(p.seed)
    model, processor = build_model(cfg, phase, init_path, compute_dtype)
    base = _base(model)
    tokenizer = processor.tokenizer
    image_token_id = base.config.image_token_index
    image_seq_length = base.config.image_seq_length
    system = cfg.llava.system_prompt or None
    if p.micro_batch_size <= 0:
        raise ValueError(f"llava.{phase}.micro_batch_size must be positive, got {p.micro_batch_size}")
    if p.batch_size % world:
        raise ValueError(
            f"llava.{phase}.batch_size {p.batch_size} must be divisible by the {world} processes"
        )
    deepspeed = _setup_deepspeed(accelerator, p, phase, world)

    dataset = LlavaDataset(
        records, tokenizer, processor.image_processor, p.template, image_token_id, image_seq_length,
        p.max_length, p.image_aspect_ratio, system, skip_bad=p.data.skip_bad,
    )  # fmt: skip
    is_image = [r.has_image for r in records]
    probe = ModalityBatchSampler(
        is_image, p.batch_size, 0, world, p.seed, 0, 1, p.group_by_modality, full_batches_only=deepspeed
    )
    total_steps = p.max_steps or max(1, int(p.epochs * probe.steps_per_epoch))
    warmup = int(math.ceil(p.warmup_ratio * total_steps))

    checkpointer = Checkpointer(out / CHECKPOINTS, accelerator, keep=2)
    # Weights and state now, optimizer and scheduler after prepare; each rank slices the global
    # batch, so only the same number of processes continues the same run.
    resumed = checkpointer.load(same_world_size=True)
    state = TrainState(world_size=world)
    if resumed is not None:
        state = TrainState(**resumed.state)
        missing = set(trainable_state(model)) - set(resumed.weights)
        if missing:
            raise ValueError(
                f"{resumed.path} does not match this model: no weights for {sorted(missing)[:3]}"
            )
        model.load_state_dict(resumed.weights, strict=False)
        log.info("llava %s: resuming from %s at step %d", phase, resumed.path, state.step)

    groups = param_groups(model, p)
    optimizer = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "name"} for g in groups], lr=p.lr, betas=(0.9, 0.999), eps=1e-8
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup, total_steps, p.lr_schedule)
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    if resumed is not None:
        checkpointer.load(resumed.path, optimizer=optimizer, scheduler=scheduler, with_weights=False)
    raw = accelerator.unwrap_model(model)

    n_train = sum(t.numel() for t in raw.parameters() if t.requires_grad)
    n_all = sum(t.numel() for t in raw.parameters())
    log.info(
        "llava %s: tune=%s, template %s; trains %.2fM of %.1fM parameters (tower frozen); %d records "
        "(%d with images), %d steps of %d (micro %d x %d processes), %s",
        phase, p.tune, p.template, n_train / 1e6, n_all / 1e6, len(records), sum(is_image), total_steps,
        p.batch_size, p.micro_batch_size, world, p.precision,
    )  # fmt: skip

    def run_heldout() -> dict[str, Any]:
        if not heldout or not main:
            return {}
        preds = answer_questions(
            raw, tokenizer, processor.image_processor, heldout, template=p.template,
            image_token_id=image_token_id, image_seq_length=image_seq_length,
            image_aspect_ratio=p.image_aspect_ratio, system=system, max_new_tokens=p.eval_max_new_tokens,
            batch_size=p.eval_batch_size, device=accelerator.device, autocast=accelerator.autocast,
        )  # fmt: skip
        result = score(heldout, preds)
        result["examples"] = [
            {"question": r.conversations[0]["value"], "answer": r.extra.get("answer"), "prediction": pr,
             "question_type": r.extra.get("question_type", ""), "image": str(r.image) if r.image else None,
             "correct": is_correct(pr, str(r.extra.get("answer", r.conversations[1]["value"])),
                                   str(r.extra.get("question_type", "")))}
            for r, pr in list(zip(heldout, preds, strict=True))[:8]
        ]  # fmt: skip
        return result

    if heldout and not state.heldout_before and world == 1:
        state.heldout_before = run_heldout()
        log.info(
            "held-out accuracy before: %.1f%% (%d questions)", state.heldout_before["accuracy"], len(heldout)
        )

    tracker = RunTracker.start(
        out, cfg.tracking, stage=f"llava-{phase}", main=main, resume_step=state.step if resumed else None,
        config=configuration.to_dict(cfg),
    )  # fmt: skip
    if state.heldout_before:
        tracker.log(0, {"heldout": state.heldout_before})

    sampler = ModalityBatchSampler(
        is_image, p.batch_size, rank, world, p.seed, state.step, total_steps, p.group_by_modality,
        full_batches_only=deepspeed,
    )  # fmt: skip
    loader = DataLoader(
        dataset, batch_sampler=sampler, num_workers=p.num_workers, collate_fn=Collator(tokenizer.pad_token_id),
        pin_memory=torch.cuda.is_available(),
    )  # fmt: skip
    model.train()
    start_time = time.perf_counter() - state.seconds
    samples_seen, loop_start = 0, time.perf_counter()
    rel = cfg.reliability
    guard = NonFiniteGuard(
        f"llava {phase}", rel.skip_nonfinite_steps, rel.max_skipped_steps, list(state.skipped_steps)
    )
    with make_progress(disable=not main) as progress, GracefulExit() as signals:
        task = progress.add_task(f"llava {phase}", total=total_steps, completed=state.step, status="")
        for batch in loader:
            if resumed is not None:  # after the loader started: RNG exactly as after the saved step
                resumed.restore_rng()
                resumed = None
            state.truncated += batch.truncated
            state.dropped += batch.dropped
            # Supervised tokens of the whole global batch: the loss's denominator (module docstring).
            # (and all input tokens, for the tokens/s the tracker logs)
            n_tokens = accelerator.reduce(
                torch.tensor(
                    [batch.num_supervised, int(batch.attention_mask.sum())], device=accelerator.device
                ),
                "sum",
            )
            denom = max(1.0, float(n_tokens[0].item()))
            step_loss = torch.zeros((), device=accelerator.device)
            micro = batch.split(p.micro_batch_size) if len(batch) else []
            for k, mb in enumerate(micro):
                sync = k == len(micro) - 1
                if deepspeed:
                    # DeepSpeed accumulates itself and steps at the boundary we mark; it divides
                    # the loss by its accumulation count, which the scale below undoes.
                    accelerator.gradient_state._set_sync_gradients(sync)
                    scale = (
                        world
                        * accelerator.state.deepspeed_plugin.deepspeed_config["gradient_accumulation_steps"]
                    )
                    ctx = nullcontext()
                else:
                    scale = world  # DDP averages gradients over processes
                    ctx = accelerator.no_sync(model) if not sync and world > 1 else nullcontext()
                with ctx, accelerator.autocast():
                    loss = token_loss_sum(model, mb, accelerator.device) / denom
                accelerator.backward(loss * scale)
                step_loss += loss.detach()
            # Under DeepSpeed, clipping and the update happened in backward (gradient_clipping).
            grad_norm = (
                accelerator.clip_grad_norm_(model.parameters(), p.grad_clip)
                if p.grad_clip > 0 and not deepspeed
                else None
            )
            global_loss = float(accelerator.reduce(step_loss, reduction="sum"))
            # Non-finite loss or gradients: stop naming the step, or skip the update when asked.
            if guard.check(global_loss, state.step + 1, grad_norm):
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.skipped_steps = list(guard.skipped)
            state.step += 1
            state.losses.append(global_loss)
            state.seconds = time.perf_counter() - start_time
            samples_seen += p.batch_size
            rate = samples_seen / max(time.perf_counter() - loop_start, 1e-9)
            progress.update(task, completed=state.step, status=f"loss {global_loss:.4f} {rate:.1f} samples/s")
            if on_step is not None and main:
                on_step(state.step, global_loss)
            stop = state.step >= total_steps or _time_up(accelerator, p.max_seconds, state.seconds)
            interrupted = signals.should_stop(accelerator)
            tracker.train_step(
                state.step, loss=global_loss, lr=scheduler.get_last_lr()[0], grad_norm=grad_norm,
                samples=p.batch_size, tokens=int(n_tokens[1].item()), last=stop or interrupted,
            )  # fmt: skip
            if (p.save_every_steps > 0 and state.step % p.save_every_steps == 0) or stop or interrupted:
                full = accelerator.get_state_dict(model)  # collective under FSDP: every rank calls it
                names = {n for n, t in raw.named_parameters() if t.requires_grad}
                weights = {n: t.detach().cpu().contiguous() for n, t in (full or {}).items() if n in names}
                checkpointer.save(
                    state.step, weights=weights if main else None, optimizer=optimizer,
                    scheduler=scheduler, state=asdict(state),
                )  # fmt: skip
            signals.raise_if_requested(accelerator, checkpointer.latest())
            if stop:
                break

    after = run_heldout() if world == 1 else {}
    if after:
        tracker.log(state.step, {"heldout": after})
        from llm2clip_vlm.data.images import load_rgb
        from llm2clip_vlm.tracking.gallery import write_answer_gallery

        write_answer_gallery(out, after["examples"], lambda path: load_rgb(str(path), str(path)))
        log.info(
            "held-out accuracy after: %.1f%% (before %.1f%%)",
            after["accuracy"],
            state.heldout_before.get("accuracy", float("nan")),
        )
    metrics: dict[str, Any] = {}
    if main:
        k = max(1, min(10, len(state.losses) // 5))
        metrics = {
            "phase": phase,
            "tune": p.tune,
            "template": p.template,
            "steps": state.step,
            "total_steps": total_steps,
            "train_seconds": round(state.seconds, 2),
            "samples_per_second": round(samples_seen / max(time.perf_counter() - loop_start, 1e-9), 3),
            "first_loss": state.losses[0] if state.losses else None,
            "final_loss": state.losses[-1] if state.losses else None,
            # Means over the first/last k steps: single steps are noisy.
            "loss_start_mean": sum(state.losses[:k]) / k if state.losses else None,
            "loss_end_mean": sum(state.losses[-k:]) / k if state.losses else None,
            "losses": state.losses,
            "records": len(records),
            "truncated_samples": state.truncated,
            "dropped_samples": state.dropped,
            "bad_records": {
                "count": len(bad.skipped),
                "records": [{"record": w, "reason": r} for w, r in bad.skipped],
            },
            "heldout_before": state.heldout_before,
            "heldout_after": after,
            "trainable_parameters": n_train,
            "processes": world,
        }
        final = _merged_model(cfg, phase, raw, init_path)
        save_dtype = torch.float32 if p.precision == "fp32" else compute_dtype
        save_llava(final, processor, out / "model", p.template, system, save_dtype)
        projector_state = projector_state_for_llava(final.model.multi_modal_projector)
        save_file(projector_state, str(out / PROJECTOR_FILE))
        # LLaVA's `--pretrain_mm_mlp_adapter` reads a torch.save file: a plain dict of tensors,
        # which `torch.load(weights_only=True)` loads without unpickling any code.
        torch.save(projector_state, out / "mm_projector.bin")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        from llm2clip_vlm.hub.cards import llava_card  # the hub model card of model/

        card = llava_card(cfg, phase, metrics, out, init_path, data_file, heldout_file)
        (out / "model" / "README.md").write_text(card)
        write_report(out, data_file.name, len(records) + len(bad.skipped), bad.skipped)
    tracker.finish()
    accelerator.wait_for_everyone()
    return metrics


def _setup_deepspeed(accelerator: Any, p: LlavaPhaseConfig, phase: str, world: int) -> bool:
    """Fill the DeepSpeed config from the phase (micro batch, accumulation, clipping); False if
    DeepSpeed is not in use.

    DeepSpeed needs a fixed number of micro batches per step, so ``batch_size`` must split into
    ``micro_batch_size`` x processes x an integer; a non-finite step cannot be skipped there (the
    update happens inside ``backward``), only stopped.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return False
    local = p.batch_size // world
    if local % p.micro_batch_size:
        raise ValueError(
            f"llava.{phase}: under DeepSpeed batch_size/processes ({local}) must be a multiple of "
            f"micro_batch_size ({p.micro_batch_size})"
        )
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = p.micro_batch_size
    ds["gradient_accumulation_steps"] = local // p.micro_batch_size
    ds["train_batch_size"] = p.batch_size
    ds["gradient_clipping"] = p.grad_clip if p.grad_clip > 0 else 0.0
    return True
