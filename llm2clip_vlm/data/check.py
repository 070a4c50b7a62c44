"""Decode every image of a data set once, in parallel, and remember the result.

``data.verify_images`` used to decode every image at every start, on every rank (2-2.5 h per
rank per start at 10M images). :func:`check_images` instead

- splits the records into chunks of :data:`CHUNK` and writes one small result file per chunk
  (``status`` per record: 1 good, 2 bad; and the bad ones' messages) into
  ``<cache root>/checks/<key>/``, atomically: a killed check resumes at the first missing chunk;
- decodes a chunk with ``workers`` threads (PIL releases the GIL while decoding);
- lets several processes share the work without talking to each other: process ``r`` of ``w``
  starts at chunk ``r * chunks / w`` and walks on, skipping chunks already written, so each
  chunk is usually decoded once whatever the process count;
- keys the cache by the data set's identity (its index key: file identity + reader settings, or
  the caller's key) and the number of records. A second start reads ``chunks`` small files.

The bad records go through the usual policy (:class:`~llm2clip_vlm.data.errors.BadRecords`):
stop at the first (in record order), or skip, count and report.

Manifests name image files that are not part of the manifest's identity: an image replaced
after the check is not re-checked (the training loader still refuses it if it cannot be read).
Delete ``<cache root>/checks`` to check everything again.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from llm2clip_vlm.data.captions import open_image, record_index
from llm2clip_vlm.data.errors import BadRecords, DataError
from llm2clip_vlm.data.images import interrupted_check
from llm2clip_vlm.data.index import cache_root
from llm2clip_vlm.logging import get_logger
from llm2clip_vlm.progress import make_progress
from llm2clip_vlm.signals import GracefulExit

log = get_logger(__name__)

CHUNK = 4096
CHECK_VERSION = 1  # bump when the image policy (data/images.py) changes what is refused


def process_rank() -> tuple[int, int]:
    """``(rank, world)`` from the launcher's environment (torchrun / accelerate launch)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def check_images(
    records: Sequence[Any],
    policy: BadRecords,
    load: Callable[[Any], Any],
    *,
    key: str | None,
    workers: int = 4,
    description: str = "checking images",
    cache_dir: Path | None = None,
    select: Callable[[Any], bool] | None = None,
    total: int | None = None,
) -> list[int] | None:
    """Indices of the records whose image decodes, or None when all do (the common case).

    Args:
        records: the data set (map-style); ``load(records[i])`` decodes one image or raises
            :class:`~llm2clip_vlm.data.errors.DataError`.
        policy: stop at the first bad image, or skip and count (then :meth:`BadRecords.check`).
        key: the data set's identity for the cache; None = no cache (decode everything now).
        workers: decoding threads.
        description: for the progress bar.
        cache_dir: cache root (default :func:`~llm2clip_vlm.data.index.cache_root`).
        select: only records for which this is true have an image to check (others count good).
        total: the record count the bad share is taken of (default ``len(records)``; a caller that
            already dropped bad records passes the count before).
    """
    n = len(records)
    chunks = (n + CHUNK - 1) // CHUNK
    directory = None
    if key is not None:
        directory = (cache_dir or cache_root()) / "checks" / f"{key}-{n}-v{CHECK_VERSION}"
        directory.mkdir(parents=True, exist_ok=True)
    rank, world = process_rank()
    start = rank * chunks // max(1, world)
    status = np.zeros(n, dtype=np.uint8)
    reasons: dict[int, tuple[str, str]] = {}
    todo = [(start + k) % chunks for k in range(chunks)] if chunks else []

    decoded = 0
    # SIGTERM/SIGINT stop the check at the next image with a message (and 128 + signal), rather
    # than killing the process silently; the chunks written so far are kept for the next start.
    with (
        GracefulExit() as signals,
        make_progress() as progress,
        ThreadPoolExecutor(max_workers=max(1, workers)) as pool,
    ):
        task = progress.add_task(description, total=n, status="", unit="image")
        for c in todo:
            lo, hi = c * CHUNK, min(n, (c + 1) * CHUNK)
            done = _read_chunk(directory, c) if directory is not None else None
            cached = done is not None
            if done is None:
                done = _check_chunk(
                    records, lo, hi, load, pool, select, lambda: signals.requested is not None
                )
                if done is None:  # a stop was requested: this chunk stays unwritten
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise interrupted_check(signals.requested or 15, description)
                decoded += hi - lo
                if directory is not None:
                    _write_chunk(directory, c, *done)
            status[lo:hi], bad = done
            reasons.update(bad)
            if cached:
                progress.skip(task, hi - lo)
            else:
                progress.advance(task, hi - lo)
    if key is not None:
        log.info(
            "%s: %d of %d images decoded now, the rest known from %s", description, decoded, n, directory
        )
    bad_indices = np.flatnonzero(status == 2)
    for i in bad_indices.tolist():  # in record order: the first bad one stops the run
        where, reason = reasons[i]
        policy.add(where, _error(reason))
    policy.check(n if total is None else total)
    if not bad_indices.size:
        return None
    return np.flatnonzero(status != 2).tolist()


def _error(reason: str) -> Exception:
    return DataError(reason)


def _check_chunk(
    records: Sequence[Any],
    lo: int,
    hi: int,
    load: Callable[[Any], Any],
    pool: ThreadPoolExecutor,
    select: Callable[[Any], bool] | None,
    stop: Callable[[], bool] = lambda: False,
) -> tuple[np.ndarray, dict[int, tuple[str, str]]] | None:
    """The chunk's status and bad records; None when ``stop()`` turned true before it was done."""

    def probe(i: int) -> tuple[str, str] | None:
        r = records[i]
        if select is not None and not select(r):
            return None
        try:
            load(r)
            return None
        except DataError as e:
            return (getattr(r, "source", "") or getattr(r, "key", "") or str(i), str(e))

    status = np.ones(hi - lo, dtype=np.uint8)
    bad: dict[int, tuple[str, str]] = {}
    for i, result in zip(range(lo, hi), pool.map(probe, range(lo, hi)), strict=True):
        if stop():
            return None
        if result is not None:
            status[i - lo] = 2
            bad[i] = result
    return status, bad


def _chunk_files(directory: Path, c: int) -> tuple[Path, Path]:
    return directory / f"chunk-{c:06d}.npy", directory / f"chunk-{c:06d}.bad.json"


def _read_chunk(directory: Path, c: int) -> tuple[np.ndarray, dict[int, tuple[str, str]]] | None:
    status_file, bad_file = _chunk_files(directory, c)
    if not status_file.is_file():  # written last: its presence means the chunk is complete
        return None
    try:
        bad = {int(i): (w, r) for i, w, r in json.loads(bad_file.read_text())}
        return np.load(status_file, allow_pickle=False), bad
    except (OSError, ValueError):  # a damaged cache file: check the chunk again
        return None


def _write_chunk(directory: Path, c: int, status: np.ndarray, bad: dict[int, tuple[str, str]]) -> None:
    status_file, bad_file = _chunk_files(directory, c)
    for path, write in (
        (bad_file, lambda f: f.write(json.dumps([[i, w, r] for i, (w, r) in bad.items()]).encode())),
        (status_file, lambda f: np.save(f, status, allow_pickle=False)),
    ):
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)


def check_caption_images(
    records: Sequence[Any], policy: BadRecords, *, workers: int = 4, description: str = "checking images"
) -> list[int] | None:
    """:func:`check_images` for a caption set, cached under its index's identity when it has one."""
    index = record_index(records)
    key = index.directory.name if index is not None else None
    return check_images(records, policy, open_image, key=key, workers=workers, description=description)
