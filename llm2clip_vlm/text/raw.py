"""The stage-1-free control: the base LLM, as it was pretrained, written as a CaptionEncoder.

The paper's ablation of stage 1 aligns the same vision encoder to caption embeddings of the raw
LLM (no caption-contrastive fine-tuning). :func:`write_raw_encoder` writes that embedder where
stage 1 writes its own (``<stage-1 dir>/encoder``), so ``embed`` and ``stage 2`` run unchanged:

- the weights are the base LLM's (``stage1.model``), with ``stage1.adapters`` merged as stage 1
  would start from them; nothing is trained;
- the attention stays causal, as pretrained: switching it to bidirectional without training is
  part of stage 1 (LLM2Vec's first step), and leaves a worse embedder (the demo's CRA before
  stage 1);
- captions are mean-pooled and wrapped and truncated exactly as stage 1's encoder does
  (``stage1.max_length``, ``caption_template``, the query instructions).

``metrics.json`` records the CRA of this embedder on the same held-out caption pairs stage 1 uses,
so the control's text side is measured like the real one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llm2clip_vlm.data.records import ImageCaptions
from llm2clip_vlm.logging import get_logger
from llm2clip_vlm.text.config import Stage1Config
from llm2clip_vlm.text.cra import caption_pairs, caption_retrieval_accuracy
from llm2clip_vlm.text.encoder import CaptionEncoder
from llm2clip_vlm.text.lora import merge_adapters
from llm2clip_vlm.text.modeling import load_causal, load_tokenizer, resolve_model_ref
from llm2clip_vlm.text.pooling import resolve_caption_template
from llm2clip_vlm.training.session import metrics_document, untrained_summary

log = get_logger(__name__)

# What the control's stage-1 folder says it holds (metrics.json, build-tower's fingerprint).
WITHOUT_STAGE1 = "base LLM as pretrained: causal attention, mean pooling, no training"


def write_raw_encoder(
    s: Stage1Config,
    output_dir: str | Path,
    heldout_records: Sequence[ImageCaptions],
    *,
    cra_info: dict[str, Any] | None = None,
    allow_pickle: bool = False,
) -> dict[str, Any]:
    """Write ``output_dir/encoder`` (the raw LLM as a CaptionEncoder) and ``output_dir/metrics.json``.

    Args:
        s: the ``stage1`` section (base model, adapters, caption encoding settings, CRA size).
        output_dir: the stage-1 folder of the run.
        heldout_records: held-out images with >= 2 short captions each (for CRA).
        cra_info: where the CRA pairs come from, for ``metrics.json``.
        allow_pickle: accept ``pytorch_model.bin`` base weights.

    Returns:
        The metrics written to ``metrics.json`` (stage 1's schema: ``eval.after`` is this embedder's CRA).
    """
    out = Path(output_dir)
    start = time.perf_counter()
    ref = resolve_model_ref(s.model)
    tokenizer = load_tokenizer(ref)
    model = load_causal(ref, attn_implementation=s.attn_implementation, allow_pickle=allow_pickle)
    merge_adapters(model, s.adapters)
    encoder = CaptionEncoder(
        model, tokenizer, s.max_length,
        {"short_query": s.instruction_short_query, "long_query": s.instruction_long_query},
        s.pooling, s.pad_to_multiple_of,
        caption_template=resolve_caption_template(s.caption_template, tokenizer),
        attention="causal",
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    encoder.save_pretrained(out / "encoder")
    pairs = caption_pairs(heldout_records, s.cra_captions)
    cra = round(caption_retrieval_accuracy(encoder, pairs, s.eval_batch_size), 2)
    log.info("without stage 1: %s; CRA %.1f over %d captions", WITHOUT_STAGE1, cra, 2 * len(pairs))
    # Stage 1's schema, so tables and the build's summary read alike: nothing trained, CRA as is.
    cra_eval = {"metric": "cra", "before": cra, "after": cra, "captions": 2 * len(pairs), **(cra_info or {})}
    own = {
        "without_stage1": WITHOUT_STAGE1,
        "encoder": str(out / "encoder"),
        "encoder_identity": encoder.identity(),
    }
    metrics = metrics_document("stage1", untrained_summary(time.perf_counter() - start), cra_eval, own)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
