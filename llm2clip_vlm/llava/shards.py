"""Writing LLaVA records as webdataset shards (the layout :func:`~llm2clip_vlm.llava.data.load_llava_records` reads).

Sample ``k`` of the data set is ``<key>.json`` (the record: ``id``, ``conversations`` and any
extra fields; no ``image`` path) followed by ``<key>.<ext>`` (the image file's bytes, as they are;
absent for a text-only record), ``<key>`` = ``k`` zero-padded. Shards hold ``per_shard`` samples
each, named ``<prefix>-000000.tar``, ...
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path

from llm2clip_vlm.llava.data import LlavaRecord


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # the same records give the same bytes (and the same index cache key)
    tar.addfile(info, io.BytesIO(data))


def write_llava_shards(
    records: Sequence[LlavaRecord], out_dir: str | Path, *, per_shard: int = 1000, prefix: str = "llava"
) -> list[Path]:
    """Write ``records`` (e.g. :func:`load_llava_records` of a JSON file) as shards; their paths."""
    if per_shard <= 0:
        raise ValueError(f"per_shard must be positive, got {per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    tar: tarfile.TarFile | None = None
    try:
        for k, rec in enumerate(records):
            if k % per_shard == 0:
                if tar is not None:
                    tar.close()
                paths.append(out / f"{prefix}-{len(paths):06d}.tar")
                tar = tarfile.open(paths[-1], "w", format=tarfile.USTAR_FORMAT)
            assert tar is not None
            key = f"{k:09d}"
            _add(
                tar,
                f"{key}.json",
                json.dumps({"id": rec.id, "conversations": rec.conversations, **rec.extra}).encode(),
            )
            if isinstance(rec.image, bytes):
                _add(tar, f"{key}.jpg", rec.image)  # the extension only marks an image member
            elif rec.image is not None:
                _add(tar, f"{key}{rec.image.suffix.lower() or '.jpg'}", rec.image.read_bytes())
    finally:
        if tar is not None:
            tar.close()
    return paths
