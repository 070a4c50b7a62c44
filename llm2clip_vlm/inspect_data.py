"""``llm2clip-vlm inspect-data``: a data doctor to run before a multi-day job.

For each path it finds what the training commands would read, through the same readers (so the
report is what a run will see, and every layout a reader learns comes along):

- a caption set (``data.train`` of stage 1 / embed / stage 2), through
  :func:`~llm2clip_vlm.data.captions.index_caption_set`: its cached, memory-mapped index is
  built once (the first training start then costs nothing) and every figure is taken from its
  columns, vectorised chunk by chunk; no per-record Python object is kept, so 10M records fit in
  the data path's own memory budget;
- LLaVA records (a JSON/JSONL file of ``conversations``, or ``llava-shards`` output), through
  :func:`~llm2clip_vlm.data.conversations.load_llava_records` (images not decoded up front).

It reports the format, records, bad records by cause (missing image files, duplicate keys,
damaged shards, ...), images decodable on a sample (or all), captions per kind with token-length
percentiles against the encoder's ``max_length``, LLM2CLIP side-cars and their width, and the
``data:`` block of a recipe that reads the path as it is. The last line says ``ready`` or what to
fix first.
"""

from __future__ import annotations

import csv
import json
import os
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llm2clip_vlm.data.captions import (
    IndexedRecords,
    expand_shards,
    files_shards,
    index_caption_set,
    is_shard_path,
    open_image,
    sidecars_of,
)
from llm2clip_vlm.data.check import check_caption_images
from llm2clip_vlm.data.config import CaptionSetConfig
from llm2clip_vlm.data.conversations import load_llava_records
from llm2clip_vlm.data.errors import BadRecords, DataError
from llm2clip_vlm.data.images import load_rgb
from llm2clip_vlm.data.index import KIND_NAMES, scan_tar
from llm2clip_vlm.logging import get_logger
from llm2clip_vlm.progress import make_progress

log = get_logger(__name__)

# Bad-record causes, by what the readers' messages say (first match wins).
CAUSES = (
    ("damaged shard", re.compile(r"shard is damaged")),
    ("duplicate key", re.compile(r"duplicate key")),
    ("missing image", re.compile(r"does not exist|names an image but")),
    ("no image member", re.compile(r"no image member")),
    ("no caption", re.compile(r"no caption|empty caption|not text")),
    ("broken record", re.compile(r"broken|malformed|not UTF-8|not a JSON object")),
)
# Column names the field's tools write, and the caption type each one is.
SHORT_LIKE = ("caption", "raw_caption", "text", "txt", "short_caption", "title")
LLM2CLIP_SIDECAR_COLUMNS = {"shortSV_captions": "short", "longSV_captions": "long"}


@dataclass
class Report:
    """What ``inspect-data`` found in one path (plain numbers and lines: printed, or tested)."""

    path: str
    kind: str  # "caption set" | "llava"
    format: str
    records: int = 0
    bad: Counter = field(default_factory=Counter)  # cause -> count
    first_bad: dict[str, str] = field(default_factory=dict)  # cause -> the first message
    images_checked: int = 0
    images_undecodable: int = 0
    first_undecodable: str = ""
    captions: dict[str, dict[str, float]] = field(default_factory=dict)  # kind -> stats
    tokens: dict[str, dict[str, float]] = field(default_factory=dict)  # kind -> percentiles
    token_unit: str = "tokens"
    max_length: int = 0
    sidecars: dict[str, Any] = field(default_factory=dict)
    block: dict[str, Any] = field(default_factory=dict)  # the recipe's data: block for this path
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # what to fix, most important first

    @property
    def bad_total(self) -> int:
        return sum(self.bad.values())


def cause_of(reason: str) -> str:
    return next((name for name, pattern in CAUSES if pattern.search(reason)), "other")


# ----------------------------------------------------------------------------------------------
# What a path is
# ----------------------------------------------------------------------------------------------
def _first_json_record(path: Path) -> dict[str, Any] | None:
    """The first record of a JSON list / JSONL file, reading at most 1 MiB (None: not JSON)."""
    with open(path, "rb") as f:
        head = f.read(1 << 20).decode("utf-8", errors="replace").lstrip()
    if head.startswith("["):
        try:  # the first element only: decode one value after the bracket
            first, _ = json.JSONDecoder().raw_decode(head[1:].lstrip())
        except json.JSONDecodeError:
            return None
        return first if isinstance(first, dict) else None
    line = head.split("\n", 1)[0]
    try:
        first = json.loads(line)
    except json.JSONDecodeError:
        return None
    return first if isinstance(first, dict) else None


def _is_llava(path: str) -> bool:
    """LLaVA records: a JSON file whose records hold ``conversations``, or llava-shards output."""
    p = Path(path)
    if p.is_file() and p.suffix.lower() in (".json", ".jsonl"):
        first = _first_json_record(p)
        return bool(first and "conversations" in first)
    if is_shard_path(path):
        try:
            files = expand_shards(path)
        except DataError:
            return False
        return "conversations" in _first_member_fields(files[0])
    return False


def _first_member_fields(shard: str) -> set[str]:
    """The fields of the first sample's ``.json`` member (+ ``txt`` when it has a text member)."""
    try:
        for rec in scan_tar(shard, ()):
            fields: set[str] = set()
            if "json" in rec.texts:
                parsed = json.loads(rec.texts["json"])
                fields |= set(parsed) if isinstance(parsed, dict) else set()
            if "txt" in rec.texts:
                fields.add("txt")
            return fields
    except (tarfile.TarError, OSError, ValueError):
        return set()
    return set()


def _columns_of(path: str) -> list[str]:
    """The columns (fields) a caption set's records have, from its first record or header."""
    if is_shard_path(path):
        try:
            return sorted(_first_member_fields(expand_shards(path)[0]))
        except DataError:
            return []
    folders = files_shards(path)
    if folders:
        with os.scandir(folders[0]) as entries:
            first = next(
                (e.path for e in sorted(entries, key=lambda e: e.name) if e.name.endswith(".json")), None
            )
        return sorted(json.loads(Path(first).read_text())) if first else []
    p = Path(path)
    suffix = p.suffix.lower()
    if not p.is_file():
        return []
    if suffix in (".csv", ".tsv"):
        with open(p, encoding="utf-8", newline="") as f:
            return next(csv.reader(f, delimiter="\t" if suffix == ".tsv" else ","), [])
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.ParquetFile(p).schema_arrow.names)
    if suffix in (".json", ".jsonl"):
        first = _first_json_record(p)
        return sorted(first) if first else []
    return []


def _caption_like(columns: Sequence[str]) -> dict[str, str]:
    """Caption columns among ``columns``: ``short*caption*`` / ``long*caption*`` by their prefix,
    else the single-caption names img2dataset and manifests use (short)."""
    typed = {
        c: ("short" if c.lower().startswith("short") else "long")
        for c in columns
        if re.match(r"(?i)^(short|long).*caption", c)
    }
    if typed:
        return typed
    return next(({c: "short"} for c in SHORT_LIKE if c in columns), {})


def guess_caption_columns(path: str, has_sidecars: bool) -> dict[str, str]:
    """The caption columns a recipe should map for ``path`` (empty: none recognised)."""
    columns = _columns_of(path)
    if has_sidecars and all(c in columns for c in LLM2CLIP_SIDECAR_COLUMNS):
        # The side-cars embed these two: reading them keeps the store and the data row for row.
        return dict(LLM2CLIP_SIDECAR_COLUMNS)
    found = _caption_like(columns)
    if found == {"txt": "short"}:  # a webdataset .txt member is read under the first column
        return {"caption": "short"}
    return found


# ----------------------------------------------------------------------------------------------
# Inspecting
# ----------------------------------------------------------------------------------------------
def sidecar_info(shards: Sequence[str]) -> dict[str, Any]:
    """``{"count", "shards", "dim"}`` of the LLM2CLIP side-cars beside ``shards`` (empty: none)."""
    sides = sidecars_of(shards)
    if not sides:
        return {}
    dim = 0
    try:
        with tarfile.open(sides[0]) as tar:
            member = next((m for m in tar if m.isfile()), None)
            dim = member.size // 4 if member is not None else 0
    except (tarfile.TarError, OSError):
        dim = 0
    return {"count": len(sides), "shards": len(shards), "dim": dim}


def caption_stats(index: Any) -> dict[str, dict[str, float]]:
    """Per kind: records with one or more, and captions per record (mean/max), from the index's
    ``kinds`` column chunk by chunk (no record is built)."""
    with_kind = np.zeros(len(KIND_NAMES), dtype=np.int64)
    total = np.zeros(len(KIND_NAMES), dtype=np.int64)
    most = np.zeros(len(KIND_NAMES), dtype=np.int64)
    for chunk in index.table.column("kinds").chunks:
        offsets = chunk.offsets.to_numpy()
        flat = chunk.values.to_numpy()
        for code in range(len(KIND_NAMES)):
            cum = np.zeros(len(flat) + 1, dtype=np.int64)
            np.cumsum(flat == code, out=cum[1:])
            per = cum[offsets[1:]] - cum[offsets[:-1]]
            with_kind[code] += int((per > 0).sum())
            total[code] += int(per.sum())
            most[code] = max(most[code], int(per.max()) if len(per) else 0)
    n = max(len(index), 1)
    return {
        name: {
            "records": int(with_kind[c]),
            "captions": int(total[c]),
            "per_record": total[c] / n,
            "max": int(most[c]),
        }
        for c, name in enumerate(KIND_NAMES)
    }


def _sample(n: int, k: int) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, min(n, k)).astype(np.int64)) if n else np.zeros(0, np.int64)


def token_stats(
    index: Any, count_tokens: Callable[[list[str]], list[int]], max_length: int, sample: int
) -> dict[str, dict[str, float]]:
    """Token-length percentiles per kind over the captions of ``sample`` records spread evenly."""
    texts: dict[str, list[str]] = {name: [] for name in KIND_NAMES}
    for i in _sample(len(index), sample):
        for c in index.captions_of(int(i)):
            texts[c.kind].append(c.text)
    out = {}
    for kind, items in texts.items():
        if not items:
            continue
        lengths = np.asarray(count_tokens(items), dtype=np.int64)
        p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
        over = float((lengths > max_length).mean()) if max_length else 0.0
        out[kind] = {
            "n": len(items),
            "p50": p50,
            "p90": p90,
            "p99": p99,
            "max": int(lengths.max()),
            "over": over,
        }
    return out


def _check_sample(
    records: Sequence[Any], load: Callable[[Any], Any], k: int, label: str
) -> tuple[int, int, str]:
    """``(checked, undecodable, first message)`` over ``k`` records spread evenly."""
    picks = _sample(len(records), k)
    bad, first = 0, ""
    with make_progress() as progress:
        task = progress.add_task(label, total=len(picks), status="", unit="image")
        for i in picks:
            try:
                load(records[int(i)])
            except DataError as e:
                bad += 1
                first = first or str(e)
            progress.advance(task)
    return len(picks), bad, first


def inspect_caption_set(
    cfg: CaptionSetConfig,
    *,
    count_tokens: Callable[[list[str]], list[int]],
    token_unit: str,
    max_length: int,
    sample: int = 1000,
    all_images: bool = False,
    workers: int = 4,
) -> Report:
    """Inspect one caption set (see the module docstring)."""
    shards = expand_shards(cfg.path) if is_shard_path(cfg.path) else []
    side = sidecar_info(shards) if shards else {}
    if not cfg.caption_columns:
        cfg.caption_columns = guess_caption_columns(cfg.path, bool(side))
        if not cfg.caption_columns:
            columns = _columns_of(cfg.path)
            raise DataError(
                f"{cfg.path}: no caption column recognised among {columns}; name them with "
                "--caption-column COLUMN=short|long (or --recipe with data.train.caption_columns)"
            )
    written = dict(cfg.caption_columns)  # what the recipe block says
    # What a run reads: a recipe's caption_columns are merged into the defaults (config_io), so
    # the index is the one the run will open (built once, here).
    cfg.caption_columns = {**CaptionSetConfig().caption_columns, **written}
    log.info("inspect-data: indexing %s (once; a training run then reuses the index)", cfg.path)
    index = index_caption_set(cfg)
    fmt = index.meta["settings"].get("format", "?")
    report = Report(cfg.path, "caption set", fmt, records=len(index), sidecars=side, max_length=max_length)
    for bad in index.bad():
        cause = cause_of(bad.reason)
        report.bad[cause] += 1
        report.first_bad.setdefault(cause, bad.reason)
    report.captions = caption_stats(index)
    report.token_unit = token_unit
    report.tokens = token_stats(index, count_tokens, max_length, sample)
    records = IndexedRecords(index, len(index))
    if all_images:
        policy = BadRecords(True, 1.0, name=cfg.path)
        check_caption_images(records, policy, workers=workers, description="decoding every image")
        report.images_checked, report.images_undecodable = len(records), len(policy.skipped)
        report.first_undecodable = policy.skipped[0][1] if policy.skipped else ""
    else:
        report.images_checked, report.images_undecodable, report.first_undecodable = _check_sample(
            records, open_image, sample, "decoding a sample of images"
        )
    block: dict[str, Any] = {"path": cfg.path, "caption_columns": written}
    for name in ("image_root", "image_column", "key_column", "format"):
        value = getattr(cfg, name)
        if value and value != getattr(CaptionSetConfig(), name):
            block[name] = value
    report.block = block
    _judge(report)
    return report


def inspect_llava(
    path: str, image_folder: str = "", *, sample: int = 1000, all_images: bool = False
) -> Report:
    """Inspect LLaVA records (JSON/JSONL + image folder, or llava-shards output)."""
    policy = BadRecords(True, 1.0, name=path)
    try:
        records: Sequence[Any] = load_llava_records(
            path, image_folder, skip_bad=True, max_bad_fraction=1.0, verify_images=False, bad=policy
        )
    except DataError:
        if not policy.skipped:  # the file itself is unreadable: its own one-line message
            raise
        records = []  # every record is bad: the report says why
    fmt = "llava shards" if is_shard_path(path) else "llava json"
    report = Report(path, "llava", fmt, records=len(records))
    for _, reason in policy.skipped:
        cause = cause_of(reason)
        report.bad[cause] += 1
        report.first_bad.setdefault(cause, reason)
    with_image = [
        i for i in _sample(len(records), len(records) if all_images else sample) if records[int(i)].has_image
    ]
    report.images_checked, report.images_undecodable, report.first_undecodable = _check_sample(
        [records[i] for i in with_image],
        lambda r: load_rgb(r.image, r.source),
        len(with_image),
        "decoding images",
    )
    turns = [len(records[int(i)].conversations) for i in _sample(len(records), sample)] or [2]
    phase = "pretrain" if turns and max(turns) == 2 else "finetune"
    report.notes.append(f"{len(turns)} sampled records have {min(turns, default=0)}-{max(turns, default=0)} turns: "
                        f"looks like {phase} data")  # fmt: skip
    block: dict[str, Any] = {"path": path}
    if image_folder:
        block["image_folder"] = image_folder
    report.block = {"llava": {phase: {"data": block}}}
    _judge(report)
    return report


def _judge(report: Report) -> None:
    """What to fix, most important first (appended to ``report.problems``)."""
    total = report.records + report.bad_total
    missing = report.bad.get("missing image", 0)
    key = "image_folder" if report.kind == "llava" else "image_root"
    if total and missing > 0.5 * total and re.search(r"https?:/", report.first_bad["missing image"]):
        report.problems.append(
            f"{missing} of {total} images are URLs, not files ({report.first_bad['missing image']}): download them "
            "with img2dataset (--url_col IMAGE_COLUMN --save_additional_columns '[CAPTION_COLUMNS]' "
            "--output_format webdataset) and inspect its output folder"
        )
    elif total and missing > 0.5 * total:
        report.problems.append(
            f"{missing} of {total} images are missing ({report.first_bad['missing image']}): "
            f"set {key} to the folder the image paths are relative to"
        )
    if report.bad.get("damaged shard"):
        report.problems.append(
            f"damaged shard(s): {report.first_bad['damaged shard']}; download it again, or set data.skip_bad=true "
            "to keep its readable records"
        )
    if report.bad.get("duplicate key"):
        report.problems.append(
            f"{report.bad['duplicate key']} duplicate keys ({report.first_bad['duplicate key']}): "
            "set key_column to a unique column (img2dataset: key_column: url)"
        )
    rest = report.bad_total - missing * (total and missing > 0.5 * total) - report.bad.get("damaged shard", 0)
    rest -= report.bad.get("duplicate key", 0)
    if rest > 0:
        first = next(v for k, v in report.first_bad.items() if k not in ("damaged shard", "duplicate key"))
        report.problems.append(
            f"{report.bad_total} bad records ({', '.join(f'{v} {k}' for k, v in report.bad.most_common())}); "
            f"first: {first}. A run stops at the first one: fix them, or set data.skip_bad=true"
            + (" (max_bad_fraction too: the share is above 1%)" if report.bad_total > 0.01 * total else "")
        )
    if report.images_undecodable:
        report.problems.append(
            f"{report.images_undecodable} of {report.images_checked} images checked do not decode "
            f"({report.first_undecodable}); replace them or set data.skip_bad=true"
        )
    if report.records == 0 and not report.problems:
        report.problems.append(f"{report.path}: no usable record")
    for kind, t in report.tokens.items():
        if t["over"] > 0:
            report.notes.append(
                f"{100 * t['over']:.1f}% of the sampled {kind} captions exceed max_length {report.max_length} "
                f"{report.token_unit} and are cut (stage1.max_length / embed)"
            )
    side = report.sidecars
    if side and side["count"] != side["shards"]:
        report.notes.append(
            f"only {side['count']} of {side['shards']} shards have a side-car: stage 2 embeds with its encoder"
        )


def render(report: Report) -> list[str]:
    """The report as plain lines (the CLI prints them; the ``data:`` block is separate)."""
    lines = [f"{report.path}: {report.kind}, format {report.format}"]
    total = report.records + report.bad_total
    lines.append(f"  records: {report.records} usable of {total}")
    if report.bad:
        lines.append("  bad: " + ", ".join(f"{v} {k}" for k, v in report.bad.most_common()))
        for cause, first in report.first_bad.items():
            lines.append(f"    first {cause}: {first}")
    found = report.records if report.kind == "caption set" else report.images_checked
    lines.append(
        f"  images: {found} found, {report.bad.get('missing image', 0)} missing, "
        f"{report.images_undecodable} undecodable of {report.images_checked} decoded"
        + (" (a sample; --all decodes every one)" if report.images_checked < report.records else "")
    )
    for kind, c in report.captions.items():
        line = f"  {kind} captions: {c['captions']} in {c['records']} records ({c['per_record']:.2f} per record, max {c['max']})"
        t = report.tokens.get(kind)
        if t:
            line += (
                f"; {report.token_unit} p50 {t['p50']:.0f} p90 {t['p90']:.0f} p99 {t['p99']:.0f} max {t['max']}"
                f" (max_length {report.max_length}: {100 * t['over']:.1f}% over, {t['n']} sampled)"
            )
        lines.append(line)
    if report.bad.get("duplicate key"):
        lines.append(f"  duplicate keys: {report.bad['duplicate key']}")
    elif report.kind == "caption set":
        lines.append("  duplicate keys: none")
    if report.sidecars:
        s = report.sidecars
        lines.append(f"  LLM2CLIP side-cars: {s['count']} of {s['shards']} shards, {s['dim']}-d vectors")
    lines += [f"  note: {n}" for n in report.notes]
    return lines


def recipe_block(reports: Sequence[Report]) -> dict[str, Any]:
    """The ``data:`` (and ``llava:``) recipe block that reads every path as it is."""
    sets = [r.block for r in reports if r.kind == "caption set"]
    out: dict[str, Any] = {}
    if sets:
        # One set: data.train is the set; several: a list of sets (each keeps its own columns).
        out["data"] = {"train": sets[0] if len(sets) == 1 else sets}
        if any(r.bad_total for r in reports if r.kind == "caption set"):
            out["data"]["skip_bad"] = True
    for r in reports:
        if r.kind == "llava":
            for phase, section in r.block["llava"].items():
                out.setdefault("llava", {})[phase] = section
    return out


def verdict(reports: Sequence[Report]) -> str:
    """The last line: ``ready`` or the first thing to fix."""
    problems = [p for r in reports for p in r.problems]
    if not problems:
        return "ready: the block above reads this data as it is"
    more = f" (and {len(problems) - 1} more above)" if len(problems) > 1 else ""
    return f"fix first: {problems[0]}{more}"


def is_llava(path: str) -> bool:
    """Whether ``path`` holds LLaVA records (conversations) rather than a caption set."""
    return _is_llava(path)
