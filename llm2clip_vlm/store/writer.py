"""Writing the caption embedding store: every caption encoded once, shard by shard.

[IMPORTANT] Resuming must give the same bytes as an uninterrupted run. That holds because a shard's
content depends only on its rows (its batches are formed inside the shard, by token length), each
shard is written under a temp name and renamed when complete, and nothing time- or rank-dependent
is written into the store. A resumed run keeps every shard whose sidecar matches the plan and whose
checksum is intact, and recomputes the rest.

Multi-process: rank r encodes a contiguous share of the shards; rank 0 writes the manifest after a
barrier (so the manifest's presence means every shard is there).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from llm2clip_vlm.data.records import ImageCaptions
from llm2clip_vlm.identity import file_sha256
from llm2clip_vlm.logging import get_logger
from llm2clip_vlm.progress import make_progress
from llm2clip_vlm.store import format as fmt
from llm2clip_vlm.store.config import EmbedConfig
from llm2clip_vlm.store.reader import StoreConflictError

log = get_logger(__name__)

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


class Encoder(Protocol):
    """What the store needs of an embedder (:class:`llm2clip_vlm.text.encoder.CaptionEncoder`)."""

    tokenizer: Any
    max_length: int

    @property
    def hidden_size(self) -> int: ...

    def identity(self) -> str: ...

    def encode(
        self, texts: list[str], batch_size: int = 64, instruction: str | None = None
    ) -> torch.Tensor: ...


def write_store(
    encoder: Encoder,
    captions: Sequence[ImageCaptions],
    out_dir: str | Path,
    cfg: EmbedConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> Path:
    """Encode every caption of ``captions`` into a store at ``out_dir`` (resuming if one is there).

    Args:
        encoder: a stage-1 caption encoder (frozen; only ``encode``/``tokenizer`` are used).
        captions: the data set, in order; rows follow it (image 0's captions, then image 1's, ...).
        out_dir: the store directory.
        cfg: dtype, batch size, shard size, bucketing and compute precision.
        rank: this process's rank (each rank writes its own contiguous share of shards).
        world_size: number of processes; > 1 needs an initialised ``torch.distributed`` group.

    Returns:
        ``out_dir`` (complete, with ``manifest.json``, on every rank when this returns).

    Raises:
        StoreInputError: a caption is empty or not text (names the record).
        StoreConflictError: ``out_dir`` holds a store (or part of one) built from other inputs.
    """
    if world_size > 1 and not _dist_ready():
        raise RuntimeError(f"write_store with world_size={world_size} needs torch.distributed initialised")
    if cfg.batch_size <= 0:
        raise ValueError(f"embed.batch_size must be positive, got {cfg.batch_size}")
    out = Path(out_dir)
    table = fmt.caption_table(captions)
    plan = _plan(encoder, table, cfg)
    plan_sha = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()
    ranges = fmt.shard_ranges(table.num_rows, cfg.shard_size)

    # Every rank checks an existing plan before anyone writes, so a mismatch stops all ranks alike.
    _check_plan(out, plan)
    _barrier(world_size)
    (out / fmt.SHARD_DIR).mkdir(parents=True, exist_ok=True)
    if rank == 0 and not (out / fmt.PLAN).is_file():
        fmt.atomic_write_json(out / fmt.PLAN, plan)

    mine = fmt.rank_shards(len(ranges), rank, world_size)
    _encode_shards(encoder, table, out, cfg, plan_sha, ranges, mine, rank)
    _barrier(world_size)
    if rank == 0:
        _write_manifest(out, table, plan, plan_sha, ranges)
    _barrier(world_size)
    return out


# --------------------------------------------------------------------------------------------
# Plan: what the store is built from; a resumed run must match it exactly
# --------------------------------------------------------------------------------------------
def _plan(encoder: Encoder, table: fmt.CaptionTable, cfg: EmbedConfig) -> dict[str, Any]:
    if cfg.dtype not in fmt.STORAGE_DTYPES:
        raise ValueError(f"embed.dtype {cfg.dtype!r} is not one of {list(fmt.STORAGE_DTYPES)}")
    return {
        "format": fmt.FORMAT,
        "version": fmt.VERSION,
        "encoder_identity": encoder.identity(),
        "pooling": getattr(encoder, "pooling", "mean"),
        "dim": int(encoder.hidden_size),
        "dtype": cfg.dtype,
        "precision": cfg.precision,
        "num_rows": table.num_rows,
        "num_images": table.num_images,
        "captions_sha256": fmt.array_sha256(table.hashes),
        "image_keys_sha256": fmt.array_sha256(table.key_hashes),
        # Batch composition changes float rounding, so it is part of what makes the bytes.
        "shard_size": cfg.shard_size,
        "batch_size": cfg.batch_size,
        "bucket_by_length": cfg.bucket_by_length,
        # Padding changes rounding too; recorded only when set, so the plans of stores written
        # before the setting existed (padded as their encoder) still match a resumed run.
        **({"pad_to_multiple_of": cfg.pad_to_multiple_of} if cfg.pad_to_multiple_of else {}),
    }


def _check_plan(out: Path, plan: dict[str, Any]) -> None:
    path = out / fmt.PLAN
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_bytes().decode("utf-8"))
    except ValueError as e:  # not UTF-8, or not JSON
        raise StoreConflictError(f"{path}: not valid JSON ({e}); remove {out} and rerun") from e
    if not isinstance(old, dict):
        raise StoreConflictError(f"{path}: not a store plan (a {type(old).__name__}); remove {out} and rerun")
    diffs = [
        f"{k}: {old.get(k)!r} there, {plan[k]!r} now"
        for k in plan
        if old.get(k) != plan[k] and k not in ("captions_sha256", "image_keys_sha256")
    ]
    if "pad_to_multiple_of" in old and "pad_to_multiple_of" not in plan:  # set then, unset now
        diffs.append(f"pad_to_multiple_of: {old['pad_to_multiple_of']!r} there, unset (0) now")
    if old.get("captions_sha256") != plan["captions_sha256"]:
        diffs.append("the captions differ")
    if old.get("image_keys_sha256") != plan["image_keys_sha256"]:
        diffs.append("the image keys differ")
    if diffs:
        raise StoreConflictError(
            f"{out} holds a store built from other inputs ({'; '.join(diffs)}); "
            "remove it or choose another output directory"
        )


# --------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------
def _sidecar(out: Path, index: int) -> Path:
    return out / fmt.shard_name(index).replace(".npy", ".json")


def shard_is_complete(out: Path, index: int, start: int, stop: int, plan_sha: str) -> dict[str, Any] | None:
    """The shard's sidecar if the shard is complete and intact for this plan, else None."""
    npy, side = out / fmt.shard_name(index), _sidecar(out, index)
    if not (npy.is_file() and side.is_file()):
        return None
    try:
        meta = json.loads(side.read_bytes().decode("utf-8"))
    except ValueError:  # not UTF-8, or not JSON: the shard is redone
        meta = None
    if not isinstance(meta, dict):
        log.warning("shard sidecar %s is damaged; recomputing shard %d", side, index)
        return None
    if (meta.get("plan"), meta.get("start"), meta.get("stop")) != (plan_sha, start, stop):
        return None
    if file_sha256(npy) != meta.get("sha256"):
        log.warning("shard %s is corrupt (checksum differs); recomputing it", npy)
        return None
    return meta


def _token_lengths(encoder: Encoder, texts: list[str]) -> tuple[list[int], int]:
    """``(token lengths as encoded, i.e. cut at max_length; how many captions were longer)``.

    One token past ``max_length`` is read to tell a cut caption from one that fits exactly.
    """
    limit = encoder.max_length
    ids = encoder.tokenizer(texts, truncation=True, max_length=limit + 1)["input_ids"]
    return [min(len(x), limit) for x in ids], sum(len(x) > limit for x in ids)


def bucket_batches(lengths: Sequence[int], batch_size: int, bucket: bool) -> list[list[int]]:
    """Batches of row positions: longest first when bucketing (similar lengths share a batch)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if bucket else list(range(len(lengths)))
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def to_storage(emb: torch.Tensor, dtype: str, where: str) -> np.ndarray:
    """Float32 embeddings -> the store's numpy dtype; refuses values the dtype cannot hold."""
    emb = emb.detach().float().cpu()
    if dtype == "fp32":
        arr = emb.numpy().astype("<f4")
    elif dtype == "fp16":
        arr = emb.to(torch.float16).numpy().astype("<f2")
    else:  # bf16: keep the raw bits (numpy has no bfloat16)
        arr = emb.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).astype("<u2")
    if not np.isfinite(fmt.to_float32(arr, dtype)).all():
        # fp16 tops out at 65504; an LLM's hidden states can exceed it.
        raise ValueError(f"{where}: embeddings are not finite in {dtype} (use embed.dtype=bf16 or fp32)")
    return arr


def _encode_shards(
    encoder: Encoder,
    table: fmt.CaptionTable,
    out: Path,
    cfg: EmbedConfig,
    plan_sha: str,
    ranges: list[tuple[int, int]],
    mine: range,
    rank: int,
) -> None:
    own_multiple = getattr(encoder, "pad_to_multiple_of", None)
    multiple = int(cfg.pad_to_multiple_of or own_multiple or 1)
    total = sum(ranges[i][1] - ranges[i][0] for i in mine)
    done_rows = real_tok = computed_tok = 0
    t0 = time.perf_counter()
    had_autocast = hasattr(encoder, "autocast_dtype")
    previous = getattr(encoder, "autocast_dtype", None)
    if had_autocast:
        encoder.autocast_dtype = _AUTOCAST[cfg.precision]  # type: ignore[attr-defined]
    # The encoder pads its batches as it was told; set for this pass and restored after it.
    repad = cfg.pad_to_multiple_of > 0 and hasattr(encoder, "pad_to_multiple_of")
    if repad:
        encoder.pad_to_multiple_of = multiple if multiple > 1 else None  # type: ignore[attr-defined]
    try:
        with make_progress(disable=rank != 0) as progress:
            task = progress.add_task(f"embed {out.name}", total=total, status="", unit="caption")
            for index in mine:
                start, stop = ranges[index]
                if shard_is_complete(out, index, start, stop, plan_sha) is not None:
                    progress.skip(task, stop - start)
                    continue
                texts = table.texts[start:stop]
                lengths, cut = _token_lengths(encoder, texts)
                emb = torch.empty(len(texts), encoder.hidden_size)
                shard_real = shard_computed = 0
                for batch in bucket_batches(lengths, cfg.batch_size, cfg.bucket_by_length):
                    emb[batch] = encoder.encode([texts[i] for i in batch], batch_size=len(batch)).float()
                    longest = max(lengths[i] for i in batch)
                    shard_real += sum(lengths[i] for i in batch)
                    shard_computed += len(batch) * multiple * math.ceil(longest / multiple)
                    done_rows += len(batch)
                    progress.advance(task, len(batch))
                    dt = max(time.perf_counter() - t0, 1e-9)
                    progress.update(
                        task,
                        status=f"{done_rows / dt:.1f} captions/s, {(real_tok + shard_real) / dt:.0f} tokens/s",
                    )
                arr = to_storage(emb, cfg.dtype, f"shard {index} (rows {start}-{stop - 1})")
                npy = out / fmt.shard_name(index)
                fmt.atomic_save_npy(npy, arr)
                # The sidecar goes last: a .npy without one is treated as incomplete and redone.
                fmt.atomic_write_json(
                    _sidecar(out, index),
                    {
                        "plan": plan_sha,
                        "start": start,
                        "stop": stop,
                        "sha256": file_sha256(npy),
                        "real_tokens": shard_real,
                        "computed_tokens": shard_computed,
                        "cut_captions": cut,
                    },
                )
                real_tok += shard_real
                computed_tok += shard_computed
    finally:
        if had_autocast:
            encoder.autocast_dtype = previous  # type: ignore[attr-defined]
        if repad:
            encoder.pad_to_multiple_of = own_multiple  # type: ignore[attr-defined]
    dt = time.perf_counter() - t0
    if done_rows:
        log.info(
            "embedded %d captions in %.1f s: %.1f captions/s, %.0f tokens/s, padding %.1f%% of computed tokens",
            done_rows, dt, done_rows / dt, real_tok / dt, 100 * (1 - real_tok / max(computed_tok, 1)),
        )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Manifest (rank 0, after every shard is there)
# --------------------------------------------------------------------------------------------
def _write_manifest(
    out: Path, table: fmt.CaptionTable, plan: dict[str, Any], plan_sha: str, ranges: list[tuple[int, int]]
) -> None:
    shards = []
    cut = 0
    for index, (start, stop) in enumerate(ranges):
        meta = shard_is_complete(out, index, start, stop, plan_sha)
        if meta is None:
            raise RuntimeError(
                f"{out / fmt.shard_name(index)} is missing or incomplete after all ranks finished"
            )
        shards.append(
            {
                "file": fmt.shard_name(index),
                "start": start,
                "stop": stop,
                "sha256": meta["sha256"],
                "real_tokens": meta["real_tokens"],
                "computed_tokens": meta["computed_tokens"],
            }
        )
        cut += int(meta.get("cut_captions", 0))
    fmt.atomic_save_npy(out / fmt.CAPTION_HASHES, table.hashes)
    fmt.atomic_save_npy(out / fmt.CAPTION_KINDS, table.kinds)
    fmt.atomic_save_npy(out / fmt.IMAGE_OFFSETS, table.offsets)
    fmt.atomic_save_npy(out / fmt.IMAGE_KEY_HASHES, table.key_hashes)
    real = sum(s["real_tokens"] for s in shards)
    computed = sum(s["computed_tokens"] for s in shards)
    manifest = dict(
        plan,
        shards=shards,
        tokens={
            "real": real,
            "computed": computed,
            "padding_share": round(1 - real / max(computed, 1), 6),
            # Captions longer than the encoder's max_length: embedded from their first tokens.
            "cut_captions": cut,
        },
    )
    if cut:
        log.warning(
            "store %s: %d of %d captions (%.2f%%) are longer than the encoder's max_length tokens and "
            "were embedded from their first tokens (the encoder's max_length, as stage 1 trained it)",
            out, cut, table.num_rows, 100 * cut / max(1, table.num_rows),
        )  # fmt: skip
    fmt.atomic_write_json(out / fmt.MANIFEST, manifest)
    log.info(
        "store %s: %d rows x %d (%s) in %d shards",
        out,
        table.num_rows,
        plan["dim"],
        plan["dtype"],
        len(shards),
    )


# --------------------------------------------------------------------------------------------
# Distributed helpers
# --------------------------------------------------------------------------------------------
def _dist_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()
