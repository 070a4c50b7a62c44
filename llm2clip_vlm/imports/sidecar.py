"""Read the official ``*_text_embeddings.tar`` side-cars into our embedding store.

The reference writes one side-car per image shard (microsoft/LLM2CLIP
``llm2clip/data/extract_embedding.py``): for ``x.tar`` it writes ``x_text_embeddings.tar``
(:35) with, per image key, the members ``<key>.shortSV_captions`` and ``<key>.longSV_captions``
(:12, :42-48), each the raw bytes of one float32 vector (``LLM2Vec.encode`` returns float32,
``llm2clip/llm2vec/llm2vec.py:410``; ``.numpy().tobytes()``, native byte order: little-endian on
the GPUs it ran on). The caption texts are not in the side-car: they are the ``shortSV_captions``
/ ``longSV_captions`` fields of ``<key>.json`` in the image shard (:26-28), read here with the same
reader stage 2 uses, so the store's caption hashes match stage 2's data exactly.

The store is ``OUT/train`` (the layout ``embed`` writes and stage 2 reads). Its encoder identity
is the given ``CaptionEncoder``'s (``--encoder``: the imported stage-1 LLM the side-cars were made
with), else a hash of the side-car files.
"""

from __future__ import annotations

import array
import hashlib
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llm2clip_vlm.data.captions import (
    SIDECAR_SUFFIX,
    captions_only,
    expand_shards,
    is_shard_path,
    load_caption_set,
    sidecars_of,
)
from llm2clip_vlm.data.config import CaptionSetConfig
from llm2clip_vlm.data.errors import DataError
from llm2clip_vlm.data.records import ImageCaptions
from llm2clip_vlm.data.sets import set_names
from llm2clip_vlm.imports.checkpoint import ImportRefused, read_json
from llm2clip_vlm.logging import get_logger
from llm2clip_vlm.store.config import EmbedConfig
from llm2clip_vlm.store.store import write_store
from llm2clip_vlm.text.encoder import ENCODER_FILE, CaptionEncoder, read_encoder_meta
from llm2clip_vlm.text.modeling import ModelRef, load_tokenizer

log = get_logger(__name__)

KEYS = ("shortSV_captions", "longSV_captions")  # extract_embedding.py:12
KINDS = {"shortSV_captions": "short", "longSV_captions": "long"}
SUFFIX = SIDECAR_SUFFIX
# How close the encoder's own embedding of a caption must be to the side-car's (cosine) for the
# side-cars to count as made by it: bf16 vs fp32 and batch padding move it by ~1e-3, another
# encoder (even of the same width) lands far below.
MATCH_COSINE = 0.99


def sidecar_path(shard: Path) -> Path:
    """``x.tar`` -> ``x_text_embeddings.tar`` (extract_embedding.py:35)."""
    return shard.with_name(shard.name[: -len(".tar")] + SUFFIX)


def read_sidecar(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """``{key: {"shortSV_captions": vec, "longSV_captions": vec}}`` in the tar's order (float32).

    Raises:
        ImportRefused: a member that is not one of the two vectors, a byte size that is not a
            float32 vector, vectors of different widths, or a key without both vectors.
    """
    out: dict[str, dict[str, np.ndarray]] = {}
    dim = None
    try:
        tar = tarfile.open(path, "r")
    except (OSError, tarfile.TarError) as e:
        raise ImportRefused(f"{path}: not a readable tar ({e})") from e
    with tar:
        for member in tar:
            if not member.isfile():
                continue
            field = next((k for k in KEYS if member.name.endswith("." + k)), None)
            if field is None:
                raise ImportRefused(
                    f"{path}: member {member.name!r} is not <key>.shortSV_captions / <key>.longSV_captions"
                )
            key = member.name[: -len(field) - 1]
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            if len(data) % 4 or not data:
                raise ImportRefused(
                    f"{path}: member {member.name!r} has {len(data)} bytes, not a float32 vector"
                )
            vec = np.frombuffer(data, dtype="<f4").copy()
            if dim is None:
                dim = vec.size
            elif vec.size != dim:
                raise ImportRefused(
                    f"{path}: member {member.name!r} is {vec.size}-d, earlier vectors are {dim}-d"
                )
            if not np.isfinite(vec).all():
                raise ImportRefused(f"{path}: member {member.name!r} holds non-finite values")
            out.setdefault(key, {})[field] = vec
    for key, vecs in out.items():
        if set(vecs) != set(KEYS):
            raise ImportRefused(f"{path}: key {key!r} lacks {', '.join(sorted(set(KEYS) - set(vecs)))}")
    if not out:
        raise ImportRefused(f"{path}: no embeddings")
    return out


def locate_sidecar(path: Path) -> tuple[dict[str, list[int]], int]:
    """``({key: [offset of the short vector, offset of the long vector]}, width)`` of a side-car,
    from its member headers only (no vector is read: a CC3M shard's side-car holds ~300 MB).

    Raises:
        ImportRefused: as :func:`read_sidecar` does (a foreign member, a size that is not a
            float32 vector, vectors of different widths, a key without both vectors).
    """
    where: dict[str, list[int]] = {}
    dim = 0
    try:
        tar = tarfile.open(path, "r")
    except (OSError, tarfile.TarError) as e:
        raise ImportRefused(f"{path}: not a readable tar ({e})") from e
    with tar:
        try:
            for member in tar:
                if not member.isfile():
                    continue
                field = next((k for k in KEYS if member.name.endswith("." + k)), None)
                if field is None:
                    raise ImportRefused(
                        f"{path}: member {member.name!r} is not <key>.shortSV_captions / <key>.longSV_captions"
                    )
                if member.size % 4 or not member.size:
                    raise ImportRefused(
                        f"{path}: member {member.name!r} has {member.size} bytes, not a float32 vector"
                    )
                if dim and member.size // 4 != dim:
                    raise ImportRefused(
                        f"{path}: member {member.name!r} is {member.size // 4}-d, earlier vectors are {dim}-d"
                    )
                dim = member.size // 4
                slots = where.setdefault(member.name[: -len(field) - 1], [-1, -1])
                slots[KEYS.index(field)] = member.offset_data
        except tarfile.TarError as e:
            raise ImportRefused(f"{path}: damaged tar ({e})") from e
    for key, slots in where.items():
        if min(slots) < 0:
            lacks = [k for k, o in zip(KEYS, slots, strict=True) if o < 0]
            raise ImportRefused(f"{path}: key {key!r} lacks {', '.join(sorted(lacks))}")
    if not where:
        raise ImportRefused(f"{path}: no embeddings")
    return where, dim


class _Rows(Sequence[Any]):
    """The records of several caption sets, one after the other (built on access)."""

    def __init__(self, sets: list[Sequence[Any]]) -> None:
        self.sets = sets
        self.starts = np.cumsum([0] + [len(x) for x in sets])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> Any:  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.sets[k][i - int(self.starts[k])]

    def __iter__(self) -> Any:
        for x in self.sets:
            yield from x


class _Named(Sequence[ImageCaptions]):
    """One set's records with its keys namespaced ``name/key``, as a list of sets names them in
    training (:class:`~llm2clip_vlm.data.sets.JoinedIndex`): the store's key hashes must match."""

    def __init__(self, records: Sequence[ImageCaptions], name: str) -> None:
        self.records, self.name = records, name

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Any:  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        r = self.records[i]
        return ImageCaptions(f"{self.name}/{r.key}", r.image, r.captions, r.source)

    def __iter__(self) -> Any:
        for r in self.records:
            yield ImageCaptions(f"{self.name}/{r.key}", r.image, r.captions, r.source)


def _batch_key(texts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()


class _Precomputed:
    """The store writer's encoder protocol over vectors that already exist in the side-cars.

    The writer (bucketing off, one batch per store shard) asks for whole store shards in row
    order; each batch is found by the hash of its texts and its vectors are read from the
    side-cars by seeking (``files[file_of[row]]`` at ``offset_of[row]``). Nothing holds every
    vector (CC3M at 4096-d would be ~90 GB).
    """

    pooling = "mean"
    pad_to_multiple_of = None

    def __init__(
        self,
        records: Sequence[Any],
        files: list[Path],
        file_of: np.ndarray,
        offset_of: np.ndarray,
        dim: int,
        identity: str,
        tokenizer: Any,
        shard_size: int,
    ) -> None:
        self.files, self.file_of, self.offset_of, self.dim = files, file_of, offset_of, dim
        self._identity, self.tokenizer, self.max_length = identity, tokenizer, 512
        self._records = records
        # store shard start row, by the hash of its texts (one pass over the captions)
        self._starts: dict[str, int] = {}
        batch: list[str] = []
        row = 0
        for r in records:
            for c in r.captions:
                batch.append(c.text)
                if len(batch) == shard_size:
                    self._starts[_batch_key(batch)] = row - shard_size + 1
                    batch = []
                row += 1
        if batch:
            self._starts[_batch_key(batch)] = row - len(batch)

    @property
    def hidden_size(self) -> int:
        return self.dim

    def identity(self) -> str:
        return self._identity

    def encode(self, texts: list[str], batch_size: int = 64, instruction: str | None = None) -> torch.Tensor:
        start = self._starts.get(_batch_key(texts))
        if start is None:
            raise RuntimeError("side-car import: the store writer asked for rows out of shard order")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        handles: dict[int, Any] = {}
        try:
            for j, row in enumerate(range(start, start + len(texts))):
                f = int(self.file_of[row])
                if f not in handles:
                    handles[f] = open(self.files[f], "rb")  # noqa: SIM115 - closed below
                handles[f].seek(int(self.offset_of[row]))
                out[j] = np.frombuffer(handles[f].read(4 * self.dim), dtype="<f4")
                if not np.isfinite(out[j]).all():
                    key = self._records[row // 2].key
                    raise ImportRefused(
                        f"{self.files[f]}: the {KEYS[row % 2]} vector of {key!r} holds non-finite values"
                    )
        finally:
            for h in handles.values():
                h.close()
        return torch.from_numpy(out)


class _WordCounts:
    """Token counts for the manifest's statistics when no tokenizer is given (words)."""

    def __call__(self, texts: list[str], truncation: bool = True, max_length: int = 512) -> dict[str, Any]:
        return {"input_ids": [t.split()[:max_length] for t in texts]}


def import_sidecars(
    shards: Sequence[str | Path],
    out: str | Path,
    encoder: str | Path | None = None,
    dtype: str = "fp32",
    shard_size: int = 4096,
) -> dict[str, Any]:
    """Build ``out/train`` from image shards and their side-cars.

    Streams: the side-cars' headers locate each vector (8 + 4 bytes per caption kept), the
    captions are read through the shards' index, and the store writer reads each store shard's
    vectors from the side-cars when it writes it.

    Args:
        shards: the image shards (``x.tar``; ``x_text_embeddings.tar`` must lie beside each), or
            folders / globs / brace patterns naming them.
        out: store root (``out/train`` is written).
        encoder: the imported ``CaptionEncoder`` directory the side-cars came from (identity and
            tokenizer are read from it; its weights are not loaded).
        dtype: store dtype (``fp32`` keeps the side-car values exactly).
        shard_size: rows per store shard.

    Returns:
        ``{"path", "rows", "images", "dim", "identity"}``.
    """
    return import_sidecar_sets([("", shards)], out, encoder=encoder, dtype=dtype, shard_size=shard_size)


def import_sidecar_sets(
    sets: Sequence[tuple[str, Sequence[str | Path]]],
    out: str | Path,
    encoder: str | Path | None = None,
    dtype: str = "fp32",
    shard_size: int = 4096,
) -> dict[str, Any]:
    """:func:`import_sidecars` for a list of sets (``data.train: [...]``), one store for all.

    The store's rows follow the joined training set (:func:`~llm2clip_vlm.data.captions.load_caption_sets`):
    set after set, each in its shards' order, and a named set's keys are ``name/key`` (each
    side-car's ``key`` maps to ``name/key``: two img2dataset runs both number from ``000000000``).

    Args:
        sets: ``(name, shards)`` per set; name ``""`` keeps the keys as they are (one set).
        out, encoder, dtype, shard_size: as :func:`import_sidecars`.
    """
    groups: list[tuple[str, list[Path]]] = []
    for name, shards in sets:
        # A folder, glob or brace pattern names its image shards (what data.train.path accepts).
        named = [
            f
            for s in shards
            for f in (
                expand_shards(str(s)) if is_shard_path(str(s)) and not str(s).endswith(".tar") else [str(s)]
            )
        ]
        paths = [Path(s) for s in named if not str(s).endswith(SUFFIX)]
        if not paths:
            where = f"set {name!r}: " if name else ""
            raise ImportRefused(f"{where}no image shards given (x.tar, with x_text_embeddings.tar beside it)")
        groups.append((name, paths))
    parts: list[Sequence[Any]] = []
    files: list[Path] = []
    file_of, offset_of = array.array("i"), array.array("q")
    digest = hashlib.sha256()
    dim = 0
    for name, shard in ((n, sh) for n, paths in groups for sh in paths):
        side = sidecar_path(shard)
        if not shard.is_file():
            raise ImportRefused(f"{shard}: missing")
        if not side.is_file():
            raise ImportRefused(f"{shard}: no side-car {side.name} beside it")
        where, width = locate_sidecar(side)
        if dim and width != dim:
            raise ImportRefused(f"{side}: vectors are {width}-d, earlier side-cars' are {dim}-d")
        dim = width
        with open(side, "rb") as f:  # streamed: the identity of the side-cars' bytes
            while chunk := f.read(1 << 24):
                digest.update(chunk)
        cfg = CaptionSetConfig(path=str(shard), format="webdataset", caption_columns=dict(KINDS))
        # Captions only: the images' bytes are not read.
        shard_records = captions_only(load_caption_set(cfg, name=str(shard)))
        for r in shard_records:
            slots = where.pop(r.key, None)
            if slots is None:
                raise ImportRefused(f"{side}: no embeddings for image {r.key!r} of {shard.name}")
            kinds = [c.kind for c in r.captions]
            if kinds != ["short", "long"]:
                raise ImportRefused(
                    f"{shard}:{r.key}: captions {kinds}; the side-car holds one short and one long vector "
                    "(shortSV_captions and longSV_captions must each be one string)"
                )
            file_of.extend((len(files), len(files)))
            offset_of.extend(slots)
        if where:
            raise ImportRefused(f"{side}: key {sorted(where)[0]!r} has no image in {shard.name}")
        files.append(side)
        parts.append(_Named(shard_records, name) if name else shard_records)
    records = _Rows(parts)
    tokenizer: Any = _WordCounts()
    identity = "official-sidecars:" + digest.hexdigest()
    if encoder is not None:
        meta = read_json(Path(encoder) / ENCODER_FILE)
        if int(meta.get("dim", -1)) != dim:
            raise ImportRefused(
                f"{Path(encoder) / ENCODER_FILE}: dim {meta.get('dim')} but the side-cars are {dim}-d"
            )
        identity = str(meta["identity"])
        tokenizer = load_tokenizer(ModelRef(str(encoder)))
    embed = EmbedConfig(
        dtype=dtype, batch_size=shard_size, shard_size=shard_size, bucket_by_length=False, precision="fp32"
    )  # type: ignore[arg-type]
    source = _Precomputed(
        records, files, np.frombuffer(file_of, dtype=np.int32), np.frombuffer(offset_of, dtype=np.int64),
        dim, identity, tokenizer, shard_size,
    )  # fmt: skip
    path = write_store(source, records, Path(out) / "train", embed)
    log.info(
        "store %s: %d captions of %d images from %d side-cars", path, len(offset_of), len(records), len(files)
    )
    return {
        "path": str(path),
        "rows": len(offset_of),
        "images": len(records),
        "dim": dim,
        "identity": identity,
    }


def first_vectors(sidecar: str | Path) -> tuple[str, dict[str, np.ndarray]]:
    """The first key of a side-car and its two vectors, reading nothing past them."""
    vecs: dict[str, np.ndarray] = {}
    key = ""
    try:
        with tarfile.open(sidecar, "r") as tar:
            for member in tar:
                field = next((k for k in KEYS if member.name.endswith("." + k)), None)
                if not member.isfile() or field is None:
                    continue
                this = member.name[: -len(field) - 1]
                if key and this != key:
                    break
                key = this
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                vecs[field] = np.frombuffer(data[: len(data) // 4 * 4], dtype="<f4")
                if len(vecs) == len(KEYS):
                    break
    except (OSError, tarfile.TarError) as e:
        raise ImportRefused(f"{sidecar}: not a readable tar ({e})") from e
    if len(vecs) != len(KEYS):
        raise ImportRefused(f"{sidecar}: no <key>.shortSV_captions + <key>.longSV_captions pair")
    return key, vecs


def sidecar_dim(sidecar: str | Path) -> int:
    """The width of a side-car's vectors (from its first member)."""
    return int(first_vectors(sidecar)[1][KEYS[0]].size)


def _shards_and_sidecars(train: CaptionSetConfig) -> tuple[list[str], list[str]]:
    """A set's image shards and the side-cars beside them (both empty: not a set of shards)."""
    if not train.path or not is_shard_path(train.path):
        return [], []
    try:
        shards = expand_shards(train.path)
    except DataError:
        return [], []
    return shards, sidecars_of(shards)


class _Offered:
    """One set's side-cars as checked so far: its first key's two vectors and captions."""

    def __init__(self, where: str, shards: list[str], sides: list[str]) -> None:
        self.where, self.shards, self.sides = where, shards, sides
        self.key, self.texts, self.theirs = "", [""], np.zeros((0, 0), dtype=np.float32)


def _settings_problem(train: CaptionSetConfig, field: str, shards: list[str], sides: list[str]) -> str:
    """Why the set's settings rule its side-cars out ("" = they don't)."""
    if len(sides) != len(shards):
        return f"only {len(sides)} of {len(shards)} image shards have one"
    wanted = f"set {field}.caption_columns to {{shortSV_captions: short, longSV_captions: long}} to use them"
    if any(train.caption_columns.get(column) != kind for column, kind in KINDS.items()):
        return (
            f"they embed shortSV_captions/longSV_captions and {field}.caption_columns is "
            f"{dict(train.caption_columns)} ({wanted})"
        )
    if train.max_images:
        return f"{field}.max_images keeps part of the set (the side-cars embed all)"
    return ""


def _settings_refuse(train: CaptionSetConfig, field: str, offered: _Offered) -> bool:
    """Whether the set's settings rule its side-cars out (then one line says why)."""
    problem = _settings_problem(train, field, offered.shards, offered.sides)
    if problem:
        log.warning("%s: ignored, %s", offered.where, problem)
    return bool(problem)


def import_recipe_sidecars(
    train: Sequence[CaptionSetConfig], out: str | Path, encoder: str | Path | None = None, dtype: str = "fp32"
) -> dict[str, Any]:
    """``import-embeddings --recipe``: the side-cars of ``data.train``'s sets as one store.

    The store is the one stage 2 would import itself (:func:`offer_sidecars`): for a list, rows in
    the joined set's order under ``<set>/<key>`` (the names :func:`~llm2clip_vlm.data.sets.set_names`
    gives); a list of one set is that set (keys as they are). Each set must be image shards with a
    side-car beside every one, read with the side-cars' two caption columns and no ``max_images``.

    Raises:
        ImportRefused: a set that cannot give its side-cars, in one line naming it and the fix.
    """
    cfgs = list(train)
    if not cfgs:
        raise ImportRefused("the recipe has no data.train set")
    names = set_names(cfgs) if len(cfgs) > 1 else [""]
    sets: list[tuple[str, Sequence[str | Path]]] = []
    for i, (c, name) in enumerate(zip(cfgs, names, strict=True)):
        field = f"data.train[{i}]" if len(cfgs) > 1 else "data.train"
        where = f"{field} ({name or c.path})" if name else f"{field} ({c.path})"
        shards, sides = _shards_and_sidecars(c)
        if not shards:
            raise ImportRefused(
                f"{where}: not webdataset image shards (a folder of .tar, a glob or a brace pattern)"
            )
        if not sides:
            raise ImportRefused(
                f"{where}: no LLM2CLIP side-cars (NNNNN_text_embeddings.tar) beside its shards: "
                "run extract_embedding.py on it, or `embed` for the recipe"
            )
        problem = _settings_problem(c, field, shards, sides)
        if problem:
            raise ImportRefused(f"{where}: side-cars unusable, {problem}")
        sets.append((name, shards))
    return import_sidecar_sets(sets, out, encoder=encoder, dtype=dtype)


def _first_pair_refuses(
    train: CaptionSetConfig, field: str, offered: _Offered, encoder: str | Path, dim: int
) -> bool:
    """Read the set's first side-car key and its captions into ``offered``; whether they rule the
    side-cars out (their width is not the encoder's, or the set reads other captions).

    Raises:
        ImportRefused, DataError, OSError, ValueError, StopIteration: unreadable side-car or shard.
    """
    where = offered.where
    key, vectors = first_vectors(offered.sides[0])
    width = int(vectors[KEYS[0]].size)
    if width != dim:
        log.warning("%s: ignored, they are %d-d and the encoder %s is %d-d", where, width, encoder, dim)
        return True
    first = CaptionSetConfig(
        path=offered.shards[0], format="webdataset", caption_columns=dict(train.caption_columns)
    )
    record = next(r for r in captions_only(load_caption_set(first, skip_bad=True, max_bad_fraction=1.0))
                  if r.key == key)  # fmt: skip
    texts = [c.text for c in record.captions]
    if [c.kind for c in record.captions] != ["short", "long"]:
        wanted = (
            f"set {field}.caption_columns to {{shortSV_captions: short, longSV_captions: long}} to use them"
        )
        log.warning("%s: ignored, %s reads %d captions per image, the side-cars embed two (%s)",
                    where, record.source, len(texts), wanted)  # fmt: skip
        return True
    offered.key, offered.texts = key, texts
    offered.theirs = np.stack([vectors["shortSV_captions"], vectors["longSV_captions"]])
    return False


def _min_cosine(own: np.ndarray, theirs: np.ndarray) -> float:
    return float(
        np.min(
            np.sum(own * theirs, 1) / (np.linalg.norm(own, axis=1) * np.linalg.norm(theirs, axis=1) + 1e-12)
        )
    )


def offer_sidecars(
    train: CaptionSetConfig | Sequence[CaptionSetConfig], store_dir: str | Path, encoder: str | Path | None
) -> dict[str, Any] | None:
    """Stage 2 without a store: use LLM2CLIP's side-cars beside the training shards when they match.

    ``train`` is ``data.train``: one caption set, or a list of them (CC3M + CC12M: two
    img2dataset folders, each with its side-cars). The side-cars match when every image shard of
    every set has one, each set reads the two captions they embed (``caption_columns`` =
    ``shortSV_captions: short, longSV_captions: long``) with no ``max_images``, and the stage-1
    encoder reproduces them: its embedding of each set's first record's two captions is within
    :data:`MATCH_COSINE` of the side-car's (the same width alone proves nothing). Then they are
    imported into ``store_dir/train`` as ``import-embeddings`` does, with the encoder's identity
    (for a list, in the joined set's record order with its ``name/key`` keys:
    :func:`import_sidecar_sets`), and one line says so. Otherwise one line says why they are
    ignored, naming the set that fails. Nothing is logged when no set has side-cars. A list of
    one set is that set.

    Returns:
        :func:`import_sidecars`' summary, or None (no side-cars, or ignored).
    """
    cfgs = [train] if isinstance(train, CaptionSetConfig) else list(train)
    if not cfgs:
        return None
    found = [_shards_and_sidecars(c) for c in cfgs]
    if not any(sides for _, sides in found):
        return None
    if len(cfgs) == 1:
        names, fields = [""], ["data.train"]
        offers = [_Offered(f"LLM2CLIP side-cars beside {cfgs[0].path}", *found[0])]
    else:
        names = set_names(cfgs)
        fields = [f"data.train[{i}]" for i in range(len(cfgs))]
        offers = [
            _Offered(f"LLM2CLIP side-cars of data.train set {n!r} ({c.path})", *f)
            for n, c, f in zip(names, cfgs, found, strict=True)
        ]
        bare = next((o for o in offers if not o.sides), None)
        if bare is not None:  # one store for the list: every set needs its side-cars
            with_sides = ", ".join(repr(n) for n, o in zip(names, offers, strict=True) if o.sides)
            log.warning(
                "%s: ignored, this set has no side-cars beside its shards and set(s) %s do: the "
                "stage-2 store covers every set (run `embed` for the list, or extract_embedding.py "
                "on this set)", bare.where, with_sides,
            )  # fmt: skip
            return None
    for c, field, o in zip(cfgs, fields, offers, strict=True):
        if _settings_refuse(c, field, o):
            return None
    if encoder is None:
        where = offers[0].where if len(offers) == 1 else "LLM2CLIP side-cars of data.train's sets"
        log.warning(
            "%s: ignored, no stage-1 encoder to check them against (--encoder or embed.encoder)", where
        )
        return None
    where = offers[0].where
    try:
        dim = int(read_encoder_meta(Path(encoder)).get("dim", -1))
        for c, field, o in zip(cfgs, fields, offers, strict=True):
            where = o.where
            if _first_pair_refuses(c, field, o, encoder, dim):
                return None
        where = offers[0].where if len(offers) == 1 else "LLM2CLIP side-cars of data.train's sets"
        enc = CaptionEncoder.from_pretrained(encoder)
        own = enc.encode([t for o in offers for t in o.texts]).numpy()  # one batch: 2 captions per set
        del enc
    except (ImportRefused, DataError, OSError, ValueError, StopIteration) as e:
        log.warning("%s: ignored, %s", where, e if str(e) else type(e).__name__)
        return None
    cosines = [_min_cosine(own[2 * i : 2 * i + 2], o.theirs) for i, o in enumerate(offers)]
    for o, cos in zip(offers, cosines, strict=True):
        if cos < MATCH_COSINE:
            log.warning(
                "%s: ignored, the encoder %s does not reproduce them (cosine %.3f on %s's captions; "
                "made by another model): stage 2 needs `embed` with this encoder", o.where, encoder, cos, o.key,
            )  # fmt: skip
            return None
    width = int(offers[0].theirs.shape[1])
    sides = sum(len(o.sides) for o in offers)
    if len(offers) == 1:
        where = offers[0].where
    else:
        where = "LLM2CLIP side-cars of data.train's sets " + ", ".join(
            f"{n} ({len(o.sides)})" for n, o in zip(names, offers, strict=True)
        )
    log.info(
        "%s: %d side-cars, %d-d, reproduced by %s (cosine %.4f): imported as the stage-2 store %s "
        "(what `llm2clip-vlm import-embeddings` does)",
        where, sides, width, encoder, min(cosines), Path(store_dir) / "train",
    )  # fmt: skip
    try:
        if len(offers) == 1:
            return import_sidecars(offers[0].shards, store_dir, encoder=encoder)
        return import_sidecar_sets(
            [(n, o.shards) for n, o in zip(names, offers, strict=True)], store_dir, encoder=encoder
        )
    except (ImportRefused, DataError) as e:
        log.warning("%s: ignored, %s", where, e)
        return None
