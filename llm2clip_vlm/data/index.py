"""A columnar, memory-mapped index of an image-caption data set, built once and cached.

Why: a manifest of 10M records read into Python objects costs ~3 KB per record per process, and
webdataset shards read through ``datasets`` keep every image's bytes in RAM and copy every shard
into the Arrow cache. The index instead holds, per usable record, only

    key (string) | image (string path; null for shards) | shard (int32) | offset, size (int64:
    where the image's bytes lie inside the tar) | line (int64: manifest line / record number) |
    texts (list<string>) | kinds (list<int8>: 0 short, 1 long)

in one Arrow IPC file that is memory-mapped, so a record costs no Python memory until it is
accessed, and :class:`RecordIndex` gives map-style ``index[i] -> ImageCaptions`` (a shard
image's bytes are read by seeking into its tar only then). Bad records found while building
(broken JSON line, missing image file, empty caption, ...) are kept in a side file ``bad.json``
with their position, so the bad-record policy applies at every load exactly as before.

Shards are scanned with the standard library's ``tarfile``: headers are read and image members
are skipped by seeking, only the small ``.json``/``.txt`` members are read. A webdataset or
``datasets`` reader reads every image byte to learn the captions (measured in
``docs/BENCHMARKS.md``); and neither tells where a member lies in the tar, which is what lets the
stream (:mod:`llm2clip_vlm.data.stream`) resume mid-shard and the index serve random access.

Cache: ``<cache root>/index/<key>/`` with ``records.arrow``, ``bad.json``, ``meta.json`` (written
last: its presence means complete). The key hashes the index format version, the reader settings
that change the content (columns, image root, format) and the identity of every input file:
resolved path, size, mtime and a sha256 of up to three 4 KiB samples (start, middle, end). The
cache root is ``$LLM2CLIP_VLM_CACHE``, else ``$XDG_CACHE_HOME/llm2clip-vlm``, else
``~/.cache/llm2clip-vlm``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from llm2clip_vlm.data.records import Caption, ImageCaptions
from llm2clip_vlm.identity import file_stamp
from llm2clip_vlm.logging import get_logger

log = get_logger(__name__)

INDEX_VERSION = 3  # 2: repeated keys are bad rows; JSON lines read as bytes; 3: scattered members grouped, damaged shards named
KIND_CODES = {"short": 0, "long": 1}
KIND_NAMES = ("short", "long")
_BATCH = 8192  # rows per Arrow record batch while building (bounds the builder's memory)


def cache_root() -> Path:
    """Where indexes and check results are cached (see the module docstring)."""
    env = os.environ.get("LLM2CLIP_VLM_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "llm2clip-vlm"


def identity_key(files: Sequence[str | Path], settings: dict[str, Any]) -> str:
    """The cache key of an index over ``files`` read with ``settings``."""
    blob = json.dumps(
        {"version": INDEX_VERSION, "settings": settings, "files": [file_stamp(f) for f in files]},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Row:
    """One good record while building (the builder's only per-record Python object)."""

    key: str
    image: str | None
    shard: int
    offset: int
    size: int
    line: int
    captions: list[Caption]


@dataclass(frozen=True)
class BadRow:
    """One bad record: its position among all records read, where it is, and why it is bad."""

    position: int
    where: str
    reason: str


class RecordIndex(Sequence[ImageCaptions]):
    """The usable records of a data set, memory-mapped; ``index[i]`` builds one ImageCaptions.

    Args:
        directory: a complete index directory (``meta.json`` present).
    """

    def __init__(self, directory: Path) -> None:
        import pyarrow as pa

        self.directory = directory
        self.meta: dict[str, Any] = json.loads((directory / "meta.json").read_text())
        self.sources: list[str] = self.meta["sources"]  # the manifest, or one path per shard
        self._mmap = pa.memory_map(str(directory / "records.arrow"), "r")
        self.table = pa.ipc.open_file(self._mmap).read_all()
        self._cols = {name: self.table.column(name) for name in self.table.column_names}
        self._files: dict[int, Any] = {}
        # False: shard records come without their image bytes (for readers of captions only).
        self.images = True

    # Workers started with ``spawn`` get the directory and map the file again.
    def __getstate__(self) -> dict[str, Any]:
        return {"directory": self.directory, "images": self.images}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["directory"])  # type: ignore[misc]
        self.images = state.get("images", True)

    def without_images(self) -> RecordIndex:
        """The same index whose shard records carry no image bytes (``image=b""``)."""
        other = RecordIndex(self.directory)
        other.images = False
        return other

    # -- the sequence --------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, i: int) -> ImageCaptions:  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]  # type: ignore[return-value]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} out of range ({len(self)} records)")
        c = self._cols
        key = c["key"][i].as_py()
        texts, kinds = c["texts"][i].as_py(), c["kinds"][i].as_py()
        captions = [Caption(t, KIND_NAMES[k]) for t, k in zip(texts, kinds, strict=True)]  # type: ignore[arg-type]
        if self.meta["kind"] == "shards":
            return ImageCaptions(key, self.read_image(i) if self.images else b"", captions, self.describe(i))
        return ImageCaptions(key, c["image"][i].as_py(), captions, self.describe(i))

    def describe(self, i: int) -> str:
        """Where record ``i`` comes from (``manifest:line`` or ``shard.tar:key``), for messages."""
        c = self._cols
        if self.meta["kind"] == "shards":
            shard = c["shard"][i].as_py()
            if self.meta["settings"].get("key_column") == "":
                # The record's key is its tar key: no need to parse the shard's key list (a JSON
                # of every key of the shard, re-read whenever a random access changes shard, and
                # held per index: one per set of a list, ~65 B per key of a shard).
                return f"{self.sources[shard]}:{c['key'][i].as_py()}"
            return f"{self.sources[shard]}:{self.tar_keys(shard)[c['line'][i].as_py()]}"
        if self.meta["settings"].get("format") == "img2dataset-files":  # one file per image
            return str(c["image"][i].as_py())
        return f"{self.sources[0]}:{c['line'][i].as_py()}"

    def __iter__(self) -> Iterator[ImageCaptions]:
        for i in range(len(self)):
            yield self[i]

    # -- columns, without building records ------------------------------------------------------
    def column(self, name: str) -> np.ndarray:
        """A numeric column as numpy (zero-copy where Arrow allows)."""
        return self._cols[name].to_numpy()

    def captions_of(self, i: int) -> list[Caption]:
        c = self._cols
        return [
            Caption(t, KIND_NAMES[k])  # type: ignore[arg-type]
            for t, k in zip(c["texts"][i].as_py(), c["kinds"][i].as_py(), strict=True)
        ]

    def tar_keys(self, shard: int) -> list[str]:
        """The tar keys of a shard (names in errors), read from the side file on demand."""
        cache = getattr(self, "_tar_keys", None)
        if cache is None or cache[0] != shard:
            keys = json.loads((self.directory / f"keys-{shard:06d}.json").read_text())
            self._tar_keys = (shard, keys)
            return keys
        return cache[1]

    def read_image(self, i: int) -> bytes:
        """A shard record's encoded image bytes, read by seeking into its tar (nothing is cached)."""
        c = self._cols
        shard, offset, size = c["shard"][i].as_py(), c["offset"][i].as_py(), c["size"][i].as_py()
        return read_member(self.sources[shard], offset, size)

    def bad(self) -> list[BadRow]:
        """The bad records found while building, in reading order."""
        rows = json.loads((self.directory / "bad.json").read_text())
        return [BadRow(int(r["position"]), r["where"], r["reason"]) for r in rows]

    def bytes_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.directory.iterdir() if f.is_file())

    def __repr__(self) -> str:
        return f"RecordIndex({self.directory}, records={len(self)}, kind={self.meta['kind']})"


def read_member(path: str, offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset`` of a file (one tar member's data)."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise OSError(f"{path}: member at byte {offset} is truncated ({len(data)} of {size} bytes)")
    return data


# ----------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------
def open_or_build(
    files: Sequence[str],
    settings: dict[str, Any],
    kind: str,
    rows: Callable[[], Iterable[Row | BadRow]],
    *,
    cache_dir: Path | None = None,
    shard_keys: Callable[[], dict[int, list[str]]] | None = None,
) -> RecordIndex:
    """The cached index of ``files`` read with ``settings``, built from ``rows()`` when missing.

    Args:
        files: the input files (manifest, or shards in order); their identity keys the cache.
        settings: reader settings that change the content (part of the key, and kept in meta).
        kind: ``"manifest"`` or ``"shards"``.
        rows: yields every record in reading order as a :class:`Row` or :class:`BadRow`.
        cache_dir: cache root (default :func:`cache_root`).
        shard_keys: for shards, called after ``rows()`` is exhausted: tar keys per shard.
    """
    directory = build_table(
        files, settings, kind, rows, _schema(), _caption_columns, cache_dir=cache_dir, side_files=shard_keys
    )
    return RecordIndex(directory)


def build_table(
    files: Sequence[str],
    settings: dict[str, Any],
    kind: str,
    rows: Callable[[], Iterable[Any]],
    schema: Any,
    columns: Callable[[list[Any]], dict[str, list[Any]]],
    *,
    cache_dir: Path | None = None,
    side_files: Callable[[], dict[int, list[str]]] | None = None,
) -> Path:
    """The directory of the cached Arrow table of ``files`` (any schema), built when missing.

    ``rows()`` yields good rows (turned into columns ``schema`` by ``columns(batch)``) and
    :class:`BadRow` s; see :func:`open_or_build` for the rest.
    """
    key = identity_key(files, settings)
    root = (cache_dir or cache_root()) / "index"
    directory = root / key
    if (directory / "meta.json").is_file():
        damage = _damage(directory)
        if damage is None:
            return directory
        # A cache is ours to rebuild: set the damaged copy aside (another process may map it).
        log.warning("index cache %s is damaged (%s): rebuilding it", directory, damage)
        aside = directory.with_name(f".damaged-{key}-{os.getpid()}")
        try:
            os.rename(directory, aside)
            shutil.rmtree(aside, ignore_errors=True)
        except OSError:  # another process set it aside first
            pass
    root.mkdir(parents=True, exist_ok=True)
    # Built in a private temp folder and renamed: concurrent ranks may build the same index; the
    # first rename wins and the others use it (their own copy is removed).
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    try:
        n, bad = _write_rows(tmp / "records.arrow", rows(), schema, columns)
        if side_files is not None:
            for shard, keys in side_files().items():
                (tmp / f"keys-{shard:06d}.json").write_text(json.dumps(keys))
        (tmp / "bad.json").write_text(
            json.dumps([{"position": b.position, "where": b.where, "reason": b.reason} for b in bad])
        )
        meta = {
            "version": INDEX_VERSION,
            "kind": kind,
            "sources": [str(Path(f).resolve()) for f in files],
            "settings": settings,
            "records": n,
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
    log.info("indexed %d records of %s (%d bad) in %s", n, files[0] if files else "?", len(bad), directory)
    return directory


def _damage(directory: Path) -> str | None:
    """What is wrong with a cached index directory (None: it opens and is complete).

    Cheap: parses the small JSON files and reads the Arrow file's footer (schema and batch
    count), not its rows.
    """
    import pyarrow as pa

    try:
        meta = json.loads((directory / "meta.json").read_bytes().decode("utf-8"))
        if not isinstance(meta, dict) or meta.get("version") != INDEX_VERSION:
            return "meta.json is not this version's index metadata"
        bad = json.loads((directory / "bad.json").read_bytes().decode("utf-8"))
        if not isinstance(bad, list):
            return "bad.json is not a list"
        with pa.memory_map(str(directory / "records.arrow"), "r") as f:
            reader = pa.ipc.open_file(f)
            rows = sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
        if rows != meta.get("records"):
            return f"records.arrow holds {rows} records, meta.json says {meta.get('records')}"
    except (OSError, ValueError, pa.ArrowException) as e:  # JSON/Unicode errors are ValueErrors
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def open_table(directory: Path) -> tuple[Any, dict[str, Any], list[BadRow]]:
    """``(memory-mapped Arrow table, meta, bad rows)`` of a directory :func:`build_table` wrote."""
    import pyarrow as pa

    meta = json.loads((directory / "meta.json").read_text())
    table = pa.ipc.open_file(pa.memory_map(str(directory / "records.arrow"), "r")).read_all()
    bad = [
        BadRow(int(r["position"]), r["where"], r["reason"])
        for r in json.loads((directory / "bad.json").read_text())
    ]
    return table, meta, bad


def _schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("key", pa.string()),
            ("image", pa.string()),
            ("shard", pa.int32()),
            ("offset", pa.int64()),
            ("size", pa.int64()),
            ("line", pa.int64()),
            ("texts", pa.list_(pa.string())),
            ("kinds", pa.list_(pa.int8())),
        ]
    )


def _caption_columns(batch: list[Row]) -> dict[str, list[Any]]:
    return {
        "key": [r.key for r in batch],
        "image": [r.image for r in batch],
        "shard": [r.shard for r in batch],
        "offset": [r.offset for r in batch],
        "size": [r.size for r in batch],
        "line": [r.line for r in batch],
        "texts": [[c.text for c in r.captions] for r in batch],
        "kinds": [[KIND_CODES[c.kind] for c in r.captions] for r in batch],
    }


def _write_rows(
    path: Path, rows: Iterable[Any], schema: Any, columns: Callable[[list[Any]], dict[str, list[Any]]]
) -> tuple[int, list[BadRow]]:
    import pyarrow as pa

    bad: list[BadRow] = []
    n = 0
    batch: list[Any] = []

    def flush(writer: Any) -> None:
        cols = columns(batch)
        writer.write_batch(pa.record_batch([pa.array(cols[f.name], f.type) for f in schema], schema=schema))
        batch.clear()

    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for r in rows:
            if isinstance(r, BadRow):
                bad.append(r)
                continue
            batch.append(r)
            n += 1
            if len(batch) >= _BATCH:
                flush(writer)
        if batch or n == 0:
            flush(writer)
    return n, bad


# ----------------------------------------------------------------------------------------------
# Scanning tar shards without reading image bytes
# ----------------------------------------------------------------------------------------------
@dataclass
class TarRecord:
    """The members of one webdataset key: where its image lies, and its small text members."""

    key: str
    image: tuple[int, int] | None  # (offset of the data, size)
    texts: dict[str, bytes]  # extension -> bytes of json/txt members
    # Why the record is unusable although it has members (a member file that cannot be read);
    # "" = fine.
    damaged: str = ""


class DamagedShard(ValueError):
    """A shard whose tar structure ends early: truncated, or a corrupt member header.

    Raised by :func:`scan_tar` after every readable record before the damage was yielded.
    ``message`` is one line naming the file, the byte and what was found; ``last_key`` the last
    key read before the damage ("" = none).
    """

    def __init__(self, path: str, offset: int, size: int, what: str, last_key: str) -> None:
        after = f" after key {last_key!r}" if last_key else " before its first record"
        super().__init__(
            f"{path}: {what} at byte {offset} of {size}{after}: the shard is damaged (truncated or "
            "overwritten; img2dataset killed mid-write leaves this); the records after that point are lost"
        )
        self.path, self.offset, self.size, self.last_key = path, offset, size, last_key


def _member_key(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` of a member name (webdataset: the key ends at the basename's first dot)."""
    base = name.rsplit("/", 1)
    stem_ext = base[-1].split(".", 1)
    if len(stem_ext) != 2 or not stem_ext[0]:
        return None
    return (base[0] + "/" if len(base) == 2 else "") + stem_ext[0], stem_ext[1].lower()


class _Member(NamedTuple):
    """One tar member header: what :func:`scan_tar` needs of it."""

    name: str
    offset: int  # of the header
    offset_data: int
    size: int
    isfile: bool


_REGULAR = (b"0", b"\0", b"7")  # tarfile.REGULAR_TYPES
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, directories, fifos: no data blocks


def _fast_members(raw: Any, size: int) -> Iterator[_Member] | None:
    """The member headers of a plain ustar/GNU/v7 tar, parsed directly (None: let tarfile read it).

    ``tarfile`` builds a ``TarInfo`` per header in Python (~0.1-0.3 ms each; 70% of indexing a
    shard of small images was spent there). img2dataset's and webdataset's shards are plain
    ustar: name, octal size, type, checksum. This walk reads each 512-byte header by seeking (the
    data is skipped), checks its checksum as ``tarfile`` does, and stops where ``tarfile`` stops
    (a zero block, a short header, a failed checksum after the first member). Anything else (pax
    or GNU long-name headers, base-256 sizes, sparse files, an unreadable first header) returns
    None before any member is yielded, and ``tarfile`` reads the shard instead.
    """
    members: list[_Member] = []
    pos = 0
    while True:
        raw.seek(pos)
        hdr = raw.read(tarfile.BLOCKSIZE)
        if len(hdr) < tarfile.BLOCKSIZE or hdr.count(0) == tarfile.BLOCKSIZE:
            break  # the end blocks, or a short header: tarfile's EOF / truncated header
        try:
            stored = int(hdr[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            stored = -1
        # tarfile.calc_chksums: the sum of the bytes, the field counted as 8 spaces; unsigned,
        # or (some old writers) with bytes above 127 as negative.
        unsigned = sum(hdr) - sum(hdr[148:156]) + 256
        if stored != unsigned:
            high = sum(1 for b in hdr[:148] + hdr[156:] if b > 127)
            if stored != unsigned - 256 * high:
                if pos == 0:
                    return None  # tarfile raises its own error for an unreadable first header
                break  # tarfile stops here as at an end; scan_tar then checks the bytes after
        kind = hdr[156:157]
        if hdr[124] & 0x80 or not (kind in _REGULAR or kind in _NO_DATA):
            return None  # base-256 size, pax / GNU long name / sparse members: tarfile's job
        try:
            length = int(hdr[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            return None
        name = hdr[:100].split(b"\0", 1)[0]
        if hdr[345] != 0:  # a ustar prefix (tarfile.frombuf: prefix + "/" + name)
            name = hdr[345:500].split(b"\0", 1)[0] + b"/" + name
        text = name.decode("utf-8", "surrogateescape")
        # (v7: a "regular" member named with a trailing slash is a directory)
        regular = kind in _REGULAR and not (kind == b"\0" and text.endswith("/"))
        members.append(_Member(text, pos, pos + tarfile.BLOCKSIZE, length, regular))
        pos += tarfile.BLOCKSIZE
        if regular:  # tarfile skips the data of regular members only
            pos += -(-length // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    if not members:
        return None  # an empty or unreadable start: tarfile's own error
    return iter(members)


def scan_tar(
    path: str, image_extensions: Sequence[str], text_extensions: Sequence[str] = ("json", "txt")
) -> Iterator[TarRecord]:
    """The records of a webdataset shard, in the order their keys first appear in the tar.

    A key's members are grouped even when they are not adjacent (a plain ``tar cf`` of a folder
    stores files in directory order). The headers are walked first (``tarfile`` in random-access
    mode seeks past the data; image bytes are never read), then each record's small text members
    are read by seeking. A tar that ends early (truncated mid-member, a header that fails its
    checksum, bytes after the last header that are not the zero end blocks) yields its readable
    records and then raises :class:`DamagedShard` naming the byte where reading stopped;
    ``tarfile`` alone would take such a tar for a complete, shorter one.
    """
    import stat as stat_mod

    size = os.stat(path).st_size
    groups: dict[str, TarRecord] = {}
    wanted: list[tuple[TarRecord, str, int, int]] = []  # (record, text extension, offset, size)
    damage: tuple[int, str] | None = None
    last_key = ""
    with open(path, "rb") as raw:
        if not stat_mod.S_ISREG(os.fstat(raw.fileno()).st_mode):
            raise OSError(f"{path}: not a regular file")
        members: Iterator[_Member] | None = _fast_members(raw, size)
        tar: tarfile.TarFile | None = None
        if members is None:  # a tar feature the fast walk leaves to tarfile (pax, GNU long names)
            raw.seek(0)
            try:
                tar = tarfile.open(fileobj=raw, mode="r:")
            except tarfile.ReadError as e:
                if size == 0:
                    raise
                raise DamagedShard(path, 0, size, f"no readable tar header ({e})", "") from e
            members = (_Member(m.name, m.offset, m.offset_data, m.size, m.isfile()) for m in tar)
        end = 0
        try:
            for member in members:
                end = member.offset_data + (-(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE)
                if not member.isfile:
                    continue
                named = _member_key(member.name)
                if named is None:
                    continue
                key, ext = named
                last_key = key
                record = groups.get(key)
                if record is None:
                    record = groups[key] = TarRecord(key, None, {})
                if member.offset_data + member.size > size:
                    have = max(0, size - member.offset_data)
                    damage = (
                        member.offset,
                        f"member {member.name!r} is cut off ({have} of {member.size} bytes)",
                    )
                    break
                if ext in image_extensions and record.image is None:
                    record.image = (member.offset_data, member.size)
                elif ext in text_extensions:
                    wanted.append((record, ext, member.offset_data, member.size))
        except tarfile.ReadError as e:  # "unexpected end of data": the last member is cut off
            damage = (min(tar.offset if tar is not None else end, size), f"tar structure ends early ({e})")
        except (tarfile.TarError, ValueError, UnicodeError, OverflowError) as e:  # a corrupt header
            at = tar.offset if tar is not None else end
            damage = (at, f"unreadable member header ({type(e).__name__}: {e})")
        if damage is None and end >= size and end > 0:
            # Every tar writer ends the archive with zero blocks; none means it was cut off right
            # after a whole member (the records after it are lost).
            damage = (size, "no end-of-archive blocks (cut off after a whole member)")
        elif damage is None and end < size:
            # ``tarfile`` stops at the first header that fails its checksum as if the archive
            # ended there: whatever follows the last member must be the zero end blocks.
            raw.seek(end)
            while chunk := raw.read(1 << 16):
                if chunk.strip(b"\0"):
                    damage = (end, "a corrupt member header (checksum fails) or stray bytes")
                    break
        if damage is not None and groups:
            # The record being read where the damage starts may lack members (its caption, its
            # image): it belongs to the lost tail, so the damage, not "no caption", is reported.
            groups.popitem()
            last_key = next(reversed(groups), "")
        for record, ext, offset, length in wanted:
            if groups.get(record.key) is not record:
                continue
            raw.seek(offset)
            record.texts[ext] = raw.read(length)
    yield from groups.values()
    if damage is not None:
        raise DamagedShard(path, damage[0], size, damage[1], last_key)
