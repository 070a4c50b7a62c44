"""``metrics.jsonl``: one JSON object per logged step, the single source for reports.

Each line is ``{"step": int, "kind": "train" | "eval" | "learning", "stage": str, "time": unix seconds,
<flat scalars>}`` (``stage``: ``stage1``, ``stage2``, ``llava-pretrain``, ``llava-finetune``);
nested values are flattened with ``/`` (``retrieval/heldout/i2t_r1``), the names the trackers get.
``learning`` lines are stage 2's retrieval on a slice of its training images (``vision/learning.py``).

[IMPORTANT] A resumed run repeats the steps after its checkpoint. Opening the log with
``resume_step=S`` drops every line past step ``S`` first, and a line whose ``(step, kind)`` is
already in the file is not written again (an evaluation recomputed after a resume), so the file
never holds a step twice. A fresh run (``resume_step=None``) starts the file over.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from llm2clip_vlm.logging import get_logger

log = get_logger(__name__)

FILENAME = "metrics.jsonl"


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, float | int | str]:
    """``{"a": {"b": 1}}`` -> ``{"a/b": 1}``; keeps numbers and strings, drops lists and None."""
    flat: dict[str, float | int | str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "/"))
        elif isinstance(value, bool):
            flat[name] = int(value)
        elif isinstance(value, (int, float, str)):
            flat[name] = value
        elif hasattr(value, "item"):  # a 0-d tensor or numpy scalar
            flat[name] = float(value.item())
    return flat


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The lines of a ``metrics.jsonl``; a line that is not a JSON object with a step is left out.

    The torn last line of a killed run is left out silently; other damaged lines (bytes that are
    not UTF-8 JSON) are left out with one warning naming the file and how many lines.
    """
    path = Path(path)
    if not path.is_file():
        return []
    rows, bad = [], 0
    lines = [ln for ln in path.read_bytes().splitlines() if ln.strip()]
    for n, line in enumerate(lines):
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            row = None
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
        elif n < len(lines) - 1 or row is not None:  # not merely the torn last line
            bad += 1
    if bad:
        log.warning("%s: %d damaged line(s) left out (not JSON objects with a step)", path, bad)
    return rows


class MetricsLog:
    """Appends lines to ``RUN/metrics.jsonl``; see the module docstring for the resume rule."""

    def __init__(self, run_dir: str | Path, resume_step: int | None = None, stage: str = "") -> None:
        self.path = Path(run_dir) / FILENAME
        self.stage = stage
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_jsonl(self.path) if resume_step is not None and r["step"] <= resume_step]
        self._seen = {(r["step"], r.get("kind", "train")) for r in kept}
        # Rewrite through a temporary file: a crash here leaves the old file, never half of it.
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(_dump(r) for r in kept), encoding="utf-8")
        os.replace(tmp, self.path)
        self._file = self.path.open("a", encoding="utf-8")

    def has(self, step: int, kind: str) -> bool:
        return (step, kind) in self._seen

    def write(self, step: int, values: Mapping[str, Any], kind: str = "train") -> dict[str, Any] | None:
        """Append one line; returns it, or None when ``(step, kind)`` is already recorded."""
        if self.has(step, kind):
            return None
        row: dict[str, Any] = {"step": int(step), "kind": kind}
        if self.stage:
            row["stage"] = self.stage
        row["time"] = round(time.time(), 3)
        row.update(flatten(values))
        self._file.write(_dump(row))
        self._file.flush()  # a killed run keeps every line it logged
        self._seen.add((step, kind))
        return row

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(read_jsonl(self.path))


def _dump(row: Mapping[str, Any]) -> str:
    # NaN/inf are not JSON: written as null so every line parses everywhere.
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
    return json.dumps(clean, separators=(",", ":")) + "\n"
