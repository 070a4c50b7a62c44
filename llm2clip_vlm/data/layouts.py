"""Layouts other tools write, recognised by their header so they read with no mapping by hand.

A :class:`~llm2clip_vlm.data.config.CaptionSetConfig` whose ``image_column`` and
``caption_columns`` keep their defaults is matched against these layouts (the first record or the
header is read, nothing more); a set whose mapping the user wrote is read as written.

- **DreamLIP CSV / parquet** (LLM2CLIP ``llm2clip/data/download_dataset.sh``): columns
  ``Image Path`` (URLs), ``raw_caption``, and one caption per cell in ``short|long`` x
  ``IB|SV|LLA`` ``_captions`` columns. Read with ``Image Path`` as the image and the
  ``shortSV_captions`` / ``longSV_captions`` pair (the two ``extract_embedding.py`` embeds).
  Its images are URLs: the message names the img2dataset command that downloads them
  (:func:`img2dataset_command`), whose output folder is then the set.
- **img2dataset shards of that CSV** (``--save_additional_columns``): each ``KEY.json`` holds the
  DreamLIP columns; read with the same ``shortSV`` / ``longSV`` pair instead of ``KEY.txt``.
- **Caption pairs, no images** (LLM2CLIP ``llm_caption_contrastive/dataset/E5_cc3m.py`` reads
  ``cc3m[['short_caption', 'long_caption']]``): a text-only set (``image_column: ""``), enough
  for stage 1 and ``embed``; stage 2 refuses it.
- **LLaVA / ShareGPT4V conversation JSON** (``{"id", "image", "conversations": [{"from":
  "human", ...}, {"from": "gpt", "value": ...}]}``, haotian-liu/LLaVA ``docs/Data.md``): the first
  ``gpt`` answer is the image's caption, typed ``long`` (ShareGPT4V's detailed captions); map
  ``caption_columns: {conversations: short}`` for LLaVA-Pretrain's BLIP captions. Text-only
  records (no ``image``) are left out and counted.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import tarfile
from pathlib import Path
from typing import Any

from llm2clip_vlm.data.config import CaptionSetConfig
from llm2clip_vlm.data.errors import DataError
from llm2clip_vlm.logging import get_logger

log = get_logger(__name__)

DREAMLIP_IMAGE = "Image Path"
DREAMLIP_CAPTIONS = tuple(
    f"{length}{model}_captions" for model in ("IB", "SV", "LLA") for length in ("short", "long")
)
DREAMLIP_PAIR = {"shortSV_captions": "short", "longSV_captions": "long"}
PAIR_COLUMNS = {"short_caption": "short", "long_caption": "long"}
CONVERSATIONS = "conversations"
_DEFAULT = CaptionSetConfig()


def is_default_mapping(cfg: CaptionSetConfig) -> bool:
    """Whether the set's column mapping is left at its defaults (then a layout may set it)."""
    return cfg.image_column == _DEFAULT.image_column and cfg.caption_columns == _DEFAULT.caption_columns


def img2dataset_command(csv_path: str, out_dir: str, columns: list[str]) -> str:
    """The img2dataset command LLM2CLIP's ``download_dataset.sh`` runs on a DreamLIP file."""
    fmt = "parquet" if csv_path.endswith(".parquet") else "csv"
    extra = json.dumps([c for c in DREAMLIP_CAPTIONS if c in columns] or list(DREAMLIP_CAPTIONS))
    return (
        f"img2dataset --url_list {shlex.quote(csv_path)} --input_format {fmt} "
        f'--url_col "{DREAMLIP_IMAGE}" --caption_col "raw_caption" --output_format webdataset '
        f"--save_additional_columns {shlex.quote(extra)} --output_folder {shlex.quote(out_dir)} "
        '--resize_mode "keep_ratio" --image_size 384'
    )


def _header(path: Path, fmt: str) -> tuple[list[str], dict[str, Any]]:
    """``(column names, first record)`` of a manifest, reading as little as it can."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
            first = next(pf.iter_batches(batch_size=1), None)
        except Exception:  # the reader names a broken file itself
            return [], {}
        row = first.to_pylist()[0] if first is not None and first.num_rows else {}
        return pf.schema_arrow.names, row
    if fmt == "csv":
        import csv

        csv.field_size_limit(1 << 30)
        try:
            with open(path, encoding="utf-8", newline="") as f:
                reader = csv.reader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
                header = next(reader, [])
                values = next(reader, [])
        except (OSError, UnicodeDecodeError, csv.Error):
            return [], {}
        return header, dict(zip(header, values, strict=False))
    if fmt == "json":
        try:
            with open(path, "rb") as f:
                head = f.read(1 << 16)
        except OSError:
            return [], {}
        if head.lstrip().startswith(b"["):  # a JSON list: only the keys that show up early matter
            keys = [CONVERSATIONS] if b'"conversations"' in head else []
            return keys, {}
        line = head.split(b"\n", 1)[0]
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return [], {}
        return (list(row), row) if isinstance(row, dict) else ([], {})
    return [], {}


def _first_shard_json(shard: str) -> dict[str, Any]:
    """The first ``KEY.json`` member of a webdataset shard (img2dataset's metadata), or {}."""
    try:
        with tarfile.open(shard, "r:") as tar:
            for n, member in enumerate(tar):
                if member.isfile() and member.name.endswith(".json"):
                    f = tar.extractfile(member)
                    row = json.loads(f.read()) if f is not None else {}
                    return row if isinstance(row, dict) else {}
                if n > 64:
                    break
    except (tarfile.TarError, OSError, json.JSONDecodeError, UnicodeDecodeError):
        pass
    return {}


def recognise(
    cfg: CaptionSetConfig, fmt: str, shards: list[str] | None = None
) -> tuple[CaptionSetConfig, str]:
    """``(the config to read the set with, the layout's name or "")`` (see the module docstring).

    Raises:
        DataError: a DreamLIP file whose images are URLs (names the img2dataset command).
    """
    if not is_default_mapping(cfg):
        return cfg, ""
    if fmt == "webdataset":
        row = _first_shard_json(shards[0]) if shards else {}
        if all(c in row for c in DREAMLIP_PAIR):
            return dataclasses.replace(cfg, caption_columns=dict(DREAMLIP_PAIR)), "dreamlip-img2dataset"
        return cfg, ""
    path = Path(cfg.path)
    columns, first = _header(path, fmt)
    if DREAMLIP_IMAGE in columns and any(c in columns for c in DREAMLIP_CAPTIONS):
        image = str(first.get(DREAMLIP_IMAGE) or "")
        if image.startswith(("http://", "https://")):
            out = path.parent / path.name.split(".")[0]
            raise DataError(
                f"{path}: a DreamLIP caption file whose '{DREAMLIP_IMAGE}' column holds URLs; download "
                f"the images first, as LLM2CLIP's download_dataset.sh does: "
                f"{img2dataset_command(str(path), str(out), columns)} ; then set data.train.path: {out}"
            )
        pair = {c: k for c, k in DREAMLIP_PAIR.items() if c in columns}
        mapping = pair or {
            c: ("short" if c.startswith("short") else "long") for c in DREAMLIP_CAPTIONS if c in columns
        }
        return dataclasses.replace(cfg, image_column=DREAMLIP_IMAGE, caption_columns=mapping), "dreamlip"
    if all(c in columns for c in PAIR_COLUMNS) and cfg.image_column not in columns:
        return dataclasses.replace(cfg, image_column="", caption_columns=dict(PAIR_COLUMNS)), "caption-pairs"
    if CONVERSATIONS in columns:
        return dataclasses.replace(cfg, caption_columns={CONVERSATIONS: "long"}), "conversations"
    return cfg, ""


def conversation_caption(turns: list[Any], where: str) -> list[str]:
    """The first ``gpt`` answer of a LLaVA / ShareGPT4V conversation (``<image>`` removed)."""
    for turn in turns:
        if not isinstance(turn, dict) or "value" not in turn:
            raise DataError(f"{where}: conversation turn {str(turn)[:60]!r} has no 'from'/'value'")
        if turn.get("from") == "gpt":
            value = turn["value"]
            if not isinstance(value, str):
                raise DataError(f"{where}: gpt answer {str(value)[:60]!r} is not text")
            return [value.replace("<image>", "").strip()]
    return []


def is_conversation(value: Any) -> bool:
    """Whether a caption cell is a conversation (a list of ``{"from", "value"}`` turns)."""
    return isinstance(value, list) and bool(value) and all(isinstance(t, dict) and "from" in t for t in value)
