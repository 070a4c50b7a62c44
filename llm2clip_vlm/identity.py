"""Identities of input files: what a stage's artifact was made from, cheap by default, exact on demand.

A file's identity is a sha256 over its size, its modification time and three sampled 64 KiB
blocks (start, middle, end): reading ~200 KiB per file, it changes when a file is rewritten,
edited (mtime) or truncated (size). ``mode="full"`` hashes the whole content instead (and
ignores mtime), for when timestamps cannot be trusted (copies, restored backups) or an edit may
have kept the size and the time. :func:`files_identity` combines many files into one hash.

What is *not* covered in the sampled mode: an edit that keeps the size and restores the mtime and
misses the three blocks; use ``reliability.input_identity=full``.

Folders (a model, a tower, a text corpus) are identified by every file of their tree
(:func:`path_identity`), a single file (a GGUF model, a projector) by itself. Images named by a
manifest join by content: :func:`images_identity` hashes a fixed number of them spread over the
data set (sampled), or all of them (full).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

Mode = Literal["sampled", "full"]
BLOCK = 64 * 1024
STAMP_BLOCK = 4096  # file_stamp's blocks


def file_sha256(path: str | Path) -> str:
    """sha256 of a whole file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def sampled_sha256(path: str | Path, size: int, block: int = BLOCK, prefix: bytes = b"") -> str:
    """sha256 of ``prefix`` and three ``block``-byte blocks of a ``size``-byte file: start, middle, end."""
    h = hashlib.sha256(prefix)
    with open(path, "rb") as f:
        for offset in sorted({0, max(0, size // 2 - block // 2), max(0, size - block)}):
            f.seek(offset)
            h.update(f.read(block))
    return h.hexdigest()


def file_identity(path: str | Path, mode: Mode = "sampled") -> str:
    """The identity of one file (see the module docstring); raises OSError if it cannot be read."""
    path = Path(path)
    st = os.stat(path)
    if mode == "full":
        return hashlib.sha256(f"{st.st_size}|{file_sha256(path)}".encode()).hexdigest()
    return sampled_sha256(path, st.st_size, BLOCK, f"{st.st_size}|{st.st_mtime_ns}|".encode())


def file_stamp(path: str | Path) -> dict[str, object]:
    """A cache key's view of a file: its resolved path, size, mtime and a sampled sha256.

    Cheaper than :func:`file_identity` (three 4 KiB blocks: ~15 MB read for 1200 shards, not
    230 MB); the data indexes and the image-check and GGUF caches are keyed by it.
    """
    p = Path(path).resolve()
    st = p.stat()
    digest = sampled_sha256(p, st.st_size, STAMP_BLOCK)
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sample_sha256": digest}


def files_identity(paths: Iterable[str | Path], mode: Mode = "sampled") -> dict[str, str]:
    """``{path: identity}`` of every existing file (a missing file maps to ``"missing"``)."""
    out = {}
    for p in sorted({str(Path(p)) for p in paths}):
        out[p] = file_identity(p, mode) if Path(p).is_file() else "missing"
    return out


def folder_files(folder: str | Path, suffixes: tuple[str, ...] = ()) -> list[Path]:
    """Files directly in ``folder`` (those ending with ``suffixes`` if given); [] if not a folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and (not suffixes or p.name.endswith(suffixes)))


def tree_files(folder: str | Path) -> list[Path]:
    """Every file under ``folder``, recursively (hidden files and folders left out), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def path_identity(path: str | Path, mode: Mode = "sampled") -> dict[str, str]:
    """``{file: identity}`` of a file, or of every file in a folder tree (a GGUF file, a model
    folder, a tower, a projector); ``{path: "missing"}`` when it does not exist."""
    path = Path(path)
    if path.is_file():
        return {str(path): file_identity(path, mode)}
    if path.is_dir():
        return files_identity(tree_files(path), mode)
    return {str(path): "missing"}


# How many images a sampled image identity reads: spread evenly over the records, so the cost is
# the same for 1 000 and 10 000 000 records (docs/BENCHMARKS.md, "content identity").
IMAGE_SAMPLE = 1024


def images_identity(paths: Sequence[str], mode: Mode = "sampled", sample: int = IMAGE_SAMPLE) -> str:
    """One hash of the images' content: ``sample`` of them spread evenly over ``paths`` (sampled),
    or every one (``full``); each image contributes its size and the sha256 of its bytes.

    What the sampled mode misses: an image overwritten in place that is not among the sampled ones
    (1024 of 10M: a whole-set change is caught, a single file is not; use ``full``).
    """
    n = len(paths)
    picked = range(n) if mode == "full" or n <= sample else sorted({i * n // sample for i in range(sample)})
    h = hashlib.sha256(f"{n}|{mode}|".encode())
    for i in picked:
        p = str(paths[i])
        if not p:  # an image inside a shard: identified with its shard
            continue
        try:
            h.update(f"{p}|{os.path.getsize(p)}|{file_sha256(p)}\n".encode())
        except OSError:
            h.update(f"{p}|missing\n".encode())
    return h.hexdigest()
