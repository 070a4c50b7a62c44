"""Throughput of ``embed`` and the padding that length bucketing saves (figures in docs/BENCHMARKS.md).

    python -m llm2clip_vlm.store.bench [--recipe R] [--images N] [--captions FILE.json] [--json]

Embeds the first N training images of the recipe's data (default: the embedded demo) twice, with
and without length bucketing, into throw-away stores, and reports captions/s, tokens/s (caption
tokens, and tokens the model actually computed, padding included) and the padding share. The
embedder is the recipe's stage-1 base LLM made bidirectional (throughput does not depend on
whether it was trained), or ``embed.encoder`` when that is set.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llm2clip_vlm.data.records import Caption, ImageCaptions
from llm2clip_vlm.store.config import EmbedConfig


def measure(
    encoder: Any, records: Sequence[ImageCaptions], cfg: EmbedConfig, work_dir: Path
) -> dict[str, Any]:
    """Write ``records`` into a fresh store with and without bucketing; time both.

    Returns:
        ``{"bucketed": {...}, "unbucketed": {...}}`` with captions, seconds, captions_per_s,
        tokens_per_s (caption tokens), computed_tokens_per_s and padding_share.
    """
    from llm2clip_vlm.store.store import EmbeddingStore, write_store

    # Warm-up: the first forward passes pay one-time costs (allocator, kernel selection).
    encoder.encode([c.text for r in records[:4] for c in r.captions], batch_size=cfg.batch_size)
    results: dict[str, Any] = {}
    for name, bucket in (("bucketed", True), ("unbucketed", False)):
        run_cfg = dataclasses.replace(cfg, bucket_by_length=bucket)
        t0 = time.perf_counter()
        path = write_store(encoder, records, work_dir / name, run_cfg)
        seconds = time.perf_counter() - t0
        store = EmbeddingStore.open(path, verify_checksums=False)
        tokens = store.manifest["tokens"]
        results[name] = {
            "captions": store.num_rows,
            "seconds": round(seconds, 2),
            "captions_per_s": round(store.num_rows / seconds, 2),
            "tokens_per_s": round(tokens["real"] / seconds, 1),
            "computed_tokens_per_s": round(tokens["computed"] / seconds, 1),
            "real_tokens": tokens["real"],
            "computed_tokens": tokens["computed"],
            "padding_share": tokens["padding_share"],
        }
    return results


def _load_captions(path: Path) -> list[ImageCaptions]:
    rows = json.loads(path.read_text())
    return [ImageCaptions(r["key"], "", [Caption(t, k) for t, k in r["captions"]]) for r in rows]


def _encoder(cfg: Any) -> Any:
    import torch

    from llm2clip_vlm.text.encoder import CaptionEncoder
    from llm2clip_vlm.text.modeling import load_bidirectional, load_tokenizer, resolve_model_ref

    if cfg.embed.encoder:
        return CaptionEncoder.from_pretrained(cfg.embed.encoder)
    ref = resolve_model_ref(cfg.stage1.model)
    model = load_bidirectional(ref, attn_implementation=cfg.stage1.attn_implementation, dtype=torch.float32)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    return CaptionEncoder(
        model, load_tokenizer(ref), cfg.stage1.max_length, pad_to_multiple_of=cfg.stage1.pad_to_multiple_of
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry point (see the module docstring)."""
    from llm2clip_vlm import configuration
    from llm2clip_vlm.cli import demo_recipe_path
    from llm2clip_vlm.config import RunConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", type=Path, default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--images", type=int, default=200, help="first N training images")
    p.add_argument("--captions", type=Path, default=None, help='JSON [{"key", "captions": [[text, kind]]}]')
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    cfg = configuration.load(RunConfig, args.recipe or demo_recipe_path(), args.overrides)
    with tempfile.TemporaryDirectory() as tmp:
        if args.captions:
            records = _load_captions(args.captions)
        else:
            from llm2clip_vlm.data import resolve_data

            records = list(resolve_data(cfg.data, Path(tmp))[0])
        records = records[: args.images]
        encoder = _encoder(cfg)
        results = measure(encoder, records, cfg.embed, Path(tmp))
    results["setup"] = {
        "model": cfg.embed.encoder or cfg.stage1.model,
        "images": len(records),
        "batch_size": cfg.embed.batch_size,
        "precision": cfg.embed.precision,
        "dtype": cfg.embed.dtype,
        "max_length": encoder.max_length,
        "pad_to_multiple_of": encoder.pad_to_multiple_of,
    }
    print(json.dumps(results, indent=2) if args.json else _table(results))
    return results


def _table(results: dict[str, Any]) -> str:
    lines = [json.dumps(results["setup"])]
    for name in ("bucketed", "unbucketed"):
        r = results[name]
        lines.append(
            f"{name:>10}: {r['captions']} captions in {r['seconds']} s = {r['captions_per_s']} captions/s, "
            f"{r['tokens_per_s']} tokens/s ({r['computed_tokens_per_s']} computed), "
            f"padding {100 * r['padding_share']:.1f}% of computed tokens"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
