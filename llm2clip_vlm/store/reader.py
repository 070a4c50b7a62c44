"""Reading the caption embedding store: memory-mapped rows, refused when it does not match.

:meth:`EmbeddingStore.open` checks the store against what the caller is about to use it with (the
data set's captions, the embedder's identity) and against itself (every shard present, of the
recorded shape and dtype, with the recorded checksum). Any difference raises
:class:`StoreMismatchError` saying exactly what differs; a store is never silently used.

What opening costs: a store of at most :data:`FULL_CHECK_BYTES` is checked in full (every shard
re-hashed, every caption compared). A larger one gets the cheap checks only, so that no rank
rereads hundreds of GB at each start: the manifest and the hash tables' shapes, every shard's
presence, shape and dtype (from its header), each image's caption count, and
:data:`SAMPLE_ROWS` caption rows (plus the first and last) compared with the data. The full
check runs at write time and on demand: ``llm2clip-vlm verify-store DIR`` or
``EmbeddingStore.open(..., verify_checksums=True)``.

Only numpy is needed here: stage 2 reads rows without importing the LLM side.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llm2clip_vlm.data.captions import caption_counts, captions_only
from llm2clip_vlm.data.records import ImageCaptions
from llm2clip_vlm.identity import file_sha256
from llm2clip_vlm.store import format as fmt

if TYPE_CHECKING:  # pragma: no cover
    import torch


# Stores up to this size are verified in full at every open (cheap); larger ones by sampling.
FULL_CHECK_BYTES = 256 << 20
SAMPLE_ROWS = 1024


class StoreMismatchError(ValueError):
    """The store does not match the data, the embedder, or itself (the message says what differs)."""


class StoreConflictError(StoreMismatchError):
    """An output folder holds (part of) a store this run cannot continue; the message says what to
    do (remove it, or choose another folder)."""


class EmbeddingStore:
    """A complete, verified caption embedding store (open it with :meth:`open`).

    Attributes:
        path: the store directory.
        manifest: the parsed ``manifest.json``.
        dim: embedding width.
        dtype: ``fp16``, ``bf16`` or ``fp32`` (how rows are stored).
        num_rows: number of caption rows.
        num_images: number of images.
    """

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self.dim: int = int(manifest["dim"])
        self.dtype: str = manifest["dtype"]
        self.num_rows: int = int(manifest["num_rows"])
        self.num_images: int = int(manifest["num_images"])
        self.encoder_identity: str = manifest["encoder_identity"]
        self._shards: list[dict[str, Any]] = manifest["shards"]
        self._starts = np.asarray([s["start"] for s in self._shards], dtype=np.int64)
        self._maps: list[np.ndarray | None] = [None] * len(self._shards)
        self._offsets = np.load(path / fmt.IMAGE_OFFSETS, allow_pickle=False)
        self._kinds = np.load(path / fmt.CAPTION_KINDS, allow_pickle=False)

    # -- opening ----------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        captions: Sequence[ImageCaptions] | None = None,
        encoder_identity: str | None = None,
        verify_checksums: bool | None = None,
    ) -> EmbeddingStore:
        """Open a store, refusing it if it does not match.

        Args:
            path: the store directory (written by :func:`llm2clip_vlm.store.write_store`).
            captions: the data set the caller will pair with it; every row's caption hash and the
                image keys must match.
            encoder_identity: the embedder the caller expects (``CaptionEncoder.identity()``).
            verify_checksums: True = re-hash every shard and compare every caption (reads the
                whole store once); False = the cheap checks only (see the module docstring);
                None (default) = True for a store of at most :data:`FULL_CHECK_BYTES`.

        Raises:
            StoreMismatchError: incomplete store, corrupt or truncated shard, other embedder,
                other captions, or inconsistent files (the message names the row/shard/field).
        """
        path = Path(path)
        manifest = _read_manifest(path)
        full = verify_checksums if verify_checksums is not None else store_bytes(path) <= FULL_CHECK_BYTES
        _check_metadata(path, manifest, full)
        for shard in manifest["shards"]:
            _check_shard(path, shard, manifest, full)
        if encoder_identity is not None and manifest["encoder_identity"] != encoder_identity:
            raise StoreMismatchError(
                f"{path} was embedded by encoder {manifest['encoder_identity'][:16]}..., "
                f"not the expected {encoder_identity[:16]}... (a different stage-1 embedder or "
                "settings); re-run `llm2clip-vlm embed` with this encoder"
            )
        if captions is not None:
            if full:
                _check_captions(path, manifest, captions)
            else:
                _check_caption_sample(path, manifest, captions)
        return cls(path, manifest)

    # -- reading ----------------------------------------------------------------------------
    def caption_rows(self, image_index: int, kind: str) -> np.ndarray:
        """Row indices (int64, record order) of image ``image_index``'s captions of ``kind``."""
        if not 0 <= image_index < self.num_images:
            raise IndexError(f"image {image_index} out of range (store has {self.num_images} images)")
        if kind not in fmt.KINDS:
            raise ValueError(f"unknown caption kind {kind!r} (expected short/long)")
        lo, hi = int(self._offsets[image_index]), int(self._offsets[image_index + 1])
        return lo + np.flatnonzero(self._kinds[lo:hi] == fmt.KINDS.index(kind))

    def __len__(self) -> int:
        return self.num_rows

    def raw(self, rows: int | slice | Sequence[int] | np.ndarray) -> np.ndarray:
        """Rows as stored (float16 / float32, or the uint16 bits of bf16), ``[len(rows), dim]``."""
        idx = np.arange(self.num_rows)[rows] if isinstance(rows, slice) else np.asarray(rows, dtype=np.int64)
        scalar = idx.ndim == 0
        idx = idx.reshape(-1)
        if idx.size and (idx.min() < -self.num_rows or idx.max() >= self.num_rows):
            raise IndexError(f"row out of range (store has {self.num_rows} rows)")
        idx = np.where(idx < 0, idx + self.num_rows, idx)
        out = np.empty((idx.size, self.dim), dtype=fmt.STORAGE_DTYPES[self.dtype])
        which = np.searchsorted(self._starts, idx, side="right") - 1
        for s in np.unique(which):
            sel = which == s
            out[sel] = self._shard(int(s))[idx[sel] - self._starts[s]]
        return out[0] if scalar else out

    def __getitem__(self, rows: int | slice | Sequence[int] | np.ndarray) -> np.ndarray:
        """Rows as numpy: float16 / float32 as stored; bf16 widened (exactly) to float32."""
        return fmt.to_float32(self.raw(rows), self.dtype) if self.dtype == "bf16" else self.raw(rows)

    def tensor(self, rows: int | slice | Sequence[int] | np.ndarray) -> torch.Tensor:
        """Rows as a torch tensor in the stored dtype (bf16 included, no widening)."""
        import torch

        raw = self.raw(rows)
        if self.dtype == "bf16":
            return torch.from_numpy(raw.view(np.int16).copy()).view(torch.bfloat16)
        return torch.from_numpy(np.array(raw))

    def _shard(self, s: int) -> np.ndarray:
        m = self._maps[s]
        if m is None:
            m = np.load(self.path / self._shards[s]["file"], mmap_mode="r", allow_pickle=False)
            self._maps[s] = m
        return m

    def __repr__(self) -> str:
        return f"EmbeddingStore({str(self.path)!r}, rows={self.num_rows}, dim={self.dim}, dtype={self.dtype})"


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------
def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise StoreMismatchError(f"{path} is not an embedding store (no such directory)")
    file = path / fmt.MANIFEST
    if not file.is_file():
        done = len(list((path / fmt.SHARD_DIR).glob("*.json"))) if (path / fmt.SHARD_DIR).is_dir() else 0
        hint = (
            f"an interrupted `llm2clip-vlm embed` ({done} shards done); run it again to finish"
            if (path / fmt.PLAN).is_file()
            else "not an embedding store"
        )
        raise StoreMismatchError(f"{path} is an incomplete store: no {fmt.MANIFEST} ({hint})")
    try:
        manifest = json.loads(file.read_bytes().decode("utf-8"))
    except ValueError as e:  # not UTF-8, or not JSON
        raise StoreMismatchError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(manifest, dict):
        raise StoreMismatchError(f"{file}: not valid JSON (a {type(manifest).__name__}, not an object)")
    if manifest.get("format") != fmt.FORMAT or manifest.get("version") != fmt.VERSION:
        raise StoreMismatchError(
            f"{file}: format {manifest.get('format')!r} v{manifest.get('version')}, "
            f"expected {fmt.FORMAT!r} v{fmt.VERSION}"
        )
    missing = [
        k
        for k in ("encoder_identity", "dim", "dtype", "num_rows", "num_images", "shards")
        if k not in manifest
    ]
    if missing:
        raise StoreMismatchError(f"{file}: missing keys {missing}")
    if manifest["dtype"] not in fmt.STORAGE_DTYPES:
        raise StoreMismatchError(f"{file}: unknown dtype {manifest['dtype']!r}")
    return manifest


def store_bytes(path: Path) -> int:
    """Bytes of a store's files (what a full check reads)."""
    return sum(f.stat().st_size for f in (*path.glob("*.npy"), *(path / fmt.SHARD_DIR).glob("*.npy")))


def _load_array(
    path: Path, name: str, shape: tuple[int, ...], dtype: np.dtype, mmap: bool = False
) -> np.ndarray:
    file = path / name
    if not file.is_file():
        raise StoreMismatchError(f"{file} is missing (incomplete store)")
    try:
        a = np.load(file, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (ValueError, OSError, EOFError) as e:
        raise StoreMismatchError(f"{file} is unreadable ({e})") from e
    if a.shape != shape or a.dtype != dtype:
        raise StoreMismatchError(f"{file}: shape {a.shape} {a.dtype}, expected {shape} {dtype}")
    return a


def _check_metadata(path: Path, m: dict[str, Any], full: bool = True) -> None:
    rows, images = int(m["num_rows"]), int(m["num_images"])
    hashes = _load_array(path, fmt.CAPTION_HASHES, (rows, 32), np.dtype(np.uint8), mmap=not full)
    if full and fmt.array_sha256(hashes) != m.get("captions_sha256"):
        raise StoreMismatchError(f"{path / fmt.CAPTION_HASHES} does not match the manifest's captions_sha256")
    _load_array(path, fmt.CAPTION_KINDS, (rows,), np.dtype(np.uint8), mmap=not full)
    offsets = _load_array(path, fmt.IMAGE_OFFSETS, (images + 1,), np.dtype(np.int64))
    if offsets[0] != 0 or offsets[-1] != rows or (np.diff(offsets) < 0).any():
        raise StoreMismatchError(f"{path / fmt.IMAGE_OFFSETS} is inconsistent with {rows} rows")
    _load_array(path, fmt.IMAGE_KEY_HASHES, (images, 32), np.dtype(np.uint8), mmap=not full)
    expected = 0
    for shard in m["shards"]:
        if shard["start"] != expected or shard["stop"] <= shard["start"]:
            raise StoreMismatchError(
                f"{path / fmt.MANIFEST}: shard {shard['file']} covers rows {shard['start']}-{shard['stop']}, "
                f"expected it to start at row {expected}"
            )
        expected = shard["stop"]
    if expected != rows:
        raise StoreMismatchError(
            f"{path / fmt.MANIFEST}: shards cover {expected} rows, the manifest says {rows}"
        )


def _check_shard(path: Path, shard: dict[str, Any], m: dict[str, Any], verify: bool) -> None:
    file = path / shard["file"]
    rows = shard["stop"] - shard["start"]
    want_shape, want_dtype = (rows, int(m["dim"])), fmt.STORAGE_DTYPES[m["dtype"]]
    if not file.is_file():
        raise StoreMismatchError(f"shard {file} (rows {shard['start']}-{shard['stop'] - 1}) is missing")
    try:
        a = np.load(file, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # a truncated file fails to map
        raise StoreMismatchError(f"shard {file} is truncated or unreadable ({e})") from e
    if a.shape != want_shape or a.dtype != want_dtype:
        raise StoreMismatchError(
            f"shard {file}: shape {a.shape} {a.dtype}, the manifest says {want_shape} {want_dtype} ({m['dtype']})"
        )
    if verify and file_sha256(file) != shard["sha256"]:
        raise StoreMismatchError(f"shard {file} is corrupt: its sha256 differs from the manifest's")


def _check_captions(path: Path, m: dict[str, Any], captions: Sequence[ImageCaptions]) -> None:
    table = fmt.caption_table(captions)
    if table.num_images != m["num_images"] or table.num_rows != m["num_rows"]:
        raise StoreMismatchError(
            f"{path} holds {m['num_rows']} captions of {m['num_images']} images; the data has "
            f"{table.num_rows} captions of {table.num_images} images"
        )
    stored = np.load(path / fmt.CAPTION_HASHES, allow_pickle=False)
    bad = np.flatnonzero((stored != table.hashes).any(axis=1))
    if bad.size:
        row = int(bad[0])
        image, j = table.locate(row)
        kind = fmt.KINDS[int(table.kinds[row])]
        raise StoreMismatchError(
            f"{path}: row {row} (image {image} key {table.keys[image]!r}, caption {j}, {kind}) differs from "
            f"the data: the store was embedded from another text than {table.texts[row]!r} "
            f"({bad.size} rows differ); re-run `llm2clip-vlm embed`"
        )
    offsets = np.load(path / fmt.IMAGE_OFFSETS, allow_pickle=False)
    if not np.array_equal(offsets, table.offsets):
        image = int(np.flatnonzero(offsets != table.offsets)[0]) - 1
        raise StoreMismatchError(f"{path}: image {image} has a different number of captions than in the data")
    keys = np.load(path / fmt.IMAGE_KEY_HASHES, allow_pickle=False)
    bad_keys = np.flatnonzero((keys != table.key_hashes).any(axis=1))
    if bad_keys.size:
        i = int(bad_keys[0])
        raise StoreMismatchError(
            f"{path}: image {i} has key {table.keys[i]!r} in the data, another key in the store"
        )


def _check_caption_sample(path: Path, m: dict[str, Any], captions: Sequence[ImageCaptions]) -> None:
    """The cheap caption check: every image's caption count, and a sample of rows and keys."""
    counts = caption_counts(captions)
    captions = captions_only(captions)  # the sampled records' texts and keys; no image is read
    rows = int(counts.sum())
    if len(counts) != m["num_images"] or rows != m["num_rows"]:
        raise StoreMismatchError(
            f"{path} holds {m['num_rows']} captions of {m['num_images']} images; the data has "
            f"{rows} captions of {len(counts)} images"
        )
    offsets = np.load(path / fmt.IMAGE_OFFSETS, allow_pickle=False)
    data_offsets = np.concatenate([[0], np.cumsum(counts)])
    if not np.array_equal(offsets, data_offsets):
        image = int(np.flatnonzero(offsets != data_offsets)[0]) - 1
        raise StoreMismatchError(f"{path}: image {image} has a different number of captions than in the data")
    if rows == 0:
        return
    sample = np.random.default_rng(0).choice(rows, size=min(SAMPLE_ROWS, rows), replace=False)
    sample = np.unique(np.concatenate([sample, [0, rows - 1]]))
    images = np.searchsorted(offsets, sample, side="right") - 1
    # Read by seeks, not mapped: the sampled rows only, not the pages around them (RSS).
    stored = dict(
        zip(sample.tolist(), fmt.read_npy_rows(path / fmt.CAPTION_HASHES, sample.tolist()), strict=True)
    )
    unique_images = np.unique(images).tolist()
    keys = dict(
        zip(unique_images, fmt.read_npy_rows(path / fmt.IMAGE_KEY_HASHES, unique_images), strict=True)
    )
    checked_keys: set[int] = set()
    for row, image in zip(sample.tolist(), images.tolist(), strict=True):
        rec = captions[image]
        j = row - int(offsets[image])
        cap = rec.captions[j]
        if fmt.caption_digest(cap.text, cap.kind) != stored[row]:
            raise StoreMismatchError(
                f"{path}: row {row} (image {image} key {rec.key!r}, caption {j}, {cap.kind}) differs from "
                f"the data: the store was embedded from another text than {cap.text!r} "
                f"(found by the sampled check); re-run `llm2clip-vlm embed`"
            )
        if image not in checked_keys:
            checked_keys.add(image)
            if hashlib.sha256(str(rec.key).encode()).digest() != keys[image]:
                raise StoreMismatchError(
                    f"{path}: image {image} has key {rec.key!r} in the data, another key in the store"
                )
