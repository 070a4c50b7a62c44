"""The plain-text corpus (files of text) for stage 1's MNTP mix (the reference uses Wikitext-103).

The one reader of ``data.text_corpus`` (the CLI's stage 1 and ``build-tower`` use it; docs/DATA.md
describes it). Paths may be files, directories (every ``*.txt`` inside, recursively) or globs.
Each stripped line of at least ``min_chars`` characters is one sample. Refused with the file's
name (:class:`~llm2clip_vlm.data.errors.DataError`): a missing path, a pattern that matches
nothing, a file holding a NUL byte (binary, or UTF-16 text), a file that is not UTF-8, and a file
none of whose lines is long enough (its text would silently contribute nothing).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

from llm2clip_vlm.data.errors import DataError

# Shorter lines (headings, blank-ish lines, list markers) teach MNTP little; llm2vec's Wikitext
# preprocessing drops them too.
MIN_CHARS = 20


def _expand(path: str) -> list[Path]:
    if os.path.isdir(path):
        return sorted(Path(path).rglob("*.txt"))
    if any(ch in path for ch in "*?["):
        return sorted(Path(p) for p in glob.glob(path, recursive=True) if os.path.isfile(p))
    if os.path.isfile(path):
        return [Path(path)]
    raise DataError(f"text corpus path {path} does not exist")


def _read_lines(f: Path, min_chars: int) -> list[str]:
    """The usable lines of one corpus file (refusing it, named, when it holds none)."""
    raw = f.read_bytes()
    if b"\x00" in raw:
        at = raw.index(b"\x00")
        raise DataError(f"text corpus file {f} is binary, not UTF-8 text (a NUL byte at byte {at})")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"text corpus file {f} is not UTF-8 text (byte {e.start}: {e.reason})") from e
    lines = [s for s in (ln.strip() for ln in text.splitlines()) if len(s) >= min_chars]
    if not lines:
        raise DataError(
            f"text corpus file {f} has no line of {min_chars} characters or more "
            "(each line is one sample; shorter lines are left out): remove it from data.text_corpus"
        )
    return lines


def load_text_corpus(paths: Sequence[str], min_chars: int = MIN_CHARS) -> list[str]:
    """Every usable line of every text file under ``paths``, in a deterministic order."""
    lines: list[str] = []
    for path in paths:
        files = _expand(path)
        if not files:
            raise DataError(f"text corpus path {path} matches no text file")
        for f in files:
            lines.extend(_read_lines(f, min_chars))
    return lines
