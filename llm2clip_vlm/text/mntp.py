"""Masked next-token prediction (MNTP), LLM2Vec's optional warm-up before SimCSE.

~20% of the tokens are masked by transformers' ``DataCollatorForLanguageModeling`` (a tokenizer
without a mask token uses ``_``, as LLM2Vec does). [IMPORTANT] The label of a masked position i is
predicted from the output at i-1: the causal-LM shift is kept, which is exactly what a
``*ForCausalLM`` computes when given ``labels``; only the attention is bidirectional.
Captions are mixed and shuffled with a plain-text corpus at ``data.text_corpus_ratio``.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerBase

from llm2clip_vlm.reliability import ReliabilityConfig
from llm2clip_vlm.text.config import Stage1Config
from llm2clip_vlm.text.lora import adapter_state, load_adapter, wrap_lora
from llm2clip_vlm.training.config import LoopConfig
from llm2clip_vlm.training.loop import Run, Stage, StepOutput
from llm2clip_vlm.training.optim import adamw, make_scheduler

BLANK_MASK_TOKEN = "_"


def mntp_collator(
    tokenizer: PreTrainedTokenizerBase, mlm_probability: float = 0.2, pad_to_multiple_of: int | None = 16
) -> DataCollatorForLanguageModeling:
    """The masking collator; gives the tokenizer a ``_`` mask token when it has none."""
    if tokenizer.mask_token is None:
        tokenizer.mask_token = BLANK_MASK_TOKEN
    return DataCollatorForLanguageModeling(
        tokenizer, mlm=True, mlm_probability=mlm_probability, pad_to_multiple_of=pad_to_multiple_of
    )


def mntp_loop(s: Stage1Config) -> LoopConfig:
    """MNTP's loop: ``stage1.mntp.loop`` run at ``stage1.loop``'s precision and distribution (one
    accelerator runs both).

    The reference runs MNTP on the HF Trainer with its defaults (warm-up ``step / warmup`` from lr
    0, linear decay to 0, clip 1.0, weight decay 0; see :class:`~llm2clip_vlm.text.config.MNTPConfig`).
    No time budget: MNTP always finishes, so SimCSE starts from the same merged model.

    Raises:
        ValueError: ``stage1.mntp.loop.max_seconds`` is set.
    """
    if s.mntp.loop.max_seconds > 0:
        raise ValueError(
            "stage1.mntp.loop.max_seconds must be 0: MNTP always finishes, so SimCSE starts from the same "
            "model (give stage1.loop.max_seconds a budget instead)"
        )
    return dataclasses.replace(s.mntp.loop, precision=s.loop.precision, distributed=s.loop.distributed)


def mntp_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the label at masked position i against the logits at position i-1."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def mix_texts(captions: Sequence[str], corpus: Sequence[str], ratio: float, n: int, seed: int) -> list[str]:
    """``n`` MNTP samples: a share ``ratio`` drawn from the text corpus, the rest captions, shuffled."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"data.text_corpus_ratio must be in [0, 1], got {ratio}")
    if ratio > 0 and not corpus:
        raise ValueError("data.text_corpus_ratio > 0 but data.text_corpus gave no text")
    rng = random.Random(seed)
    n_corpus = round(n * ratio)
    out = [rng.choice(corpus) for _ in range(n_corpus)] + [rng.choice(captions) for _ in range(n - n_corpus)]
    rng.shuffle(out)
    return out


def mntp_step_loss(
    model: nn.Module, collator: DataCollatorForLanguageModeling, texts: list[str], max_length: int
) -> torch.Tensor:
    """Mask a batch of texts and return the MNTP loss of ``model`` (a ``*ForCausalLM``) on it."""
    tok = collator.tokenizer
    features = [tok(t, truncation=True, max_length=max_length) for t in texts]
    batch = collator(features)
    device = next(model.parameters()).device
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    return mntp_loss(out.logits, batch["labels"].to(device))


def train_mntp(
    model: nn.Module,
    tokenizer: Any,
    s: Stage1Config,
    captions: Sequence[str],
    corpus: Sequence[str],
    corpus_ratio: float,
    checkpoints: Path,
    accelerator: Any,
    reliability: ReliabilityConfig,
) -> nn.Module:
    """MNTP with its own LoRA on the causal-LM model; the LoRA is merged before SimCSE (as LLM2Vec).

    Runs on the one loop (:func:`mntp_loop`) and is checkpointed under ``checkpoints``, including once at its end, so a run
    killed later never redoes it. Masking draws from the torch RNG, which the checkpoints carry.
    """
    m = s.mntp
    loop = mntp_loop(s)
    collator = mntp_collator(tokenizer, m.mlm_probability, s.pad_to_multiple_of)
    lm = wrap_lora(model, s)
    trainable = [p for p in lm.parameters() if p.requires_grad]
    optimizer = adamw(trainable, m.lr, accelerator.device, weight_decay=m.weight_decay, fused=None)
    scheduler = make_scheduler(optimizer, loop, loop.max_steps)
    run = Run("stage1 MNTP", loop, checkpoints, accelerator, skip_nonfinite=reliability.skip_nonfinite_steps,
              max_skipped=reliability.max_skipped_steps)  # fmt: skip
    if run.resumed_weights is not None:
        load_adapter(lm, run.resumed_weights)
    ddp_lm, optimizer = run.prepare(lm, optimizer, scheduler)
    rank, world = accelerator.process_index, accelerator.num_processes
    local = max(1, m.batch_size // world)

    def batches() -> Iterator[list[str]]:
        for k in range(run.state.step, loop.max_steps):
            texts = mix_texts(captions, corpus, corpus_ratio, m.batch_size, seed=s.seed * 100_003 + k)
            yield texts[rank * local : (rank + 1) * local]

    def step(texts: list[str]) -> StepOutput:
        with accelerator.autocast():
            loss = mntp_step_loss(ddp_lm, collator, texts, s.max_length)
        accelerator.backward(loss)
        return StepOutput(round(float(accelerator.reduce(loss.detach(), "mean")), 6))

    def weights() -> dict[str, torch.Tensor] | None:
        return adapter_state(lm) if accelerator.is_main_process else None

    stage = Stage("stage 1 MNTP", ddp_lm, optimizer, scheduler, step, weights, ddp_lm.parameters,
                  samples_per_step=m.batch_size, unit="texts")  # fmt: skip
    run.train(stage, batches(), loop.max_steps)
    merged = accelerator.unwrap_model(ddp_lm).merge_and_unload()
    accelerator.free_memory()
    return merged
