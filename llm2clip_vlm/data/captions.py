"""Reading image-caption data sets into :class:`CaptionSet` (a sequence of ``ImageCaptions``).

Formats (all read through Hugging Face ``datasets``; see ``docs/DATA.md``):

- manifests: ``.json`` / ``.jsonl`` / ``.csv`` / ``.tsv`` / ``.parquet`` with an image column and
  caption columns mapped to a type (``CaptionSetConfig.caption_columns``). A caption column may
  hold one string, a list of strings, or a string that encodes a list (DreamLIP-style CSVs:
  ``"['a cat', 'a cat on a mat']"``), parsed with ``json``/``ast.literal_eval``, never ``eval``.
- webdataset tar shards as img2dataset writes them: ``<key>.<jpg|png|webp>`` + ``<key>.json``
  (caption columns inside) and/or ``<key>.txt`` (one short caption).

Bad records (a missing image file, a path leaving the image root, no caption, an empty or
non-text caption, a missing column) raise :class:`DataError` naming the file, row and problem;
with ``skip_bad=True`` they are skipped and reported, and the load still stops if more than
``max_bad_fraction`` of the records are bad.
"""

from __future__ import annotations

import ast
import glob
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from llm2clip_vlm.data import images
from llm2clip_vlm.data.config import CaptionSetConfig, DataConfig
from llm2clip_vlm.data.errors import BadRecords, DataError, write_report
from llm2clip_vlm.data.records import Caption, ImageCaptions
from llm2clip_vlm.data.synthetic import demo_spec, write_demo_dataset
from llm2clip_vlm.logging import get_logger

log = get_logger(__name__)

MANIFEST_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")


class CaptionSet(Sequence[ImageCaptions]):
    """The records of one image-caption data set, plus what was skipped while reading it."""

    def __init__(
        self, records: list[ImageCaptions], name: str = "", skipped: list[tuple[str, str]] | None = None
    ):
        self.records = records
        self.name = name
        self.skipped: list[tuple[str, str]] = skipped or []

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> ImageCaptions:  # type: ignore[override]
        return self.records[index]

    def __iter__(self) -> Iterator[ImageCaptions]:
        return iter(self.records)

    @property
    def num_captions(self) -> int:
        return sum(len(r.captions) for r in self.records)

    def __repr__(self) -> str:
        return f"CaptionSet({self.name!r}, images={len(self)}, captions={self.num_captions}, skipped={len(self.skipped)})"


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------
def safe_image_path(root: Path, relative: str, where: str) -> Path:
    """``root / relative``, refusing absolute paths or ``..`` that leave the image root."""
    root = root.resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise DataError(f"{where}: image path {relative!r} leaves the image root {root}")
    return path


def open_image(record: ImageCaptions):  # -> PIL.Image.Image
    """Open a record's image as RGB (file path or encoded bytes); see :func:`images.load_rgb`."""
    # Looked up at call time, so one patch of images.load_rgb (a test's slow loader) covers it.
    return images.load_rgb(record.image, record.source or record.key)


# ----------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------
def parse_caption_value(value: Any, where: str) -> list[str]:
    """One caption column's value -> list of caption strings (raises DataError when malformed)."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                try:
                    value = ast.literal_eval(text)
                except (ValueError, SyntaxError) as e:
                    raise DataError(f"{where}: caption list {text[:60]!r} cannot be parsed ({e})") from e
        else:
            return [value]
    if isinstance(value, (list, tuple)):
        out = []
        for v in value:
            if not isinstance(v, str):
                raise DataError(f"{where}: caption {v!r} is not text")
            out.append(v)
        return out
    raise DataError(f"{where}: caption value {value!r} is not text or a list of texts")


def _captions_of(row: dict[str, Any], cfg: CaptionSetConfig, where: str) -> list[Caption]:
    captions = []
    for column, kind in cfg.caption_columns.items():
        if column not in row:
            continue
        for text in parse_caption_value(row[column], f"{where} column {column!r}"):
            if not text.strip():
                raise DataError(f"{where} column {column!r}: empty caption")
            captions.append(Caption(text.strip(), kind))
    if not captions:
        raise DataError(f"{where}: no caption in columns {list(cfg.caption_columns)}")
    return captions


# ----------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------
def _detect_format(cfg: CaptionSetConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    path = cfg.path
    if (
        path.endswith(".tar")
        or "{" in path
        or (os.path.isdir(path) and glob.glob(os.path.join(path, "*.tar")))
    ):
        return "webdataset"
    suffix = Path(path).suffix.lower()
    if suffix in MANIFEST_FORMATS:
        return MANIFEST_FORMATS[suffix]
    raise DataError(f"{path}: cannot tell the format from the name; set format: json|csv|parquet|webdataset")


_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Expand webdataset brace patterns: ``a-{000..002}.tar`` and ``{x,y}`` (zero padding kept)."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.groups()
        width = len(lo) if lo.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    head, tail = pattern[: m.start()], pattern[m.end() :]
    return [head + o + rest for o in options for rest in expand_braces(tail)]


def _expand_shards(path: str) -> list[str]:
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.tar")))
    elif "{" in path:
        files = [f for p in expand_braces(path) for f in sorted(glob.glob(p))]
    else:
        files = sorted(glob.glob(path))
    if not files:
        raise DataError(f"{path}: no webdataset .tar shards found")
    return files


def _json_rows(path: Path) -> tuple[list[tuple[int, dict[str, Any] | DataError]], list[str]]:
    """``(line or element number, row or DataError)`` of a JSON list or a JSON-lines file.

    Read by hand rather than through ``datasets``: one broken line must be reported (and be
    skippable) on its own, not fail the whole file with a message that names no line.
    """
    raw = path.read_bytes()
    rows: list[tuple[int, dict[str, Any] | DataError]] = []
    if raw.lstrip().startswith(b"["):  # one JSON list of records: one bad byte spoils the file
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise DataError(f"{path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x}): {e.reason}") from e
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: broken JSON ({e.msg}, column {e.colno})") from e
        for i, item in enumerate(items):
            ok = isinstance(item, dict)
            rows.append((i + 1, item if ok else DataError(f"{path}:{i + 1}: record is not a JSON object")))
    else:  # JSON lines: a line that is not UTF-8 is one bad record (skippable), not a bad file
        for n, raw_line in enumerate(raw.splitlines(), start=1):
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as e:
                bad = raw_line[e.start]
                rows.append(
                    (n, DataError(f"{path}:{n}: not UTF-8 (byte 0x{bad:02x} at column {e.start + 1})"))
                )
                continue
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                rows.append((n, DataError(f"{path}:{n}: broken JSON line ({e.msg}, column {e.colno})")))
                continue
            ok = isinstance(item, dict)
            rows.append((n, item if ok else DataError(f"{path}:{n}: record is not a JSON object")))
    columns = sorted({k for _, r in rows if isinstance(r, dict) for k in r})
    return rows, columns


def _check_columns(cfg: CaptionSetConfig, path: Path, columns: list[str]) -> None:
    missing = [c for c in [cfg.image_column] if c not in columns]
    if cfg.key_column and cfg.key_column not in columns:
        missing.append(cfg.key_column)
    if not any(c in columns for c in cfg.caption_columns):
        missing.append(" or ".join(cfg.caption_columns))
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; columns are {columns}")


def _load_manifest(cfg: CaptionSetConfig, fmt: str) -> Any:
    import datasets

    path = Path(cfg.path)
    if not path.is_file():
        raise DataError(f"{path}: manifest does not exist")
    if fmt == "json":
        rows, columns = _json_rows(path)
        broken = [r for _, r in rows if isinstance(r, DataError)]
        if broken and not columns:  # not one readable record: the file itself is broken
            raise DataError(f"{broken[0]} (and no line of {path} is a readable record)")
        _check_columns(cfg, path, columns)
        return rows
    kwargs: dict[str, Any] = {}
    if fmt == "csv" and path.suffix.lower() == ".tsv":
        kwargs["delimiter"] = "\t"
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(fmt, data_files=str(path), split="train", **kwargs)
    except Exception as e:  # datasets raises a zoo of types for malformed files
        where = _csv_bad_line(path, kwargs.get("delimiter", ",")) if fmt == "csv" else None
        if where is not None:
            raise DataError(f"{path}:{where[0]}: malformed CSV row ({where[1]})") from e
        raise DataError(f"{path}: cannot be read as {fmt}: {type(e).__name__}: {e}") from e
    _check_columns(cfg, path, ds.column_names)
    return ds


def _csv_bad_line(path: Path, delimiter: str) -> tuple[int, str] | None:
    """The first line of a CSV file that does not parse or has another field count than the header."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f, delimiter=delimiter, strict=True)
            header = next(reader, [])
            for row in reader:
                if row and len(row) != len(header):
                    return reader.line_num, f"{len(row)} fields, the header has {len(header)}"
    except csv.Error as e:
        return reader.line_num, str(e)
    except UnicodeDecodeError as e:
        return 0, f"not UTF-8 ({e.reason})"
    return None


def _manifest_records(cfg: CaptionSetConfig, fmt: str) -> Iterator[tuple[str, ImageCaptions | DataError]]:
    ds = _load_manifest(cfg, fmt)
    path = Path(cfg.path)
    root = Path(cfg.image_root) if cfg.image_root else path.parent
    # JSON: line (JSONL) or element number, 1-based; CSV rows count the header.
    offset = 2 if fmt == "csv" else 1
    numbered = ds if fmt == "json" else ((i + offset, row) for i, row in enumerate(ds))
    for n, row in numbered:
        where = f"{path}:{n}"
        if isinstance(row, DataError):  # a broken JSON line
            yield where, row
            continue
        try:
            if cfg.image_column not in row:
                raise DataError(f"{where}: no {cfg.image_column!r} column")
            if cfg.key_column and cfg.key_column not in row:
                raise DataError(f"{where}: no {cfg.key_column!r} column")
            image = row[cfg.image_column]
            if not isinstance(image, str) or not image:
                raise DataError(f"{where}: image column {cfg.image_column!r} is empty or not a path")
            image_path = safe_image_path(root, image, where)
            if not image_path.is_file():
                raise DataError(f"{where}: image file {image_path} does not exist")
            key = str(row[cfg.key_column]) if cfg.key_column else image
            yield where, ImageCaptions(key, str(image_path), _captions_of(row, cfg, where), where)
        except DataError as e:
            yield where, e


def _webdataset_records(cfg: CaptionSetConfig) -> Iterator[tuple[str, ImageCaptions | DataError]]:
    import datasets

    shards = _expand_shards(cfg.path)
    datasets.disable_progress_bars()
    for shard in shards:
        try:
            ds = datasets.load_dataset("webdataset", data_files=shard, split="train")
            image_cols = [c for c in ds.column_names if c.lower() in IMAGE_EXTENSIONS]
            ds = ds.cast_column(image_cols[0], datasets.Image(decode=False)) if image_cols else ds
        except Exception as e:
            raise DataError(f"{shard}: cannot be read as a webdataset shard: {type(e).__name__}: {e}") from e
        for row in ds:
            key = row.get("__key__", "?")
            where = f"{shard}:{key}"
            try:
                image = next((row[c] for c in image_cols if row.get(c) is not None), None)
                if image is None:
                    raise DataError(f"{where}: no image member ({'/'.join(IMAGE_EXTENSIONS)})")
                fields = dict(row.get("json") or {})
                if row.get("txt") and not any(c in fields for c in cfg.caption_columns):
                    fields[next(iter(cfg.caption_columns))] = row["txt"]
                key = str(fields.get(cfg.key_column, key)) if cfg.key_column else key
                yield where, ImageCaptions(key, image["bytes"], _captions_of(fields, cfg, where), where)
            except DataError as e:
                yield where, e


def load_caption_set(
    cfg: CaptionSetConfig, *, skip_bad: bool = False, max_bad_fraction: float = 0.01, name: str = ""
) -> CaptionSet:
    """Read one image-caption data set.

    Args:
        cfg: where the data is and how its columns map to captions.
        skip_bad: skip bad records (and report them) instead of stopping at the first one.
        max_bad_fraction: with ``skip_bad``, stop anyway if more than this share is bad.
        name: a name for messages.

    Raises:
        DataError: naming the file/record and the problem.
    """
    if not cfg.path:
        raise DataError(f"data set {name or '?'}: no path given")
    fmt = _detect_format(cfg)
    rows = _webdataset_records(cfg) if fmt == "webdataset" else _manifest_records(cfg, fmt)
    policy = BadRecords(skip_bad, max_bad_fraction, name=cfg.path)
    records: list[ImageCaptions] = []
    first_seen: dict[str, str] = {}  # key -> where it first appeared
    for where, item in rows:
        if isinstance(item, ImageCaptions) and item.key in first_seen:
            # Two records of one key would be two "different" images to the contrastive loss and
            # the store: refused, or skipped (and reported) under skip_bad.
            item = DataError(f"{where}: duplicate key {item.key!r} (first at {first_seen[item.key]})")
        if isinstance(item, DataError):
            policy.add(where, item)
            continue
        first_seen[item.key] = where
        records.append(item)
        if cfg.max_images and len(records) >= cfg.max_images:
            break
    total = len(records) + len(policy.skipped)
    if total == 0:
        raise DataError(f"{cfg.path}: the data set is empty")
    policy.check(total)
    skipped = policy.skipped
    return CaptionSet(records, name=name or cfg.path, skipped=skipped)


# ----------------------------------------------------------------------------------------------
# A run's data
# ----------------------------------------------------------------------------------------------
def demo_dir_for(cfg: DataConfig, output_dir: str | Path) -> Path:
    return Path(cfg.demo_dir) if cfg.demo_dir else Path(output_dir) / "demo-data"


def ensure_demo_data(cfg: DataConfig, output_dir: str | Path) -> Path:
    """Generate the demo world unless a complete one with the same settings is already there."""

    root = demo_dir_for(cfg, output_dir)
    spec = demo_spec(cfg.demo_seed, cfg.demo_train_images, cfg.demo_heldout_images, 64)
    info_file = root / "dataset.json"
    if info_file.is_file():
        info = json.loads(info_file.read_text())
        if all(info.get(k) == v for k, v in spec.items()):
            return root
        log.info("demo data in %s was written with other settings; rewriting it", root)
    log.info("writing the synthetic demo world to %s", root)
    summary = write_demo_dataset(
        root, seed=cfg.demo_seed, train_images=cfg.demo_train_images, heldout_images=cfg.demo_heldout_images
    )
    log.info(summary)
    return root


def demo_set_configs(root: Path) -> tuple[CaptionSetConfig, dict[str, CaptionSetConfig]]:
    """Caption-set configs of the demo world: the train split and the two held-out sets."""
    train = CaptionSetConfig(path=str(root / "train.jsonl"), key_column="key")
    heldout = {
        # Multi-caption short set (3 per image) and a 1:1 long set, like Flickr/COCO vs DOCCI/Urban-1k.
        "short": CaptionSetConfig(
            path=str(root / "heldout_short.jsonl"),
            key_column="key",
            caption_columns={"short_captions": "short"},
        ),
        "long": CaptionSetConfig(
            path=str(root / "heldout_long.jsonl"), key_column="key", caption_columns={"long_captions": "long"}
        ),
    }
    return train, heldout


def resolve_data(cfg: DataConfig, output_dir: str | Path) -> tuple[CaptionSet, dict[str, CaptionSet]]:
    """The train set and the held-out sets of a run (the demo world when ``train.path`` is empty)."""
    if cfg.train.path:
        train_cfg, heldout_cfgs = cfg.train, dict(cfg.heldout)
    else:
        train_cfg, heldout_cfgs = demo_set_configs(ensure_demo_data(cfg, output_dir))
        heldout_cfgs.update(cfg.heldout)
    kw = {"skip_bad": cfg.skip_bad, "max_bad_fraction": cfg.max_bad_fraction}
    train = load_caption_set(train_cfg, name="train", **kw)
    heldout = {name: load_caption_set(c, name=name, **kw) for name, c in heldout_cfgs.items()}
    for name, cs in [("train", train), *heldout.items()]:
        if cs.skipped:  # the run's report of every skipped record and why
            report = write_report(output_dir, name, len(cs) + len(cs.skipped), cs.skipped)
            log.warning("%s: %d bad records skipped, listed in %s", name, len(cs.skipped), report)
    return train, heldout
