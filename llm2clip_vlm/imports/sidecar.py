"""Read the official ``*_text_embeddings.tar`` side-cars into our embedding store.

The reference writes one side-car per image shard (microsoft/LLM2CLIP
``llm2clip/data/extract_embedding.py``): for ``x.tar`` it writes ``x_text_embeddings.tar``
(:35) with, per image key, the members ``<key>.shortSV_captions`` and ``<key>.longSV_captions``
(:12, :42-48), each the raw bytes of one float32 vector (``LLM2Vec.encode`` returns float32,
``llm2clip/llm2vec/llm2vec.py:410``; ``.numpy().tobytes()``, native byte order: little-endian on
the GPUs it ran on). The caption texts are not in the side-car: they are the ``shortSV_captions``
/ ``longSV_captions`` fields of ``<key>.json`` in the image shard (:26-28), read here with the same
reader stage 2 uses, so the store's caption hashes match stage 2's data exactly.

The store is ``OUT/train`` (the layout ``embed`` writes and stage 2 reads). Its encoder identity
is the given ``CaptionEncoder``'s (``--encoder``: the imported stage-1 LLM the side-cars were made
with), else a hash of the side-car files.
"""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llm2clip_vlm.data.captions import load_caption_set
from llm2clip_vlm.data.config import CaptionSetConfig
from llm2clip_vlm.imports.checkpoint import ImportRefused, read_json
from llm2clip_vlm.logging import get_logger
from llm2clip_vlm.store.config import EmbedConfig
from llm2clip_vlm.store.store import write_store
from llm2clip_vlm.text.encoder import ENCODER_FILE
from llm2clip_vlm.text.modeling import ModelRef, load_tokenizer

log = get_logger(__name__)

KEYS = ("shortSV_captions", "longSV_captions")  # extract_embedding.py:12
KINDS = {"shortSV_captions": "short", "longSV_captions": "long"}
SUFFIX = "_text_embeddings.tar"


def sidecar_path(shard: Path) -> Path:
    """``x.tar`` -> ``x_text_embeddings.tar`` (extract_embedding.py:35)."""
    return shard.with_name(shard.name[: -len(".tar")] + SUFFIX)


def read_sidecar(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """``{key: {"shortSV_captions": vec, "longSV_captions": vec}}`` in the tar's order (float32).

    Raises:
        ImportRefused: a member that is not one of the two vectors, a byte size that is not a
            float32 vector, vectors of different widths, or a key without both vectors.
    """
    out: dict[str, dict[str, np.ndarray]] = {}
    dim = None
    try:
        tar = tarfile.open(path, "r")
    except (OSError, tarfile.TarError) as e:
        raise ImportRefused(f"{path}: not a readable tar ({e})") from e
    with tar:
        for member in tar:
            if not member.isfile():
                continue
            field = next((k for k in KEYS if member.name.endswith("." + k)), None)
            if field is None:
                raise ImportRefused(
                    f"{path}: member {member.name!r} is not <key>.shortSV_captions / <key>.longSV_captions"
                )
            key = member.name[: -len(field) - 1]
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            if len(data) % 4 or not data:
                raise ImportRefused(
                    f"{path}: member {member.name!r} has {len(data)} bytes, not a float32 vector"
                )
            vec = np.frombuffer(data, dtype="<f4").copy()
            if dim is None:
                dim = vec.size
            elif vec.size != dim:
                raise ImportRefused(
                    f"{path}: member {member.name!r} is {vec.size}-d, earlier vectors are {dim}-d"
                )
            if not np.isfinite(vec).all():
                raise ImportRefused(f"{path}: member {member.name!r} holds non-finite values")
            out.setdefault(key, {})[field] = vec
    for key, vecs in out.items():
        if set(vecs) != set(KEYS):
            raise ImportRefused(f"{path}: key {key!r} lacks {', '.join(sorted(set(KEYS) - set(vecs)))}")
    if not out:
        raise ImportRefused(f"{path}: no embeddings")
    return out


class _Precomputed:
    """The store writer's encoder protocol over vectors that already exist (rows in table order)."""

    pooling = "mean"
    pad_to_multiple_of = None

    def __init__(
        self, texts: list[str], vectors: np.ndarray, identity: str, tokenizer: Any, shard_size: int
    ) -> None:
        self._texts, self._vectors, self._identity = texts, vectors, identity
        self.tokenizer, self.max_length, self._shard_size = tokenizer, 512, shard_size

    @property
    def hidden_size(self) -> int:
        return int(self._vectors.shape[1])

    def identity(self) -> str:
        return self._identity

    def encode(self, texts: list[str], batch_size: int = 64, instruction: str | None = None) -> torch.Tensor:
        # The writer (bucketing off, one batch per shard) asks for whole shards in row order.
        for start in range(0, len(self._texts), self._shard_size):
            if self._texts[start : start + len(texts)] == list(texts):
                return torch.from_numpy(self._vectors[start : start + len(texts)])
        raise RuntimeError("side-car import: the store writer asked for rows out of shard order")


class _WordCounts:
    """Token counts for the manifest's statistics when no tokenizer is given (words)."""

    def __call__(self, texts: list[str], truncation: bool = True, max_length: int = 512) -> dict[str, Any]:
        return {"input_ids": [t.split()[:max_length] for t in texts]}


def import_sidecars(
    shards: Sequence[str | Path],
    out: str | Path,
    encoder: str | Path | None = None,
    dtype: str = "fp32",
    shard_size: int = 4096,
) -> dict[str, Any]:
    """Build ``out/train`` from image shards and their side-cars.

    Args:
        shards: the image shards (``x.tar``; ``x_text_embeddings.tar`` must lie beside each).
        out: store root (``out/train`` is written).
        encoder: the imported ``CaptionEncoder`` directory the side-cars came from (identity and
            tokenizer are read from it; its weights are not loaded).
        dtype: store dtype (``fp32`` keeps the side-car values exactly).
        shard_size: rows per store shard.

    Returns:
        ``{"path", "rows", "images", "dim", "identity"}``.
    """
    paths = [Path(s) for s in shards if not str(s).endswith(SUFFIX)]
    if not paths:
        raise ImportRefused("no image shards given (x.tar, with x_text_embeddings.tar beside it)")
    records, rows = [], []
    digest = hashlib.sha256()
    for shard in paths:
        side = sidecar_path(shard)
        if not shard.is_file():
            raise ImportRefused(f"{shard}: missing")
        if not side.is_file():
            raise ImportRefused(f"{shard}: no side-car {side.name} beside it")
        vectors = read_sidecar(side)
        digest.update(side.read_bytes())
        cfg = CaptionSetConfig(path=str(shard), format="webdataset", caption_columns=dict(KINDS))
        shard_records = list(load_caption_set(cfg, name=str(shard)))
        keys = [r.key for r in shard_records]
        extra = sorted(set(vectors) - set(keys))
        if extra:
            raise ImportRefused(f"{side}: key {extra[0]!r} has no image in {shard.name}")
        for r in shard_records:
            if r.key not in vectors:
                raise ImportRefused(f"{side}: no embeddings for image {r.key!r} of {shard.name}")
            kinds = [c.kind for c in r.captions]
            if kinds != ["short", "long"]:
                raise ImportRefused(
                    f"{shard}:{r.key}: captions {kinds}; the side-car holds one short and one long vector "
                    "(shortSV_captions and longSV_captions must each be one string)"
                )
            rows += [vectors[r.key]["shortSV_captions"], vectors[r.key]["longSV_captions"]]
        records += shard_records
    matrix = np.stack(rows).astype(np.float32)
    tokenizer: Any = _WordCounts()
    identity = "official-sidecars:" + digest.hexdigest()
    if encoder is not None:
        meta = read_json(Path(encoder) / ENCODER_FILE)
        if int(meta.get("dim", -1)) != matrix.shape[1]:
            raise ImportRefused(
                f"{Path(encoder) / ENCODER_FILE}: dim {meta.get('dim')} but the side-cars are {matrix.shape[1]}-d"
            )
        identity = str(meta["identity"])
        tokenizer = load_tokenizer(ModelRef(str(encoder)))
    texts = [c.text for r in records for c in r.captions]
    embed = EmbedConfig(
        dtype=dtype, batch_size=shard_size, shard_size=shard_size, bucket_by_length=False, precision="fp32"
    )  # type: ignore[arg-type]
    path = write_store(
        _Precomputed(texts, matrix, identity, tokenizer, shard_size), records, Path(out) / "train", embed
    )
    log.info(
        "store %s: %d captions of %d images from %d side-cars", path, len(texts), len(records), len(paths)
    )
    return {
        "path": str(path),
        "rows": len(texts),
        "images": len(records),
        "dim": int(matrix.shape[1]),
        "identity": identity,
    }
