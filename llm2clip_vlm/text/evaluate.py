"""Stage 1's evaluation: CRA of the model before and after training (:mod:`llm2clip_vlm.text.cra`).

CRA before training depends only on the base model, the caption pairs and the encoding settings,
so it is computed once per run directory and read back by a resumed run (``cra_before.json``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from torch import nn

from llm2clip_vlm.logging import get_logger
from llm2clip_vlm.text.config import Stage1Config
from llm2clip_vlm.text.cra import caption_retrieval_accuracy
from llm2clip_vlm.text.encoder import CaptionEncoder
from llm2clip_vlm.text.pooling import resolve_caption_template
from llm2clip_vlm.training.optim import DTYPES

log = get_logger(__name__)

CRA_BEFORE = "cra_before.json"


def cached_cra_before(
    decoder: nn.Module, tokenizer: Any, s: Stage1Config, pairs: list[tuple[str, str]], out: Path
) -> float:
    """CRA of the untrained model, computed once per run directory: a resumed run reads it back
    (it depends only on the base model, the caption pairs and the encoding settings)."""
    key = hashlib.sha256(
        json.dumps(
            [
                s.model,
                s.adapters,
                s.max_length,
                s.pad_to_multiple_of,
                s.loop.precision,
                s.caption_template,
                pairs,
            ]
        ).encode()
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
    cra = cra_of(decoder, tokenizer, s, pairs)
    cached.write_text(json.dumps({"key": key, "cra": cra}) + "\n")
    return cra


def cra_of(decoder: nn.Module, tokenizer: Any, s: Stage1Config, pairs: list[tuple[str, str]]) -> float:
    """CRA (percent, 2 decimals) of ``decoder`` mean-pooled as the stage-1 encoder, on ``pairs``."""
    encoder = CaptionEncoder(
        decoder,
        tokenizer,
        s.max_length,
        pad_to_multiple_of=s.pad_to_multiple_of,
        caption_template=resolve_caption_template(s.caption_template, tokenizer),
    )
    if s.loop.precision != "fp32":
        encoder.autocast_dtype = DTYPES[s.loop.precision]
    return round(caption_retrieval_accuracy(encoder, pairs, s.eval_batch_size), 2)
