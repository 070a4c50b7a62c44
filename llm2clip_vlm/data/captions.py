"""Reading image-caption data sets into :class:`CaptionSet` (a sequence of ``ImageCaptions``).

Formats (see ``docs/DATA.md``):

- manifests: ``.json`` / ``.jsonl`` / ``.csv`` / ``.tsv`` / ``.parquet`` with an image column and
  caption columns mapped to a type (``CaptionSetConfig.caption_columns``). A caption column may
  hold one string, a list of strings, or a string that encodes a list (DreamLIP-style CSVs:
  ``"['a cat', 'a cat on a mat']"``), parsed with ``json``/``ast.literal_eval``, never ``eval``.
- webdataset tar shards as img2dataset writes them: ``<key>.<jpg|png|webp>`` + ``<key>.json``
  (caption columns inside) and/or ``<key>.txt`` (one short caption).

Every format is read once into a cached, memory-mapped columnar index (:mod:`.index`); a
:class:`CaptionSet` builds each record when it is accessed, so it holds O(1) Python memory per
record and never the images' bytes.

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
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llm2clip_vlm.data import images, layouts
from llm2clip_vlm.data.config import CaptionSetConfig, DataConfig, train_sets
from llm2clip_vlm.data.errors import BadRecords, DataError, write_report
from llm2clip_vlm.data.index import BadRow, DamagedShard, RecordIndex, Row, TarRecord, open_or_build, scan_tar
from llm2clip_vlm.data.records import Caption, ImageCaptions, KeptCaptions
from llm2clip_vlm.data.sets import SetPart, check_weights, join_indexes, set_names
from llm2clip_vlm.data.synthetic import demo_spec, write_demo_dataset
from llm2clip_vlm.logging import get_logger
from llm2clip_vlm.progress import make_progress

log = get_logger(__name__)

MANIFEST_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
# Every type :func:`images.load_rgb` decodes (PIL) that a data set's tools write: img2dataset
# (jpg/png/webp), LLaVA's folders (jpg, and gif for OCR-VQA: LLaVA issue #593), TIFF scans.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
# LLM2CLIP's ``extract_embedding.py`` writes ``x_text_embeddings.tar`` beside each image shard
# ``x.tar`` (microsoft/LLM2CLIP llm2clip/data/extract_embedding.py): never an image shard.
SIDECAR_SUFFIX = "_text_embeddings.tar"


class CaptionSet(Sequence[ImageCaptions]):
    """The records of one image-caption data set, plus what was skipped while reading it."""

    def __init__(
        self,
        records: Sequence[ImageCaptions],
        name: str = "",
        skipped: list[tuple[str, str]] | None = None,
        parts: list[SetPart] | None = None,
    ):
        self.records = records
        self.name = name
        self.skipped: list[tuple[str, str]] = skipped or []
        # The sets a list of sets was joined from (record ranges, weights); one part otherwise.
        self.parts: list[SetPart] = parts or [SetPart(name, name, 0, len(records), len(self.skipped), 1.0)]

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


class ImagePaths:
    """:func:`safe_image_path` + "is it a file" for many records, resolving each folder once.

    ``Path.resolve`` per record costs two syscalls per path component (measured: half of the
    time to index a manifest). Images share few folders: a folder's real path is cached, and only
    the file itself is checked (``lstat``; a symlink is followed and must stay under the root).
    """

    def __init__(self, root: Path) -> None:
        self.root = str(root.resolve())
        self._dirs: dict[str, str] = {}

    def __call__(self, relative: str, where: str) -> tuple[Path, bool]:
        """``(resolved path, is a file)``; raises DataError when the path leaves the root."""
        import stat

        joined = os.path.join(self.root, relative)
        parent, name = os.path.split(joined)
        if name in ("", ".", ".."):  # unusual: take the slow, general path
            path = safe_image_path(Path(self.root), relative, where)
            return path, path.is_file()
        real_parent = self._dirs.get(parent)
        if real_parent is None:
            real_parent = os.path.realpath(parent)
            if len(self._dirs) < 1_000_000:
                self._dirs[parent] = real_parent
        candidate = os.path.join(real_parent, name)
        try:
            st = os.lstat(candidate)
        except OSError:
            st = None
        if st is not None and stat.S_ISLNK(st.st_mode):
            candidate = os.path.realpath(candidate)
            st = os.stat(candidate) if os.path.exists(candidate) else None
        if candidate != self.root and not candidate.startswith(self.root + os.sep):
            raise DataError(f"{where}: image path {relative!r} leaves the image root {self.root}")
        return Path(candidate), st is not None and stat.S_ISREG(st.st_mode)


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
    if layouts.is_conversation(value):  # LLaVA / ShareGPT4V: the gpt answer is the caption
        return layouts.conversation_caption(value, where)
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
    if is_shard_path(path):
        return "webdataset"
    if files_shards(path):
        return "img2dataset-files"
    suffix = Path(path).suffix.lower()
    if suffix in MANIFEST_FORMATS:
        return MANIFEST_FORMATS[suffix]
    raise DataError(
        f"{path}: cannot tell the format from the name; set format: json|csv|parquet|webdataset|img2dataset-files"
    )


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


def is_sidecar(path: str) -> bool:
    """Whether ``path`` is an LLM2CLIP text-embedding side-car (``x_text_embeddings.tar``)."""
    return path.endswith(SIDECAR_SUFFIX)


def _tars_in(folder: str) -> list[str]:
    return sorted(f for f in glob.glob(os.path.join(folder, "*.tar")) if not is_sidecar(f))


def is_shard_path(path: str) -> bool:
    """Whether ``path`` names webdataset shards: a ``.tar``, a brace pattern, or a folder of ``.tar``."""
    return bool(path.endswith(".tar") or "{" in path or (os.path.isdir(path) and _tars_in(path)))


def expand_shards(path: str) -> list[str]:
    """The image shards ``path`` names (a folder's ``*.tar``, a brace pattern or a glob), in order.

    LLM2CLIP's side-cars (``*_text_embeddings.tar``) are never image shards: a folder or a glob
    that holds them yields the image shards only (:func:`sidecars_of` finds the side-cars).
    """
    if os.path.isdir(path):
        files = _tars_in(path)
    elif "{" in path:
        files = [f for p in expand_braces(path) for f in sorted(glob.glob(p))]
    else:
        files = sorted(glob.glob(path))
    sidecars = [f for f in files if is_sidecar(f)]
    files = [f for f in files if not is_sidecar(f)]
    if not files:
        also = f" (only {len(sidecars)} LLM2CLIP side-car(s) *{SIDECAR_SUFFIX})" if sidecars else ""
        raise DataError(f"{path}: no webdataset .tar shards found{also}")
    return files


def sidecar_for(shard: str) -> str:
    """``x.tar`` -> ``x_text_embeddings.tar`` (extract_embedding.py: ``tar_path.replace(".tar", ...)``)."""
    return shard[: -len(".tar")] + SIDECAR_SUFFIX


def sidecars_of(shards: Sequence[str]) -> list[str]:
    """The side-cars that lie beside ``shards`` (one per shard that has one, in shard order)."""
    return [side for side in map(sidecar_for, shards) if os.path.isfile(side)]


def _json_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | DataError]]:
    """``(line or element number, row or DataError)`` of a JSON list or a JSON-lines file.

    Read by hand rather than through ``datasets``: one broken line must be reported (and be
    skippable) on its own, not fail the whole file with a message that names no line. JSON lines
    are streamed (one line in memory at a time); a JSON list is parsed whole.
    """
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
        f.seek(0)
        if head.startswith(b"["):  # one JSON list of records: one bad byte spoils the file
            raw = f.read()
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
                yield i + 1, item if ok else DataError(f"{path}:{i + 1}: record is not a JSON object")
            return
        # JSON lines, read as bytes: a line that is not UTF-8 is one bad record (skippable), not a
        # bad file.
        for n, raw_line in enumerate(f, start=1):
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as e:
                bad = raw_line[e.start]
                yield n, DataError(f"{path}:{n}: not UTF-8 (byte 0x{bad:02x} at column {e.start + 1})")
                continue
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                yield n, DataError(f"{path}:{n}: broken JSON line ({e.msg}, column {e.colno})")
                continue
            ok = isinstance(item, dict)
            yield n, item if ok else DataError(f"{path}:{n}: record is not a JSON object")


def _check_columns(cfg: CaptionSetConfig, path: Path, columns: list[str]) -> None:
    missing = [c for c in [cfg.image_column] if c and c not in columns]
    if cfg.key_column and cfg.key_column not in columns:
        missing.append(cfg.key_column)
    if not any(c in columns for c in cfg.caption_columns):
        missing.append(" or ".join(cfg.caption_columns))
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; columns are {columns}")


def _table_rows(path: Path, fmt: str, cfg: CaptionSetConfig) -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows of a CSV/TSV (line numbers count the header) or parquet file, streamed in batches.

    Read with ``csv`` / ``pyarrow.parquet`` directly: ``datasets`` would first copy the whole
    manifest into its Arrow cache. Empty CSV cells read as missing (as pandas reads them).
    """
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a broken file
            raise DataError(f"{path}: cannot be read as parquet: {type(e).__name__}: {e}") from e
        _check_columns(cfg, path, pf.schema_arrow.names)
        n = 0
        for batch in pf.iter_batches(batch_size=8192):
            for row in batch.to_pylist():
                n += 1
                yield n, row
        return
    import csv

    csv.field_size_limit(1 << 30)  # DreamLIP long captions exceed the default 128 KiB limit
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        with open(path, encoding="utf-8", newline="") as f:
            # strict: a stray quote is an error (named by line), not a silently merged field.
            reader = csv.reader(f, delimiter=delimiter, strict=True)
            try:
                header = next(reader, None)
                if header is None:
                    raise DataError(f"{path}: cannot be read as csv: the file is empty")
                _check_columns(cfg, path, header)
                for i, values in enumerate(reader):
                    if not values:
                        continue
                    if len(values) != len(header):  # a row whose columns cannot be told apart
                        raise DataError(
                            f"{path}:{reader.line_num}: malformed CSV row "
                            f"({len(values)} fields, the header has {len(header)})"
                        )
                    yield i + 2, {h: (v if v != "" else None) for h, v in zip(header, values, strict=True)}
            except csv.Error as e:
                raise DataError(f"{path}:{reader.line_num}: malformed CSV row ({e})") from e
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{reader.line_num + 1}: not UTF-8 ({e.reason})") from e
    except OSError as e:
        raise DataError(f"{path}: cannot be read as csv: {type(e).__name__}: {e}") from e


def _manifest_rows(cfg: CaptionSetConfig, fmt: str, layout: str = "") -> Iterator[Row | BadRow]:
    """Every record of a manifest as an index row (good) or a bad row (with where and why).

    ``image_column`` "" reads a text-only set (``image`` ""); in conversation JSON (``layout``
    "conversations") a record without an image is a text-only turn, left out and counted.
    """
    path = Path(cfg.path)
    root = Path(cfg.image_root) if cfg.image_root else path.parent
    resolve = ImagePaths(root)
    numbered: Iterable[tuple[int, dict[str, Any] | DataError]]
    numbered = _json_rows(path) if fmt == "json" else _table_rows(path, fmt, cfg)
    columns: set[str] = set()
    first_broken: DataError | None = None
    position = 0
    text_only = 0
    for n, row in numbered:
        where = f"{path}:{n}"
        position += 1
        if isinstance(row, DataError):  # a broken JSON line
            first_broken = first_broken or row
            yield BadRow(position - 1, where, str(row))
            continue
        if fmt == "json" and not columns.issuperset(row):
            columns.update(row)
        if layout == "conversations" and cfg.image_column not in row:
            text_only += 1
            position -= 1
            continue
        if not cfg.image_column:  # a text-only set: the key is the line unless a column gives one
            try:
                if cfg.key_column and cfg.key_column not in row:
                    raise DataError(f"{where}: no {cfg.key_column!r} column")
                key = str(row[cfg.key_column]) if cfg.key_column else str(n)
                yield Row(key, "", 0, 0, 0, n, _captions_of(row, cfg, where))
            except DataError as e:
                yield BadRow(position - 1, where, str(e))
            continue
        try:
            if cfg.image_column not in row:
                raise DataError(f"{where}: no {cfg.image_column!r} column")
            if cfg.key_column and cfg.key_column not in row:
                raise DataError(f"{where}: no {cfg.key_column!r} column")
            image = row[cfg.image_column]
            if not isinstance(image, str) or not image:
                raise DataError(f"{where}: image column {cfg.image_column!r} is empty or not a path")
            image_path, is_file = resolve(image, where)
            if not is_file:
                raise DataError(f"{where}: image file {image_path} does not exist")
            key = str(row[cfg.key_column]) if cfg.key_column else image
            yield Row(key, str(image_path), 0, 0, 0, n, _captions_of(row, cfg, where))
        except DataError as e:
            yield BadRow(position - 1, where, str(e))
    if text_only:
        log.info("%s: %d text-only conversation records (no image) left out", path, text_only)
    if fmt == "json":
        # JSON has no header: the columns are known only after the pass (the index is not kept).
        if first_broken is not None and not columns:  # not one readable record: the file is broken
            raise DataError(f"{first_broken} (and no line of {path} is a readable record)")
        _check_columns(cfg, path, sorted(columns))


class _ShardRows:
    """Every record of the shards as index rows; ``keys`` holds each shard's tar keys afterwards."""

    def __init__(self, cfg: CaptionSetConfig, shards: list[str]) -> None:
        self.cfg, self.shards = cfg, shards
        self.keys: dict[int, list[str]] = {}

    def __iter__(self) -> Iterator[Row | BadRow]:
        # A first read of a large set takes minutes: progress per shard (lines in a log file).
        with make_progress() as progress:
            task = progress.add_task("indexing shards", total=len(self.shards), status="", unit="shard")
            yield from self._rows(lambda: progress.advance(task))

    def _rows(self, shard_done: Callable[[], None]) -> Iterator[Row | BadRow]:
        cfg = self.cfg
        position = 0
        for s, shard in enumerate(self.shards):
            keys: list[str] = []
            self.keys[s] = keys
            try:
                for rec in scan_tar(shard, IMAGE_EXTENSIONS):
                    where = f"{shard}:{rec.key}"
                    keys.append(rec.key)
                    position += 1
                    try:
                        yield _shard_row(cfg, rec, s, len(keys) - 1, where)
                    except DataError as e:
                        yield BadRow(position - 1, where, str(e))
            except DamagedShard as e:
                # The readable records are kept (above); what the damage lost is counted as bad,
                # never dropped in silence: a strict run stops here, naming the shard.
                for k in range(lost_records(shard, len(keys))):
                    tail = f"{shard}@{e.offset}" + (f"#{k + 1}" if k else "")
                    position += 1
                    yield BadRow(position - 1, tail, str(e))
            except (tarfile.TarError, OSError) as e:
                raise DataError(
                    f"{shard}: cannot be read as a webdataset shard: {type(e).__name__}: {e}"
                ) from e
            shard_done()


def _shard_row(cfg: CaptionSetConfig, rec: TarRecord, shard: int, line: int, where: str) -> Row:
    """One webdataset sample as an index row (raises DataError when it is unusable)."""
    if rec.damaged:
        raise DataError(f"{where}: {rec.damaged}")
    if rec.image is None:
        found = ", ".join(f".{ext}" for ext in rec.texts) or "none"
        raise DataError(f"{where}: no image member ({'/'.join(IMAGE_EXTENSIONS)}; members found: {found})")
    fields: dict[str, Any] = {}
    if "json" in rec.texts:
        try:
            parsed = json.loads(rec.texts["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{where}: broken .json member ({e})") from e
        fields = dict(parsed) if isinstance(parsed, dict) else {}
    txt = rec.texts.get("txt", b"").decode("utf-8", errors="replace")
    if txt and not any(c in fields for c in cfg.caption_columns):
        fields[next(iter(cfg.caption_columns))] = txt
    key = str(fields.get(cfg.key_column, rec.key)) if cfg.key_column else rec.key
    offset, size = rec.image
    return Row(key, None, shard, offset, size, line, _captions_of(fields, cfg, where))


def lost_records(shard: str, readable: int) -> int:
    """How many records a damaged shard lost: what img2dataset's ``NNNNN_stats.json`` says it
    wrote (``successes``) minus the ``readable`` ones, at least 1 (the damaged tail).

    img2dataset writes the stats file when a shard is complete, so a shard cut off by a killed
    run usually has none: the loss then counts as one bad record, and the message says so.
    """
    stats = Path(shard[: -len(".tar")] + "_stats.json") if shard.endswith(".tar") else None
    try:
        written = int(json.loads(stats.read_text())["successes"]) if stats and stats.is_file() else 0
    except (OSError, ValueError, KeyError, TypeError):
        written = 0
    return max(1, written - readable)


def files_shards(path: str) -> list[str]:
    """The shard folders of an img2dataset ``--output_format files`` output folder ([] = not one).

    img2dataset's ``FilesSampleWriter`` (rom1504/img2dataset ``img2dataset/writer.py``) writes shard
    ``NNNNN`` as a folder ``NNNNN/`` of ``KEY.<jpg|png|webp>`` + ``KEY.json`` (+ ``KEY.txt``), with
    ``NNNNN.parquet`` beside it (and ``NNNNN_stats.json`` once the shard is complete). A folder
    counts as a shard when its ``.parquet`` or ``_stats.json`` lies beside it.
    """
    if not os.path.isdir(path):
        return []
    out = []
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.is_dir() and (
                os.path.isfile(os.path.join(path, entry.name + ".parquet"))
                or os.path.isfile(os.path.join(path, entry.name + "_stats.json"))
            ):
                out.append(entry.path)
    return sorted(out)


def _files_rows(cfg: CaptionSetConfig, shards: list[str]) -> Iterator[Row | BadRow]:
    """Every sample of an img2dataset ``files`` output as an index row, shard folder by folder.

    A sample's files are grouped by key (the name before the first dot, as for tar members); the
    row's image is the file's path, so the set reads like a manifest's.
    """
    position = 0
    for shard in shards:
        members: dict[str, TarRecord] = {}
        paths: dict[str, str] = {}
        with os.scandir(shard) as entries:
            names = sorted(e.name for e in entries if e.is_file())
        for name in names:
            stem, dot, ext = name.partition(".")
            if not dot or not stem:
                continue
            ext = ext.lower()
            rec = members.setdefault(stem, TarRecord(stem, None, {}))
            if ext in IMAGE_EXTENSIONS and rec.image is None:
                rec.image = (0, 0)
                paths[stem] = os.path.join(shard, name)
            elif ext in ("json", "txt"):
                try:
                    rec.texts[ext] = Path(shard, name).read_bytes()
                except OSError as e:
                    rec.damaged = f"{name} cannot be read ({e.strerror})"
        for line, rec in enumerate(members.values()):
            where = f"{shard}/{rec.key}"
            position += 1
            try:
                row = _shard_row(cfg, rec, 0, line, where)
                yield Row(row.key, paths[rec.key], 0, 0, 0, position - 1, row.captions)
            except DataError as e:
                yield BadRow(position - 1, where, str(e))


# Appended to a key repeated in another file of the set (see :func:`check_key_collisions`).
KEYS_ACROSS_FILES = (
    "; two data sets in one path? list them as separate entries of data.train (keys are then "
    "namespaced per set), or set key_column (e.g. url) to a unique column"
)


def check_key_collisions(path: str, bad: Sequence[BadRow]) -> None:
    """Stop, naming the fix, when keys repeat across the files of one set: skipping the repeats
    (``skip_bad``) would drop one run's images, not bad records."""
    repeats = [b for b in bad if b.reason.endswith(KEYS_ACROSS_FILES)]
    if repeats:
        raise DataError(f"{repeats[0].reason} ({len(repeats)} keys repeat across the files of {path})")


def _unique_keys(rows: Iterable[Row | BadRow], where_of: Callable[[Row], str]) -> Iterator[Row | BadRow]:
    """``rows`` with every repeat of an earlier good record's key turned into a bad row.

    Two records of one key would be two "different" images to the contrastive loss and to the
    store: the repeat is refused, or skipped (and reported) under ``skip_bad``. Done once, while
    the index is built, so the check costs nothing at later loads. Only ``(shard, line)`` is kept
    per key (an int), and ``where_of`` rebuilds the first record's place for the message.
    """
    first: dict[str, int] = {}
    for position, row in enumerate(rows):
        if isinstance(row, Row):
            seen = first.get(row.key)
            if seen is not None:
                earlier = Row(row.key, None, seen >> 40, 0, 0, seen & ((1 << 40) - 1), [])
                here, there = where_of(row), where_of(earlier)
                # Repeats across files: most often two img2dataset runs (each numbers its keys
                # from 000000000) globbed into one set; the message names both ways out.
                fix = KEYS_ACROSS_FILES if here.rsplit(":", 1)[0] != there.rsplit(":", 1)[0] else ""
                yield BadRow(position, here, f"{here}: duplicate key {row.key!r} (first at {there}){fix}")
                continue
            first[row.key] = (row.shard << 40) | row.line
        yield row


def index_caption_set(cfg: CaptionSetConfig, cache_dir: Path | None = None) -> RecordIndex:
    """The cached columnar index of a data set (built on the first call; see :mod:`.index`)."""
    if not cfg.path:
        raise DataError("no path given")
    fmt = _detect_format(cfg)
    shard_files = expand_shards(cfg.path) if fmt == "webdataset" else None
    cfg, layout = layouts.recognise(cfg, fmt, shard_files)
    if layout:
        log.info(
            "%s: read as %s (image column %r, captions %s)",
            cfg.path,
            layout,
            cfg.image_column,
            cfg.caption_columns,
        )
    settings = {
        "format": fmt,
        "image_root": str(Path(cfg.image_root).resolve()) if cfg.image_root else "",
        "image_column": cfg.image_column,
        "key_column": cfg.key_column,
        "caption_columns": cfg.caption_columns,
    }
    if layout:  # (only then: the cache keys of other sets stay as they were)
        settings["layout"] = layout
    if fmt == "webdataset":
        shards = shard_files or []
        reader = _ShardRows(cfg, shards)

        def shard_where(row: Row) -> str:
            return f"{shards[row.shard]}:{reader.keys[row.shard][row.line]}"

        return open_or_build(
            shards,
            settings,
            "shards",
            lambda: _unique_keys(reader, shard_where),
            cache_dir=cache_dir,
            shard_keys=lambda: reader.keys,
        )
    if fmt == "img2dataset-files":
        folders = files_shards(cfg.path)
        if not folders:
            raise DataError(
                f"{cfg.path}: not an img2dataset --output_format files folder (no NNNNN/ folder "
                "with NNNNN.parquet or NNNNN_stats.json beside it)"
            )
        # The per-shard parquet/stats files identify the output (written once per shard).
        ids = [f for d in folders for f in (d + ".parquet", d + "_stats.json") if os.path.isfile(f)]

        def numbered(row: Row) -> str:
            return f"{cfg.path} record {row.line + 1}"

        return open_or_build(
            ids,
            settings,
            "manifest",
            lambda: _unique_keys(_files_rows(cfg, folders), numbered),
            cache_dir=cache_dir,
        )
    path = Path(cfg.path)
    if not path.is_file():
        raise DataError(f"{path}: manifest does not exist")

    def rows() -> Iterator[Row | BadRow]:
        return _unique_keys(_manifest_rows(cfg, fmt, layout), lambda row: f"{path}:{row.line}")

    return open_or_build([str(path)], settings, "manifest", rows, cache_dir=cache_dir)


class IndexedRecords(Sequence[ImageCaptions]):
    """The first ``n`` records of an index (``max_images``), map-style, built on access."""

    def __init__(self, index: RecordIndex, n: int) -> None:
        self.index, self.n = index, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> ImageCaptions:  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]  # type: ignore[return-value]
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(f"record {i} out of range ({self.n} records)")
        return self.index[i]

    def __iter__(self) -> Iterator[ImageCaptions]:
        for i in range(self.n):
            yield self.index[i]


def record_index(records: Sequence[ImageCaptions]) -> RecordIndex | None:
    """The index behind a set read by :func:`load_caption_set` (also through ``keep_captions``)."""
    while isinstance(records, (CaptionSet, KeptCaptions)):
        records = records.records
    return records.index if isinstance(records, IndexedRecords) else None


def set_parts(records: Sequence[ImageCaptions]) -> list[SetPart]:
    """The sets a training set was joined from (:mod:`.sets`), also through ``keep_captions``."""
    while isinstance(records, KeptCaptions):
        records = records.records
    return records.parts if isinstance(records, CaptionSet) else []


def captions_only(records: Sequence[ImageCaptions]) -> Sequence[ImageCaptions]:
    """The same records for a reader of captions only: shard records skip reading their image.

    ``embed`` walks every record for its captions; through this view it reads no image byte.
    """
    if isinstance(records, CaptionSet):
        return captions_only(records.records)
    if isinstance(records, KeptCaptions):
        return KeptCaptions(captions_only(records.records), records.per_kind)
    if isinstance(records, IndexedRecords):
        return IndexedRecords(records.index.without_images(), records.n)
    return records


def caption_counts(records: Sequence[ImageCaptions]) -> np.ndarray:
    """Captions per record (int64), from the index's columns when ``records`` has one.

    What a store's cheap check compares; through the index it builds no record (vectorised over
    the memory-mapped ``kinds`` column, with the ``keep_captions`` cut applied).
    """
    per_kind, inner = 0, records
    while isinstance(inner, (CaptionSet, KeptCaptions)):
        if isinstance(inner, KeptCaptions):
            per_kind = inner.per_kind if not per_kind else min(per_kind, inner.per_kind)
        inner = inner.records
    if not isinstance(inner, IndexedRecords):
        return np.asarray([len(r.captions) for r in records], dtype=np.int64)
    # int32 throughout (a few bytes per caption): this runs at every stage-2 start.
    counts = np.empty(inner.n, dtype=np.int64)
    done = 0
    for chunk in inner.index.table.column("kinds").chunks:  # one chunk per 8192 indexed rows
        if done >= inner.n:
            break
        take = min(len(chunk), inner.n - done)
        offsets = chunk.offsets.to_numpy()[: take + 1]
        flat = chunk.values.to_numpy()
        long_cum = np.zeros(len(flat) + 1, dtype=np.int32)
        np.cumsum(flat == 1, out=long_cum[1:])
        long = long_cum[offsets[1:]] - long_cum[offsets[:-1]]
        short = np.diff(offsets) - long
        if per_kind:
            short, long = np.minimum(short, per_kind), np.minimum(long, per_kind)
        counts[done : done + take] = short + long
        done += take
    return counts


# A set where at least this share of the records name a missing image has the wrong image root.
MISSING_SHARE_FOR_ROOT = 0.8


def check_image_root(
    manifest: Path, root: Path, good: int, bad: Sequence[BadRow], setting: str = "image_root"
) -> None:
    """Stop with the fix when most images are missing: the image root is wrong, not the data.

    ``skip_bad`` would drop the whole set; the message names ``setting`` (``image_root``, or the
    LLaVA data's ``image_folder``) and a folder beside the manifest, or its parent, that holds the
    first missing image.

    Args:
        manifest: the manifest file.
        root: the folder image paths were resolved under.
        good, bad: the set's good record count and bad rows.
        setting: the config key to name.
    """
    missing = [b for b in bad if b.reason.endswith("does not exist") and ": image file " in b.reason]
    total = good + len(bad)
    if len(missing) < 2 or len(missing) < MISSING_SHARE_FOR_ROOT * total:
        return
    first = missing[0].reason
    relative = ""
    m = re.search(r"image file (.+) does not exist$", first)
    root = root.resolve()
    if m:
        try:
            relative = str(Path(m.group(1)).relative_to(root))
        except ValueError:
            relative = ""
    hint = ""
    base = manifest.parent
    if relative and base.is_dir():
        # Where LLaVA keeps images (an images/ folder beside the JSON) or ShareGPT4V (the
        # JSON's parent folder: data/sharegpt4v/x.json names coco/train2017/...).
        candidates = [*sorted(p for p in base.iterdir() if p.is_dir())[:200], base.parent]
        for sub in candidates:
            if (sub / relative).is_file():
                hint = f" ({sub} holds {relative}: {setting}: {sub})"
                break
    raise DataError(
        f"{manifest}: {len(missing)} of {total} images do not exist under {root}; set {setting} to the "
        f"folder the image paths are relative to (LLaVA's --image_folder){hint}; first: {first}"
    )


def load_caption_set(
    cfg: CaptionSetConfig, *, skip_bad: bool = False, max_bad_fraction: float = 0.01, name: str = ""
) -> CaptionSet:
    """Read one image-caption data set (through its cached index: see :mod:`.index`).

    Records are built on access (a manifest record holds its image path; a shard record reads its
    image bytes from the tar when accessed), so the set costs O(1) Python memory per record.

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
    index = index_caption_set(cfg)
    n = min(len(index), cfg.max_images) if cfg.max_images else len(index)
    policy = BadRecords(skip_bad, max_bad_fraction, name=cfg.path)
    bad_rows = index.bad()
    check_key_collisions(cfg.path, bad_rows)
    if index.meta["kind"] == "manifest":
        root = Path(cfg.image_root) if cfg.image_root else Path(cfg.path).parent
        check_image_root(Path(cfg.path), root, len(index), bad_rows)
    for j, bad in enumerate(bad_rows):
        # A bad record is reached when fewer than ``n`` good records come before it.
        if bad.position - j < n or not cfg.max_images:
            policy.add(bad.where, DataError(bad.reason))
    total = n + len(policy.skipped)
    if total == 0:
        raise DataError(f"{cfg.path}: the data set is empty")
    policy.check(total)
    return CaptionSet(IndexedRecords(index, n), name=name or cfg.path, skipped=policy.skipped)


def load_caption_sets(
    cfgs: list[CaptionSetConfig],
    *,
    skip_bad: bool = False,
    max_bad_fraction: float = 0.01,
    name: str = "train",
) -> CaptionSet:
    """Read a list of caption sets as one (see :mod:`.sets`); one set is read as it is, unchanged.

    Each set is read with its own settings and the bad-record policy applied to it; the sets are
    then joined into one index whose keys are ``<set name>/<key>``.
    """
    if len(cfgs) == 1:
        return load_caption_set(cfgs[0], skip_bad=skip_bad, max_bad_fraction=max_bad_fraction, name=name)
    check_weights(cfgs)
    names = set_names(cfgs)
    loaded = [
        load_caption_set(c, skip_bad=skip_bad, max_bad_fraction=max_bad_fraction, name=f"{name}/{n}")
        for c, n in zip(cfgs, names, strict=True)
    ]
    indexes = [record_index(cs) for cs in loaded]
    parts, start = [], 0
    for n, c, cs in zip(names, cfgs, loaded, strict=True):
        parts.append(SetPart(n, c.path, start, len(cs), len(cs.skipped), c.weight))
        start += len(cs)
    joined = join_indexes([(n, ix, len(cs)) for n, ix, cs in zip(names, indexes, loaded, strict=True)])  # type: ignore[misc]
    skipped = [s for cs in loaded for s in cs.skipped]
    log.info(
        "%s: %d sets, %d records (%s)", name, len(parts), start,
        ", ".join(f"{p.name} {p.records}" + (f" x{p.weight:g}" if p.weight != 1 else "") for p in parts),
    )  # fmt: skip
    return CaptionSet(IndexedRecords(joined, start), name=name, skipped=skipped, parts=parts)


def data_counts(train: CaptionSet, heldout: dict[str, CaptionSet]) -> dict[str, Any]:
    """The ``data`` entry of a stage's ``metrics.json``: records and skips per set (and per part
    of a list of training sets)."""
    out: dict[str, Any] = {"train": {"records": len(train), "skipped": len(train.skipped)}}
    if len(train.parts) > 1:
        out["train"]["sets"] = {p.name: p.counts() for p in train.parts}
    out["heldout"] = {name: {"records": len(cs), "skipped": len(cs.skipped)} for name, cs in heldout.items()}
    return out


def is_text_only(records: CaptionSet) -> list[str]:
    """The names of the parts of ``records`` that hold no images (a text-only caption set)."""
    return [p.name or "train" for p in records.parts if p.records and records[p.start].image == ""]


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
    """The train set(s) and the held-out sets of a run (the demo world when ``data.train`` is empty)."""
    train_cfgs = train_sets(cfg)
    if train_cfgs:
        heldout_cfgs = dict(cfg.heldout)
    else:
        demo_train, heldout_cfgs = demo_set_configs(ensure_demo_data(cfg, output_dir))
        train_cfgs = [demo_train]
        heldout_cfgs.update(cfg.heldout)
    kw = {"skip_bad": cfg.skip_bad, "max_bad_fraction": cfg.max_bad_fraction}
    train = load_caption_sets(train_cfgs, name="train", **kw)
    heldout = {name: load_caption_set(c, name=name, **kw) for name, c in heldout_cfgs.items()}
    for name, cs in [("train", train), *heldout.items()]:
        if cs.skipped:  # the run's report of every skipped record and why
            report = write_report(output_dir, name, len(cs) + len(cs.skipped), cs.skipped)
            log.warning("%s: %d bad records skipped, listed in %s", name, len(cs.skipped), report)
    return train, heldout
