"""Several caption sets as one training set (``data.train`` as a list: CC3M + CC12M, ...).

The reference trains stage 2 on such a list (microsoft/LLM2CLIP ``llm2clip/run.sh``:
``--train-data-list "data/cc3m/{00..00287}.tar;data/cc12m/{00..01001}.tar"``).

Each set is read and indexed on its own (:func:`~llm2clip_vlm.data.captions.load_caption_set`:
its own columns, image root, bad-record policy and ``max_images``). The sets are then *joined*
into one :class:`JoinedIndex`, a :class:`~llm2clip_vlm.data.index.RecordIndex` over the sets'
memory-mapped tables (concatenated without a copy; a small ``meta.json`` beside the sets'
indexes names them):

- keys become ``<set name>/<key>``: img2dataset numbers every run's keys from ``000000000``, so
  two runs' keys collide unless they are namespaced;
- shard numbers are shifted so every shard (or manifest) of every set is one source of the
  joined index; the stream (:mod:`llm2clip_vlm.data.stream`) then cuts units by source exactly as
  for one set, and a resumed run is positioned by the same integers;
- a mix of manifests and shards is an index of kind ``mixed`` (a row with an image path reads it
  from the file, a row without one from its tar; :mod:`~llm2clip_vlm.data.stream` reads both).

Everything downstream (the embedding store, the image check, streaming, resume, held-out
slicing) sees one indexed set. A list of one set is that set, unchanged (no prefix, no join).

Sampling weights follow open_clip's ``--train-data-upsampling-factors``
(``src/open_clip_train/params.py``: "upsample specific data sources"; ``data.py``
``expand_urls`` gives each shard its source's weight): with weight ``w`` a set contributes
``w`` times its images to an epoch (:func:`weighted_epoch`); a streamed run draws each epoch's
shards with replacement by weight instead (:class:`~llm2clip_vlm.data.stream.StreamPlan`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llm2clip_vlm.data.config import CaptionSetConfig
from llm2clip_vlm.data.errors import DataError
from llm2clip_vlm.data.index import INDEX_VERSION, BadRow, RecordIndex, cache_root
from llm2clip_vlm.data.records import ImageCaptions
from llm2clip_vlm.logging import get_logger

log = get_logger(__name__)

JOIN_VERSION = 1


@dataclass(frozen=True)
class SetPart:
    """One set of a joined training set: its name, where its records start, how many, its weight."""

    name: str
    path: str
    start: int
    records: int
    skipped: int
    weight: float

    def counts(self) -> dict[str, Any]:
        """This set's entry in ``metrics.json``."""
        return {"path": self.path, "records": self.records, "skipped": self.skipped, "weight": self.weight}


def set_names(cfgs: list[CaptionSetConfig]) -> list[str]:
    """Each set's name: ``name``, else its folder or file name (``cc3m`` for ``data/cc3m/``).

    A brace pattern or glob is named by the folder it lies in. Repeated names get ``-2``, ``-3``.
    Names may not hold ``/`` (it separates the name from the key).
    """
    names: list[str] = []
    for i, c in enumerate(cfgs):
        name = c.name
        if not name:
            p = Path(c.path.rstrip("/"))
            if "{" in p.name or "*" in p.name or p.suffix.lower() == ".tar":
                p = p.parent
            name = p.stem if p.suffix else p.name
            name = name or f"set{i}"
        if "/" in name:
            raise DataError(f"data.train[{i}].name {name!r}: a set's name may not contain '/'")
        base, k = name, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


class JoinedIndex(RecordIndex):
    """Several sets' indexes as one, without copying them: their memory-mapped tables are
    concatenated (zero-copy), record ``i`` is built by the set it falls in, its key prefixed
    ``name/``; shard numbers are shifted so every shard (or manifest) of every set is one source.

    Args:
        directory: a join directory (``meta.json`` naming the parts) written by :func:`join_indexes`.
    """

    def __init__(self, directory: Path) -> None:
        import pyarrow as pa

        self.directory = directory
        self.meta = json.loads((directory / "meta.json").read_text())
        self.parts = [(name, RecordIndex(Path(part)), int(n)) for name, part, n in self.meta["parts"]]
        self.starts = np.cumsum([0] + [n for _, _, n in self.parts])
        self.sources = self.meta["sources"]
        self.table = pa.concat_tables([ix.table.slice(0, n) for _, ix, n in self.parts])
        self._cols = {name: self.table.column(name) for name in self.table.column_names}
        self._files: dict[int, Any] = {}
        self.images = True
        self._shard: np.ndarray | None = None

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["directory"])  # type: ignore[misc]
        self.images = state.get("images", True)
        for _, ix, _ in self.parts:
            ix.images = self.images

    def without_images(self) -> JoinedIndex:
        other = JoinedIndex(self.directory)
        other.images = False
        for _, ix, _ in other.parts:
            ix.images = False
        return other

    def _part(self, i: int) -> tuple[str, RecordIndex, int]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} out of range ({len(self)} records)")
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        name, ix, _ = self.parts[k]
        return name, ix, i - int(self.starts[k])

    def __getitem__(self, i: int) -> ImageCaptions:  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]  # type: ignore[return-value]
        name, ix, local = self._part(i)
        rec = ix[local]
        return ImageCaptions(f"{name}/{rec.key}", rec.image, rec.captions, rec.source)

    def describe(self, i: int) -> str:
        _, ix, local = self._part(i)
        return ix.describe(local)

    def read_image(self, i: int) -> bytes:
        _, ix, local = self._part(i)
        return ix.read_image(local)

    def captions_of(self, i: int) -> list[Any]:
        _, ix, local = self._part(i)
        return ix.captions_of(local)

    def column(self, name: str) -> np.ndarray:
        """A numeric column; ``shard`` numbers every set's shards (or manifest) one after another."""
        if name != "shard":
            return super().column(name)
        if self._shard is None:
            offsets, chunks = 0, []
            for _, ix, n in self.parts:
                chunks.append(ix.column("shard")[:n].astype(np.int32) + offsets)
                offsets += len(ix.sources)
            self._shard = np.concatenate(chunks)
        return self._shard

    def tar_keys(self, shard: int) -> list[str]:
        for _, ix, _ in self.parts:
            if shard < len(ix.sources):
                return ix.tar_keys(shard)
            shard -= len(ix.sources)
        raise IndexError(f"no shard {shard}")

    def bad(self) -> list[BadRow]:
        out, read = [], 0
        for _, ix, n in self.parts:
            bad = ix.bad()
            out += [BadRow(b.position + read, b.where, b.reason) for b in bad]
            read += n + len(bad)
        return out

    def __repr__(self) -> str:
        return f"JoinedIndex({self.directory}, records={len(self)}, sets={[p[0] for p in self.parts]})"


def join_indexes(parts: list[tuple[str, RecordIndex, int]], cache_dir: Path | None = None) -> JoinedIndex:
    """One index over the first ``n`` records of each ``(name, index, n)``, keys ``name/key``.

    Only a small ``meta.json`` is written (``<cache root>/index/join-<hash>/``, keyed by the parts'
    own cache keys, which hold their files' identities, and ``n``): the parts' tables are mapped,
    not copied, so a list of sets costs no more disk or memory than its sets.
    """
    ident = json.dumps(
        {
            "version": JOIN_VERSION,
            "index": INDEX_VERSION,
            "parts": [[n, ix.directory.name, k] for n, ix, k in parts],
        }
    )
    key = "join-" + hashlib.sha256(ident.encode()).hexdigest()[:32]
    root = (cache_dir or cache_root()) / "index"
    directory = root / key
    if (directory / "meta.json").is_file():
        return JoinedIndex(directory)
    kinds = {ix.meta["kind"] for _, ix, _ in parts}
    meta = {
        "version": INDEX_VERSION,
        "kind": kinds.pop() if len(kinds) == 1 else "mixed",
        "sources": [src for _, ix, _ in parts for src in ix.sources],
        "parts": [[name, str(ix.directory.resolve()), n] for name, ix, n in parts],
        "records": sum(n for _, _, n in parts),
    }
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".meta-")
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(meta, indent=1))
    os.replace(tmp, directory / "meta.json")  # atomic: concurrent ranks write the same content
    return JoinedIndex(directory)


def weighted_epoch(parts: list[SetPart], epoch: int, seed: int) -> np.ndarray | None:
    """The record ids of one epoch of a weighted list of sets, unshuffled; None when all weights are 1.

    A set of weight ``w`` contributes ``floor(w)`` copies of all its records plus a fresh draw
    (seeded by ``(seed, epoch, set)``) of ``round(frac(w) * records)`` more: 0.5 = a different
    half of the set each epoch, 2 = every record twice.
    """
    if all(p.weight == 1.0 for p in parts):
        return None
    chunks = []
    for k, p in enumerate(parts):
        ids = np.arange(p.start, p.start + p.records, dtype=np.int64)
        whole, frac = int(p.weight), p.weight - int(p.weight)
        chunks += [ids] * whole
        extra = int(round(frac * p.records))
        if extra:
            rng = np.random.default_rng((seed, epoch, k, 7))
            chunks.append(np.sort(rng.choice(ids, size=extra, replace=False)))
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)


def check_weights(cfgs: list[CaptionSetConfig]) -> None:
    for i, c in enumerate(cfgs):
        if not c.weight >= 0:
            raise DataError(f"data.train[{i}].weight must be >= 0, got {c.weight}")
    if cfgs and not any(c.weight > 0 for c in cfgs):
        raise DataError("data.train: every set has weight 0; nothing would be sampled")
