"""Several caption sets as one training set (``data.train`` as a list: CC3M + CC12M, ...).

The reference trains stage 2 on such a list (microsoft/LLM2CLIP ``llm2clip/run.sh``:
``--train-data-list "data/cc3m/{00..00287}.tar;data/cc12m/{00..01001}.tar"``).

Each set is read and indexed on its own (:func:`~llm2clip_vlm.data.captions.load_caption_set`:
its own columns, image root, bad-record policy and ``max_images``). The sets are then *joined*
into one memory-mapped :class:`~llm2clip_vlm.data.index.RecordIndex` (cached beside the sets'
indexes, built from their Arrow tables without a Python object per record):

- keys become ``<set name>/<key>``: img2dataset numbers every run's keys from ``000000000``, so
  two runs' keys collide unless they are namespaced;
- shard numbers are shifted so every shard (or manifest) of every set is one source of the
  joined index; the stream (:mod:`llm2clip_vlm.data.stream`) then cuts units by source exactly as
  for one set, and a resumed run is positioned by the same integers;
- a mix of manifests and shards is an index of kind ``mixed`` (a row with an image path reads it
  from the file, a row without one from its tar).

Everything downstream (the embedding store, the image check, streaming, resume, held-out
slicing) sees one indexed set. A list of one set is that set, unchanged (no prefix, no join).

Sampling weights follow open_clip's ``--train-data-upsampling-factors``
(``src/open_clip_train/params.py``: "upsample specific data sources"; ``data.py``
``expand_urls`` gives each shard its source's weight): with weight ``w`` a set contributes
``w`` times its images to an epoch (:func:`weighted_epoch`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llm2clip_vlm.data.config import CaptionSetConfig
from llm2clip_vlm.data.errors import DataError
from llm2clip_vlm.data.index import INDEX_VERSION, RecordIndex, cache_root
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


def join_indexes(parts: list[tuple[str, RecordIndex, int]], cache_dir: Path | None = None) -> RecordIndex:
    """One index over the first ``n`` records of each ``(name, index, n)``, keys ``name/key``.

    Cached under ``<cache root>/index/join-<hash>/`` keyed by the parts' own cache keys (which
    hold their files' identities) and ``n``: a second start opens it in microseconds.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

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
        return RecordIndex(directory)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    try:
        kinds = {ix.meta["kind"] for _, ix, _ in parts}
        kind = kinds.pop() if len(kinds) == 1 else "mixed"
        sources: list[str] = []
        bad: list[dict[str, Any]] = []
        schema = parts[0][1].table.schema
        total = 0
        with pa.OSFile(str(tmp / "records.arrow"), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for name, ix, n in parts:
                offset = len(sources)
                table = ix.table.slice(0, n)
                prefix = pa.scalar(f"{name}/")
                table = table.set_column(
                    table.schema.get_field_index("key"),
                    "key",
                    pc.binary_join_element_wise(prefix, table.column("key"), pa.scalar("")),
                )
                table = table.set_column(
                    table.schema.get_field_index("shard"),
                    "shard",
                    pc.add(table.column("shard"), pa.scalar(offset, pa.int32())).cast(pa.int32()),
                )
                for batch in table.to_batches(max_chunksize=8192):
                    writer.write_batch(batch)
                if ix.meta["kind"] == "shards":
                    for s in range(len(ix.sources)):
                        side = ix.directory / f"keys-{s:06d}.json"
                        if side.is_file():
                            shutil.copyfile(side, tmp / f"keys-{s + offset:06d}.json")
                bad += [
                    {"position": b.position + total, "where": b.where, "reason": b.reason} for b in ix.bad()
                ]
                sources += ix.sources
                total += n
        (tmp / "bad.json").write_text(json.dumps(bad))
        meta = {
            "version": INDEX_VERSION,
            "kind": kind,
            "sources": sources,
            "settings": {"joined": [[name, ix.directory.name, n] for name, ix, n in parts]},
            "records": total,
            "bad": len(bad),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, directory)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return RecordIndex(directory)


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
