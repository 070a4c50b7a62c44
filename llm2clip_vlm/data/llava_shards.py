"""Writing LLaVA records as webdataset shards (the layout :func:`~llm2clip_vlm.data.conversations.load_llava_records` reads).

Sample ``k`` of the data set is ``<key>.json`` (the record: ``id``, ``conversations`` and any
extra fields; no ``image`` path) followed by ``<key>.<ext>`` (the image file's bytes, as they are;
absent for a text-only record), ``<key>`` = ``k`` zero-padded. Shards hold ``per_shard`` samples
each, named ``<prefix>-000000.tar``, ...

A shard is written under a temporary name and renamed when complete, so a killed run leaves only
whole shards. ``<prefix>-shards.json`` records what the shards were written from (a source
description, the record count and ``per_shard``); a second run with the same description keeps
the shards already there and writes the rest, and one with another description is refused
rather than mixing two data sets in one folder.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llm2clip_vlm import resources
from llm2clip_vlm.data.captions import IMAGE_EXTENSIONS
from llm2clip_vlm.data.conversations import LlavaRecord
from llm2clip_vlm.data.errors import DataError
from llm2clip_vlm.progress import make_progress


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # the same records give the same bytes (and the same index cache key)
    tar.addfile(info, io.BytesIO(data))


def write_llava_shards(
    records: Sequence[LlavaRecord],
    out_dir: str | Path,
    *,
    per_shard: int = 1000,
    prefix: str = "llava",
    source: Any = None,
    show_progress: bool = False,
) -> list[Path]:
    """Write ``records`` (e.g. :func:`load_llava_records` of a JSON file) as shards; their paths.

    Args:
        records: the records, in the order they go into the shards.
        out_dir: the folder for the shards (created).
        per_shard: samples per shard.
        prefix: shard names are ``<prefix>-NNNNNN.tar``.
        source: a JSON-able description of where ``records`` come from. Shards a run with the
            same description (and count and ``per_shard``) completed are kept, not rewritten.
        show_progress: a progress bar (a progress line in log files).

    Raises:
        DataError: ``out_dir`` holds shards written from other records.
    """
    if per_shard <= 0:
        raise ValueError(f"per_shard must be positive, got {per_shard}")
    check_prefix(prefix)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"source": source, "records": len(records), "per_shard": per_shard, "prefix": prefix}
    manifest_path = out / f"{prefix}-shards.json"
    if manifest_path.is_file():
        before = json.loads(manifest_path.read_text())
        if before != manifest:
            raise DataError(
                f"{out}: holds {prefix}-*.tar shards written from other records or settings "
                f"({before.get('records')} records of {_describe(before.get('source'))}, "
                f"{before.get('per_shard')} per shard; now {len(records)} of {_describe(source)}, "
                f"{per_shard} per shard): write to another folder or delete {manifest_path.name} and the shards"
            )
    elif any(out.glob(f"{prefix}-*.tar")):
        raise DataError(f"{out}: holds {prefix}-*.tar shards of unknown origin; write to another folder")
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")

    n_shards = -(-len(records) // per_shard)
    paths = [out / f"{prefix}-{j:06d}.tar" for j in range(n_shards)]
    with make_progress(disable=not show_progress) as progress:
        task = progress.add_task("llava shards", total=len(records), status="", unit="record")
        for j, path in enumerate(paths):
            first, last = j * per_shard, min(len(records), (j + 1) * per_shard)
            if not path.is_file():  # a complete shard from an earlier run is kept
                _write_shard(path, records, first, last)
            progress.update(task, completed=last, status=f"shard {j + 1}/{n_shards}")
    return paths


# A shard name's prefix is a plain file name: the shards land in ``out_dir`` and nowhere else.
_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_prefix(prefix: str) -> None:
    """Refuse a prefix that is not a plain name (a ``/``, ``..``, or a leading dot or dash).

    Raises:
        ValueError: naming the prefix.
    """
    if not _PREFIX.fullmatch(prefix) or ".." in prefix:
        raise ValueError(
            f"shard prefix {prefix!r} must be a plain name (letters, digits, '.', '_', '-'; no '/' or "
            "'..'): the shards are written into the output folder only"
        )


def _describe(source: Any) -> str:
    """A source description in a few words: the data file's path when there is one."""
    data = source.get("data") if isinstance(source, dict) else None
    path = data.get("path") if isinstance(data, dict) else data
    return str(path or source)


def _write_shard(path: Path, records: Sequence[LlavaRecord], first: int, last: int) -> None:
    """Samples ``first..last-1`` into ``path``, through a temporary name renamed at the end."""
    tmp = path.with_name(path.name + ".tmp")

    def needed() -> int:  # about the shard's size, only computed when a write failed
        return sum(
            len(r.image) if isinstance(r.image, bytes) else (r.image.stat().st_size if r.image else 0)
            for r in records[first:last]
        )

    try:
        with resources.writing(path, needed):
            _write_tar(tmp, records, first, last)
    except BaseException:
        tmp.unlink(missing_ok=True)  # no half shard left behind; finished shards stay
        raise
    os.replace(tmp, path)


def _write_tar(tmp: Path, records: Sequence[LlavaRecord], first: int, last: int) -> None:
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for k in range(first, last):
            rec = records[k]
            key = f"{k:09d}"
            _add(
                tar,
                f"{key}.json",
                json.dumps({"id": rec.id, "conversations": rec.conversations, **rec.extra}).encode(),
            )
            if isinstance(rec.image, bytes):
                _add(tar, f"{key}.jpg", rec.image)  # the extension only marks an image member
            elif rec.image is not None:
                # The member's extension is what marks it as the image for the stream's reader
                # (IMAGE_EXTENSIONS); the bytes are decoded by content, so another suffix is kept
                # only when the reader knows it.
                ext = rec.image.suffix.lower().lstrip(".")
                _add(tar, f"{key}.{ext if ext in IMAGE_EXTENSIONS else 'jpg'}", rec.image.read_bytes())
