"""Replicas of what img2dataset and LLM2CLIP's data scripts write, built from their own source.

- img2dataset ``--output_format webdataset`` (rom1504/img2dataset ``img2dataset/writer.py``,
  ``WebDatasetSampleWriter``): shard ``NNNNN.tar`` (``oom_shard_count`` = 5 digits) holding per
  sample ``KEY.jpg`` + ``KEY.json`` (the meta: every input column, ``--save_additional_columns``
  included, plus ``key``/``status``/``error_message``/``width``/``height``/``original_width``/
  ``original_height``; ``img2dataset/downloader.py``) + ``KEY.txt`` (the caption column), written
  by webdataset's ``TarWriter`` (members in sorted extension order: jpg, json, txt). Beside it
  ``NNNNN.parquet`` (the meta of every sample, failed ones too) and ``NNNNN_stats.json``
  (``img2dataset/logger.py`` ``write_stats``: ``count``, ``successes``, ...). Keys are
  ``compute_key``: ``10**oom_sample_per_shard * shard_id + i``, ``oom_sample_per_shard +
  oom_shard_count`` digits (``img2dataset/downloader.py``).
- ``--output_format files`` (``FilesSampleWriter``): the same files in a folder ``NNNNN/``.
- LLM2CLIP's ``download_dataset.sh`` (microsoft/LLM2CLIP ``llm2clip/data/download_dataset.sh``)
  runs img2dataset with ``--url_col "Image Path" --caption_col raw_caption
  --save_additional_columns '["shortIB_captions", "longIB_captions", "shortSV_captions",
  "longSV_captions", "shortLLA_captions", "longLLA_captions"]'``: the DreamLIP captions land in
  ``KEY.json`` under those names, ``raw_caption`` in ``KEY.txt`` (and ``caption`` in the json).
- LLM2CLIP's ``extract_embedding.py`` (``llm2clip/data/extract_embedding.py``) writes
  ``NNNNN_text_embeddings.tar`` beside each shard: per key ``KEY.shortSV_captions`` and
  ``KEY.longSV_captions``, each ``embedding.numpy().tobytes()`` of one float32 vector.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

DREAMLIP_COLUMNS = (
    "shortIB_captions",
    "longIB_captions",
    "shortSV_captions",
    "longSV_captions",
    "shortLLA_captions",
    "longLLA_captions",
)
# What reads the replica: the DreamLIP column names as download_dataset.sh saves them.
CAPTION_COLUMNS = {"shortSV_captions": "short", "longSV_captions": "long"}


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o444  # webdataset TarWriter's default mode
    tar.addfile(info, io.BytesIO(data))


def jpeg_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).convert("RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def solid_images(n: int, seed: int = 0, size: int = 32) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def samples(pixels: list[np.ndarray], start: int = 0) -> list[dict]:
    """One DreamLIP-captioned sample per image (the row download_dataset.sh feeds img2dataset)."""
    out = []
    for i, px in enumerate(pixels):
        j = start + i
        row = {"url": f"http://example.com/{j}.jpg", "caption": f"raw caption {j}"}
        for col in DREAMLIP_COLUMNS:
            size = "long" if col.startswith("long") else "short"
            row[col] = f"{size} {col[len(size) : -len('_captions')]} caption of image {j}" + (
                ", described at length with its colours and shapes" if size == "long" else ""
            )
        out.append({"pixels": px, "meta": row})
    return out


def write_img2dataset(
    root: Path,
    items: list[dict],
    per_shard: int = 4,
    output_format: str = "webdataset",
    failed_every: int = 0,
) -> list[Path]:
    """An img2dataset output folder (``webdataset`` shards or ``files`` folders); the shard paths.

    ``failed_every`` > 0 marks every n-th sample as ``failed_to_download`` (in the parquet only,
    as img2dataset does: a failed sample has no files).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    oom_sample = math.ceil(math.log10(per_shard))
    shards = []
    for shard_id, first in enumerate(range(0, len(items), per_shard)):
        name = f"{shard_id:05d}"
        metas, successes = [], 0
        tar = tarfile.open(root / f"{name}.tar", "w") if output_format == "webdataset" else None
        folder = root / name
        if output_format == "files":
            folder.mkdir()
        for i, item in enumerate(items[first : first + per_shard]):
            key = f"{10**oom_sample * shard_id + i:0{oom_sample + 5}d}"
            failed = failed_every and (first + i) % failed_every == failed_every - 1
            h, w = item["pixels"].shape[:2]
            meta = {
                **item["meta"], "key": key, "status": "failed_to_download" if failed else "success",
                "error_message": "HTTP 404" if failed else None, "width": None if failed else w,
                "height": None if failed else h, "original_width": None if failed else w,
                "original_height": None if failed else h,
            }  # fmt: skip
            metas.append(meta)
            if failed:
                continue
            successes += 1
            files = {
                "jpg": jpeg_bytes(item["pixels"]),
                "json": json.dumps(meta, indent=4).encode(),
                "txt": str(item["meta"]["caption"]).encode(),
            }
            for ext in sorted(files):  # webdataset TarWriter: sorted(obj.keys())
                if tar is not None:
                    _add(tar, f"{key}.{ext}", files[ext])
                else:
                    (folder / f"{key}.{ext}").write_bytes(files[ext])
        if tar is not None:
            tar.close()
        pq.write_table(pa.Table.from_pylist(metas), root / f"{name}.parquet")
        stats = {"count": len(metas), "successes": successes, "failed_to_download": len(metas) - successes}
        (root / f"{name}_stats.json").write_text(json.dumps(stats, indent=4))
        shards.append(root / f"{name}.tar" if tar is not None else folder)
    return shards


def write_sidecars(
    shards: list[Path], dim: int, seed: int = 0, encode: Callable[[list[str]], np.ndarray] | None = None
) -> dict[str, dict[str, np.ndarray]]:
    """``NNNNN_text_embeddings.tar`` beside each shard, as extract_embedding.py writes them.

    ``encode`` (texts -> float32 ``[n, dim]``) embeds each key's ``shortSV_captions`` /
    ``longSV_captions`` from its ``KEY.json`` (as extract_embedding.py does with LLM2Vec);
    default: random vectors (side-cars some other model made).
    """
    rng = np.random.default_rng(seed)
    vectors: dict[str, dict[str, np.ndarray]] = {}
    for shard in shards:
        with tarfile.open(shard) as t:
            metas = {
                m.name.split(".", 1)[0]: json.loads(t.extractfile(m).read())  # type: ignore[union-attr]
                for m in t
                if m.name.endswith(".json")
            }
        side = shard.with_name(shard.name[: -len(".tar")] + "_text_embeddings.tar")
        with tarfile.open(side, "w") as t:
            for key in sorted(metas):
                vectors[key] = {}
                for field in ("longSV_captions", "shortSV_captions"):  # sorted, as TarWriter writes
                    if encode is not None:
                        vec = np.asarray(encode([metas[key][field]])[0], dtype=np.float32)
                    else:
                        vec = rng.standard_normal(dim).astype(np.float32)
                    vectors[key][field] = vec
                    _add(t, f"{key}.{field}", vec.tobytes())
    return vectors
