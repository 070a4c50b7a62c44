"""Masked next-token prediction (MNTP), LLM2Vec's optional warm-up before SimCSE.

~20% of the tokens are masked by transformers' ``DataCollatorForLanguageModeling`` (a tokenizer
without a mask token uses ``_``, as LLM2Vec does). [IMPORTANT] The label of a masked position i is
predicted from the output at i-1: the causal-LM shift is kept, which is exactly what a
``*ForCausalLM`` computes when given ``labels``; only the attention is bidirectional.
Captions are mixed and shuffled with a plain-text corpus at ``data.text_corpus_ratio``.
"""

from __future__ import annotations

import glob
import random
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerBase

from llm2clip_vlm.text.config import MNTPConfig

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


def mntp_optimizer(
    params: Sequence[nn.Parameter], m: MNTPConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW and its schedule as the reference's HF Trainer defaults: weight decay ``m.weight_decay``
    (0), linear decay to 0 at ``m.steps`` after ``m.warmup_steps`` (``m.lr_schedule``). The
    caller clips gradients at ``m.max_grad_norm`` (1.0)."""
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(params, lr=m.lr, weight_decay=m.weight_decay)
    kind = "constant_with_warmup" if m.lr_schedule == "constant" else m.lr_schedule
    return optimizer, get_scheduler(kind, optimizer, m.warmup_steps, m.steps)


def mntp_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the label at masked position i against the logits at position i-1."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def read_text_corpus(paths: Sequence[str], min_chars: int = 20) -> list[str]:
    """Lines of plain-text files (files, directories of ``.txt``, or globs); short lines dropped."""
    files: list[Path] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            files += sorted(path.rglob("*.txt"))
        elif path.is_file():
            files.append(path)
        else:
            matched = sorted(Path(m) for m in glob.glob(p))
            if not matched:
                raise FileNotFoundError(f"text corpus {p!r} matches no file")
            files += matched
    lines = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"text corpus file {f} is not UTF-8 text ({e})") from e
        lines += [ln.strip() for ln in text.splitlines() if len(ln.strip()) >= min_chars]
    return lines


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
