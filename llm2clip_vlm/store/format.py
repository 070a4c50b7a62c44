"""On-disk layout of the caption embedding store, shared by the writer and the reader.

A store is one directory::

    manifest.json            written last (its presence means "complete"): identity, dims, shards
    plan.json                written first: what this store is being built from (resume guard)
    caption_hashes.npy       [rows, 32] uint8, sha256 of ``kind + "\\0" + text`` per caption row
    caption_kinds.npy        [rows] uint8, 0 = short, 1 = long
    image_offsets.npy        [images + 1] int64, image i owns rows ``offsets[i]:offsets[i+1]``
    image_key_hashes.npy     [images, 32] uint8, sha256 of each image's key
    shards/00000.npy         [shard rows, dim] embeddings (fp16 / fp32; bf16 stored as uint16 bits)
    shards/00000.json        sidecar: row range, sha256 of the .npy, token counts, plan hash

Rows are the captions in data-set order: image 0's captions in record order, then image 1's, ...

This module needs only numpy (no torch), so opening a store for reading stays light.
"""

from __future__ import annotations

import array
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llm2clip_vlm import resources
from llm2clip_vlm.data.captions import captions_only
from llm2clip_vlm.data.records import ImageCaptions

FORMAT = "llm2clip-embedding-store"
VERSION = 1
MANIFEST = "manifest.json"
PLAN = "plan.json"
CAPTION_HASHES = "caption_hashes.npy"
CAPTION_KINDS = "caption_kinds.npy"
IMAGE_OFFSETS = "image_offsets.npy"
IMAGE_KEY_HASHES = "image_key_hashes.npy"
SHARD_DIR = "shards"

KINDS = ("short", "long")
# numpy dtype each store dtype is written as. numpy has no bfloat16: bf16 values are kept as
# their raw 16 bits (uint16) and widened to float32 on read (exact: bf16 is truncated fp32).
STORAGE_DTYPES: dict[str, np.dtype] = {
    "fp16": np.dtype("<f2"),
    "bf16": np.dtype("<u2"),
    "fp32": np.dtype("<f4"),
}


class StoreInputError(ValueError):
    """A caption that cannot be embedded (empty, not text, unknown kind); names the record."""


@dataclass(frozen=True)
class CaptionTable:
    """The caption rows of a data set, flattened, with their hashes (what a store is keyed by).

    ``texts`` and ``keys`` are views that build records on access (``texts[a:b]`` reads only the
    images covering rows ``a..b-1``): with an indexed data set, embedding streams its captions
    instead of holding every text in Python memory.
    """

    texts: Sequence[str]
    kinds: np.ndarray  # [rows] uint8
    hashes: np.ndarray  # [rows, 32] uint8
    offsets: np.ndarray  # [images + 1] int64
    key_hashes: np.ndarray  # [images, 32] uint8
    keys: Sequence[str]

    @property
    def num_rows(self) -> int:
        return len(self.texts)

    @property
    def num_images(self) -> int:
        return len(self.keys)

    def locate(self, row: int) -> tuple[int, int]:
        """(image index, caption index within the image) of a row."""
        image = int(np.searchsorted(self.offsets, row, side="right")) - 1
        return image, row - int(self.offsets[image])


class _RowTexts(Sequence[str]):
    """Caption texts by row, read from the records on access."""

    def __init__(self, records: Sequence[ImageCaptions], offsets: np.ndarray) -> None:
        self.records, self.offsets = records, offsets

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, rows: int | slice) -> Any:  # type: ignore[override]
        if isinstance(rows, slice):
            lo, hi, step = rows.indices(len(self))
            if step != 1 or hi <= lo:
                return [self[i] for i in range(lo, hi, step)]
            first = int(np.searchsorted(self.offsets, lo, side="right")) - 1
            last = int(np.searchsorted(self.offsets, hi - 1, side="right")) - 1
            texts = [c.text for i in range(first, last + 1) for c in self.records[i].captions]
            base = int(self.offsets[first])
            return texts[lo - base : hi - base]
        image = int(np.searchsorted(self.offsets, rows, side="right")) - 1
        return self.records[image].captions[rows - int(self.offsets[image])].text


class _Keys(Sequence[str]):
    def __init__(self, records: Sequence[ImageCaptions]) -> None:
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Any:  # type: ignore[override]
        return str(self.records[i].key)


def caption_digest(text: str, kind: str) -> bytes:
    """sha256 of one caption (its kind is part of it: the same text as short and long differs)."""
    return hashlib.sha256(f"{kind}\x00{text}".encode()).digest()


def caption_table(records: Sequence[ImageCaptions]) -> CaptionTable:
    """Flatten a caption set into rows, validating every caption (one pass; texts not kept).

    Raises:
        StoreInputError: a caption is empty, not a string, or of an unknown kind (the message
            names the record's key, its source and the caption's position).
    """
    records = captions_only(records)  # shard records: no image bytes read
    kinds = array.array("B")
    digests = bytearray()
    key_digests = bytearray()
    offsets = array.array("q", [0])
    for i, rec in enumerate(records):
        where = f"record {i} (key {rec.key!r}{', ' + rec.source if rec.source else ''})"
        for j, cap in enumerate(rec.captions):
            text, kind = getattr(cap, "text", cap), getattr(cap, "kind", None)
            if not isinstance(text, str):
                raise StoreInputError(f"{where}: caption {j} is not text ({type(text).__name__}: {text!r})")
            if not text.strip():
                raise StoreInputError(f"{where}: caption {j} ({kind}) is empty")
            if kind not in KINDS:
                raise StoreInputError(f"{where}: caption {j} has unknown kind {kind!r} (expected short/long)")
            kinds.append(KINDS.index(kind))
            digests += caption_digest(text, kind)
        offsets.append(len(kinds))
        key_digests += hashlib.sha256(str(rec.key).encode()).digest()
    offset_array = np.asarray(offsets, dtype=np.int64)
    return CaptionTable(
        texts=_RowTexts(records, offset_array),
        kinds=np.asarray(kinds, dtype=np.uint8),
        hashes=np.frombuffer(digests, dtype=np.uint8).reshape(-1, 32).copy(),
        offsets=offset_array,
        key_hashes=np.frombuffer(key_digests, dtype=np.uint8).reshape(-1, 32).copy(),
        keys=_Keys(records),
    )


def _digest_array(digests: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(len(digests), 32).copy()


def array_sha256(a: np.ndarray) -> str:
    """sha256 of an array's raw bytes (C order) - a compact fingerprint of a hash table."""
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def read_npy_rows(path: Path, rows: Sequence[int]) -> list[bytes]:
    """The raw bytes of some rows of a 2-d C-order ``.npy`` file, read with seeks.

    For the cheap store check: a memory map would put every page it touches (and the pages the
    kernel maps around them) into the process's RSS; a few hundred seeks read only the rows.
    """
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = read_header(f)
        if fortran or len(shape) != 2:
            raise ValueError(f"{path}: expected a 2-d C-order array, found shape {shape}")
        width, start = shape[1] * dtype.itemsize, f.tell()
        out = []
        for row in rows:
            f.seek(start + int(row) * width)
            out.append(f.read(width))
    return out


def shard_ranges(num_rows: int, shard_size: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` row ranges of ``shard_size`` rows (the last may be shorter)."""
    if shard_size <= 0:
        raise ValueError(f"embed.shard_size must be positive, got {shard_size}")
    return [(s, min(s + shard_size, num_rows)) for s in range(0, num_rows, shard_size)]


def rank_shards(num_shards: int, rank: int, world_size: int) -> range:
    """The contiguous share of shard indices that ``rank`` writes (sizes differ by at most one)."""
    return range(num_shards * rank // world_size, num_shards * (rank + 1) // world_size)


def shard_name(index: int) -> str:
    return f"{SHARD_DIR}/{index:05d}.npy"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp name, fsync, then rename: a reader (or a resumed run) never sees half a file."""
    tmp = path.with_name(path.name + ".partial")
    try:
        with resources.writing(path, len(data)), open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` through a temp name (the .npy header is deterministic, so reruns are byte-equal)."""
    tmp = path.with_name(path.name + ".partial")
    try:
        with resources.writing(path, array.nbytes + 128), open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)  # a half-written shard takes no space; the finished ones stay
        raise
    os.replace(tmp, path)


def to_float32(stored: np.ndarray, dtype: str) -> np.ndarray:
    """Widen stored rows to float32 (bf16 bits are shifted into the high half of a float32)."""
    if dtype == "bf16":
        return (stored.astype(np.uint32) << 16).view(np.float32)
    return stored.astype(np.float32, copy=False)
