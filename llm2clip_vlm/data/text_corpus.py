"""A plain-text corpus (files of text) for the stage-1 text mix (the reference uses Wikitext-103).

Paths may be files, directories (every ``*.txt`` inside, recursively) or globs. Each non-empty
line is one sample; a file that is not UTF-8 text is refused with its name.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

from llm2clip_vlm.data.errors import DataError


def _expand(path: str) -> list[Path]:
    if os.path.isdir(path):
        return sorted(Path(path).rglob("*.txt"))
    if any(ch in path for ch in "*?["):
        return sorted(Path(p) for p in glob.glob(path, recursive=True) if os.path.isfile(p))
    if os.path.isfile(path):
        return [Path(path)]
    raise DataError(f"text corpus path {path} does not exist")


def load_text_corpus(paths: Sequence[str], min_chars: int = 1) -> list[str]:
    """Every non-empty line of every text file under ``paths``, in a deterministic order."""
    lines: list[str] = []
    for path in paths:
        files = _expand(path)
        if not files:
            raise DataError(f"text corpus path {path} matches no text file")
        for f in files:
            raw = f.read_bytes()
            if b"\x00" in raw[:4096]:
                raise DataError(f"text corpus file {f} is binary, not text")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"text corpus file {f} is not UTF-8 text ({e})") from e
            lines.extend(s for s in (ln.strip() for ln in text.splitlines()) if len(s) >= min_chars)
    return lines
