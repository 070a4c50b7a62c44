"""LLaVA conversation records: read from LLaVA's JSON format or webdataset shards, and checked.

A record is ``{"id", "image"?, "conversations": [{"from": "human"|"gpt", "value"}, ...]}``;
without ``"image"`` it is text-only. The records come from a JSON list (or JSONL) plus an image
folder, or from webdataset shards (:func:`index_llava_shards`, written by
:mod:`llm2clip_vlm.data.llava_shards`): one sample per record, its ``.json`` member holding the
record and its image member (``.jpg``/``.png``/``.webp``, absent for a text-only record) the
image; such a record's ``image`` is the member's bytes, read by seeking into the tar when the
record is accessed. Loading checks every record up front (malformed JSON, missing or repeated
``<image>``, empty or malformed turns, image files that are missing or leave the image folder,
image files that cannot be opened), so a bad record stops the run before the first step with a
message naming it, or — with ``skip_bad`` — is skipped, counted and reported; the run still
stops when more than ``max_bad_fraction`` of the records are bad.

The conversation's shape (human/gpt pairs, one ``<image>`` in the first human turn of an image
record) is checked here, once for every template; the templates (:mod:`llm2clip_vlm.llava.templates`)
turn a checked conversation into tokens.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llm2clip_vlm.data.captions import (
    IMAGE_EXTENSIONS,
    check_image_root,
    expand_shards,
    is_shard_path,
    safe_image_path,
)
from llm2clip_vlm.data.check import check_images
from llm2clip_vlm.data.errors import BadRecords, DataError
from llm2clip_vlm.data.images import load_rgb
from llm2clip_vlm.data.index import (
    BadRow,
    DamagedShard,
    TarRecord,
    build_table,
    open_table,
    read_member,
    scan_tar,
)
from llm2clip_vlm.identity import file_stamp

IMAGE_PLACEHOLDER = "<image>"


class ConversationError(ValueError):
    """A record whose conversation a template cannot use (the message says why)."""


def conversation_turns(conversations: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """``[(question, answer), ...]`` of a LLaVA conversation, checked for shape."""
    if not conversations:
        raise ConversationError("empty conversation")
    if len(conversations) % 2:
        raise ConversationError(f"{len(conversations)} turns: expected human/gpt pairs")
    pairs = []
    for i in range(0, len(conversations), 2):
        q, a = conversations[i], conversations[i + 1]
        if not isinstance(q, dict) or not isinstance(a, dict):
            raise ConversationError(f"turn {i} is not an object with 'from' and 'value'")
        if q.get("from") != "human" or a.get("from") != "gpt":
            raise ConversationError(
                f"turns {i}-{i + 1} are from {q.get('from')!r}/{a.get('from')!r}; expected 'human' then 'gpt'"
            )
        qv, av = q.get("value"), a.get("value")
        if not isinstance(qv, str) or not isinstance(av, str):
            raise ConversationError(f"turns {i}-{i + 1}: 'value' must be text")
        if not av.strip():
            raise ConversationError(f"turn {i + 1}: empty answer")
        pairs.append((qv, av))
    return pairs


def check_image_placeholders(conversations: Sequence[dict[str, Any]], has_image: bool) -> None:
    """An image record has exactly one ``<image>``, in the first human turn; a text-only one none.

    Raises:
        ConversationError: the placeholder is missing, repeated, misplaced or unexpected.
    """
    counts = [str(t.get("value", "")).count(IMAGE_PLACEHOLDER) for t in conversations if isinstance(t, dict)]
    total = sum(counts)
    if has_image:
        if total == 0:
            raise ConversationError("record has an image but no <image> in its conversation")
        if total > 1:
            raise ConversationError(f"<image> appears {total} times; LLaVA-1.5 records have exactly one")
        if not counts or counts[0] != 1:
            raise ConversationError("<image> must be in the first human turn")
    elif total:
        raise ConversationError("text-only record (no 'image') contains <image>")


@dataclass
class LlavaRecord:
    """One checked record; ``source`` names it in errors (``file.json[#index] id=...``, or
    ``shard.tar:key id=...``). ``image`` is a file path, a shard member's encoded bytes, or None."""

    id: str
    image: Path | bytes | None
    conversations: list[dict[str, Any]]
    source: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def has_image(self) -> bool:
        return self.image is not None


def _read_json_records(path: Path) -> list[tuple[str, Any]]:
    """``(where, raw record)`` pairs of a JSON list or a JSONL file; broken JSON names its line."""
    raw = path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or (len(raw) > 1 and raw[1:2] == b"\x00"):
        # UTF-16 (a byte-order mark, or "[\0" / "{\0"): JSON files are UTF-8 (RFC 8259).
        raise DataError(f"{path}: the file is UTF-16 text, not UTF-8: save it as UTF-8 JSON")
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path}:{n}", json.loads(line.decode("utf-8"))))
            except UnicodeDecodeError as e:
                rows.append((f"{path}:{n}", DataError(f"{path}:{n}: not UTF-8 (byte {e.start}: {e.reason})")))
            except json.JSONDecodeError as e:
                rows.append((f"{path}:{n}", DataError(f"{path}:{n}: malformed JSON ({e.msg})")))
        return rows
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        # A JSON list is one document: the whole file is unusable; say where it breaks.
        raise DataError(f"{path}: malformed JSON at line {e.lineno} column {e.colno} ({e.msg})") from e
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of LLaVA records, got {type(data).__name__}")
    return [(f"{path}[#{i}]", r) for i, r in enumerate(data)]


def _check_turns(raw: Any, where: str, has_image: Callable[[dict[str, Any]], bool]) -> LlavaRecord:
    """The checks every record passes, from a JSON file or a shard: an object with well-formed
    turns and ``<image>`` exactly once when (and only when) ``has_image(raw)``. ``image`` is left
    None; ``extra`` holds the fields besides id, image and conversations."""
    if isinstance(raw, DataError):
        raise raw
    if not isinstance(raw, dict):
        raise DataError(f"{where}: a record must be an object, got {type(raw).__name__}")
    rid = raw.get("id", where)
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        # LLaVA's ids are strings (numbers in some sets); an object or a list is not an id.
        raise DataError(f"{where}: 'id' must be a string or a number, got {type(rid).__name__} {rid!r:.60}")
    rid = str(rid)
    where = f"{where} id={rid}"
    conv = raw.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise DataError(f"{where}: 'conversations' is missing or empty")
    try:
        check_image_placeholders(conv, has_image=has_image(raw))
        # Shape of the turns (pairs, roles, text, non-empty answers): one rule for every template.
        conversation_turns(conv)
    except ConversationError as e:
        raise DataError(f"{where}: {e}") from e
    extra = {k: v for k, v in raw.items() if k not in ("id", "image", "conversations")}
    return LlavaRecord(rid, None, conv, where, extra)


def _check_record(raw: Any, where: str, image_folder: Path, verify_image: bool) -> LlavaRecord:
    rec = _check_turns(raw, where, lambda r: r.get("image") is not None)
    where, image = rec.source, raw.get("image")
    path = None
    if image is not None:
        if not isinstance(image, str) or not image:
            raise DataError(f"{where}: 'image' must be a relative file path, got {image!r}")
        path = safe_image_path(image_folder, image, where)
        if not path.is_file():
            raise DataError(f"{where}: image file {path} does not exist")
        if verify_image:
            _verify_image(path, where)
    rec.image = path
    return rec


def _verify_image(path: Path | bytes, where: str) -> None:
    """Decode the image once under the package's policy: catches non-images, truncated files,
    unsupported modes and decompression bombs before training starts."""
    load_rgb(path, where)


def _check_key(files: Sequence[str | Path], folder: Path, max_samples: int) -> str:
    """The identity of a LLaVA data set as read (the image check's cache key)."""
    import hashlib

    ids = [file_stamp(f) for f in files]
    blob = json.dumps([ids[0] if len(ids) == 1 else ids, str(folder.resolve()), max_samples], sort_keys=True)
    return "llava-" + hashlib.sha256(blob.encode()).hexdigest()[:32]


def load_llava_records(
    path: str | Path,
    image_folder: str | Path = "",
    *,
    max_samples: int = 0,
    skip_bad: bool = False,
    max_bad_fraction: float = 0.01,
    verify_images: bool = True,
    bad: BadRecords | None = None,
    check_workers: int = 4,
) -> LlavaRecords:
    """Read and check LLaVA records (see the module docstring for the policy).

    ``path`` is a JSON list / JSONL file (images in ``image_folder``, default its folder) or
    webdataset shards: a folder of ``*.tar``, a brace pattern or a glob (what stage 2 accepts).
    It is read and checked once into a cached, memory-mapped index
    (:mod:`llm2clip_vlm.data.index`); the records are built when accessed, so they cost O(1)
    Python memory each. ``bad`` (default: one built from ``skip_bad`` / ``max_bad_fraction``)
    collects what was skipped, for the run's report. With ``verify_images`` every image is
    decoded once, by ``check_workers`` threads, and the result is cached by the data's
    identity (:mod:`llm2clip_vlm.data.check`): a second start decodes nothing.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataError: a bad record (default), or too many of them under ``skip_bad``.
    """
    path = Path(path)
    if is_shard_path(str(path)):
        files = expand_shards(str(path))
        folder = Path(files[0]).parent  # unused by shards: their images are tar members
        directory = index_llava_shards(files)
    else:
        if not path.is_file():
            raise FileNotFoundError(f"LLaVA data file {path} does not exist")
        files = [str(path)]
        folder = Path(image_folder) if image_folder else path.parent
        settings = {"reader": "llava", "image_folder": str(folder.resolve())}
        directory = build_table(
            files, settings, "llava", lambda: _index_rows(path, folder), _llava_schema(), _llava_columns
        )
    table, meta, bad_rows = open_table(directory)
    positions = table.column("position").to_numpy()
    # ``max_samples`` counts records as they are in the file, good and bad.
    n_good = int(np.searchsorted(positions, max_samples)) if max_samples else len(positions)
    total = n_good + sum(1 for b in bad_rows if not max_samples or b.position < max_samples)
    bad = bad if bad is not None else BadRecords(skip_bad, max_bad_fraction, name=path.name)
    if meta["kind"] == "llava":  # a forgotten image_folder: name it, not skip_bad
        check_image_root(path, folder, n_good, bad_rows, setting="image_folder")
    for b in bad_rows:
        if not max_samples or b.position < max_samples:
            bad.add(b.where, DataError(b.reason))  # raises unless skipping
    records = LlavaRecords(table, np.arange(n_good), directory, meta)
    if verify_images:
        good = check_images(
            records, bad, lambda r: _verify_image(r.image, r.source), key=_check_key(files, folder, max_samples),
            workers=check_workers, description=f"checking {path.name} images", select=lambda r: r.has_image,
            total=total,
        )  # fmt: skip
        if good is not None:
            records = LlavaRecords(table, np.asarray(good, dtype=np.int64), directory, meta)
    else:
        bad.check(total)
    if not len(records):
        raise DataError(f"{path}: no usable records")
    return records


def _index_rows(path: Path, folder: Path) -> Iterator[dict[str, Any] | BadRow]:
    """Every record of a LLaVA file, checked (without decoding images), as index rows."""
    for position, (where, raw) in enumerate(_read_json_records(path)):
        try:
            rec = _check_record(raw, where, folder, verify_image=False)
        except DataError as e:
            yield BadRow(position, where, str(e))
            continue
        yield {
            "id": rec.id,
            "image": str(rec.image) if rec.image is not None else None,
            "record": json.dumps([rec.conversations, rec.extra]),
            "source": rec.source,
            "position": position,
        }


LLAVA_COLUMNS = ("id", "image", "record", "source", "position")
# Where a shard record's image lies (RecordIndex's names, so the data stream reads it as it
# reads stage 2's shards); a text-only record has size 0.
SHARD_COLUMNS = ("shard", "offset", "size", "line")


def _llava_schema(shards: bool = False) -> Any:
    import pyarrow as pa

    fields = [("id", pa.string()), ("image", pa.string()), ("record", pa.string()), ("source", pa.string()),
              ("position", pa.int64())]  # fmt: skip
    if shards:
        fields += [("shard", pa.int32()), ("offset", pa.int64()), ("size", pa.int64()), ("line", pa.int64())]
    return pa.schema(fields)


def _llava_columns(batch: list[dict[str, Any]]) -> dict[str, list[Any]]:
    return {name: [r[name] for r in batch] for name in LLAVA_COLUMNS}


def _shard_columns(batch: list[dict[str, Any]]) -> dict[str, list[Any]]:
    return {name: [r[name] for r in batch] for name in LLAVA_COLUMNS + SHARD_COLUMNS}


# ----------------------------------------------------------------------------------------------
# Webdataset shards
# ----------------------------------------------------------------------------------------------
def index_llava_shards(files: Sequence[str], cache_dir: Path | None = None) -> Path:
    """The directory of the cached index of LLaVA shards (built on the first call).

    Each sample of a shard is one record: its ``.json`` member is the LLaVA record (an ``image``
    field in it only says one is expected: the image is the sample's image member). The index keeps the
    conversation text and where each image lies in its tar (``shard``/``offset``/``size``), plus
    each shard's tar keys (``keys-*.json``, the names in messages); no image byte is read. The
    meta's kind is ``shards``, so :class:`~llm2clip_vlm.data.index.RecordIndex` and the data
    stream read the directory like stage 2's.
    """
    keys: dict[int, list[str]] = {}
    settings = {"reader": "llava-shards", "image_extensions": list(IMAGE_EXTENSIONS)}
    return build_table(
        files, settings, "shards", lambda: _shard_rows(files, keys), _llava_schema(shards=True),
        _shard_columns, cache_dir=cache_dir, side_files=lambda: keys,
    )  # fmt: skip


def _shard_rows(files: Sequence[str], keys: dict[int, list[str]]) -> Iterator[dict[str, Any] | BadRow]:
    """Every sample of the shards as an index row or a bad row (named ``shard.tar:key``)."""
    position = 0
    for s, shard in enumerate(files):
        keys[s] = []
        try:
            for member in scan_tar(shard, IMAGE_EXTENSIONS, ("json",)):
                where = f"{Path(shard).resolve()}:{member.key}"
                keys[s].append(member.key)
                try:
                    rec = _check_shard_record(member, where)
                except DataError as e:
                    yield BadRow(position, where, str(e))
                else:
                    offset, size = member.image or (0, 0)
                    yield {
                        "id": rec.id, "image": where if member.image else None,
                        "record": json.dumps([rec.conversations, rec.extra]), "source": rec.source,
                        "position": position, "shard": s, "offset": offset, "size": size,
                        "line": len(keys[s]) - 1,
                    }  # fmt: skip
                position += 1
        except DamagedShard as e:  # the readable samples are kept; the lost tail counts as bad
            for k in range(max(1, _written(shard) - len(keys[s]))):
                yield BadRow(position, f"{shard}@{e.offset}" + (f"#{k + 1}" if k else ""), str(e))
                position += 1
        except (tarfile.TarError, OSError) as e:
            raise DataError(f"{shard}: cannot be read as a webdataset shard: {type(e).__name__}: {e}") from e


def _written(shard: str) -> int:
    """How many samples ``llava-shards`` wrote into ``shard`` (0: unknown), from the
    ``<prefix>-shards.json`` beside it (record count and ``per_shard``)."""
    path = Path(shard)
    prefix, _, number = path.stem.rpartition("-")
    manifest = path.with_name(f"{prefix}-shards.json")
    try:
        info = json.loads(manifest.read_text()) if prefix and number.isdigit() and manifest.is_file() else {}
        per, total = int(info["per_shard"]), int(info["records"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    return max(0, min(per, total - int(number) * per))


def _check_shard_record(member: TarRecord, where: str) -> LlavaRecord:
    """A shard sample's record, checked as a JSON record is (the image is the member's)."""
    if "json" not in member.texts:
        raise DataError(f"{where}: no .json member (the LLaVA record)")
    try:
        raw = json.loads(member.texts["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{where}: malformed .json member ({e})") from e
    if isinstance(raw, dict) and raw.get("image") is not None and member.image is None:
        raise DataError(f"{where}: the record names an image but the sample has no image member")
    return _check_turns(raw, where, lambda r: member.image is not None)


class LlavaRecords(Sequence[LlavaRecord]):
    """Checked LLaVA records over the memory-mapped index; ``rows`` = the table rows kept.

    ``directory`` and ``meta`` are the index's; a shard record's image is read (by seeking into
    its tar) when the record is built, and never kept.
    """

    def __init__(self, table: Any, rows: np.ndarray, directory: Path | None = None,
                 meta: dict[str, Any] | None = None) -> None:  # fmt: skip
        self.table, self.rows, self.directory = table, rows, directory
        self.meta = meta or {}
        self.shards = self.meta.get("kind") == "shards"
        names = LLAVA_COLUMNS[:4] + (SHARD_COLUMNS[:3] if self.shards else ())
        self._cols = {name: table.column(name) for name in names}
        self._words: list[int] | None = None  # word_counts(), read once

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> LlavaRecord:  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]  # type: ignore[return-value]
        row = int(self.rows[i])
        image: Path | bytes | None = None
        if self.has_image_at(row):
            c = self._cols
            if self.shards:
                source = self.meta["sources"][c["shard"][row].as_py()]
                image = read_member(source, c["offset"][row].as_py(), c["size"][row].as_py())
            else:
                image = Path(c["image"][row].as_py())
        return self.build(row, image)

    def has_image_at(self, row: int) -> bool:
        """Whether table row ``row`` has an image (no record built, no image read)."""
        return self._cols["image"][row].is_valid

    def build(self, row: int, image: Path | bytes | None) -> LlavaRecord:
        """The record of table row ``row`` with ``image`` (a shard record's bytes, read by the caller)."""
        c = self._cols
        conversations, extra = json.loads(c["record"][row].as_py())
        return LlavaRecord(c["id"][row].as_py(), image, conversations, c["source"][row].as_py(), extra)

    def __iter__(self) -> Iterator[LlavaRecord]:
        for i in range(len(self)):
            yield self[i]

    def word_counts(self) -> list[int]:
        """Per record, the words of its conversation (LLaVA's ``modality_lengths``, unsigned:
        ``sum(len(turn["value"].split()))``, llava/train/train.py:684-690); read once."""
        if self._words is not None:
            return self._words
        column = self._cols["record"]
        counts = []
        for row in self.rows:
            conversations, _ = json.loads(column[int(row)].as_py())
            counts.append(
                sum(len(str(t.get("value", "")).split()) for t in conversations if isinstance(t, dict))
            )
        self._words = counts
        return counts

    @property
    def has_image(self) -> np.ndarray:
        """Per record, whether it has an image (from the column alone: no record is built)."""
        return self.table.column("image").is_null().to_numpy(zero_copy_only=False)[self.rows] == False  # noqa: E712
