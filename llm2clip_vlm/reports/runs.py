"""Find and read the runs a report shows.

A RUN argument is a training run directory (one with a ``metrics.jsonl``: stage 1, stage 2,
``llava-pretrain``, ``llava-finetune``) or a ``build-tower`` directory, whose ``stage1/`` and
``stage2/`` runs are taken. Everything numeric comes from ``metrics.jsonl``; the galleries from
``gallery/`` (see :mod:`llm2clip_vlm.tracking.gallery`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm2clip_vlm.logging import get_logger
from llm2clip_vlm.tracking.gallery import ANSWERS_FILE, GALLERY_DIR, RETRIEVAL_FILE
from llm2clip_vlm.tracking.metrics_log import FILENAME, read_jsonl
from llm2clip_vlm.training.session import METRICS_FILE, read_metrics

log = get_logger(__name__)

BUILD_STAGES = ("stage1", "stage2")
# What each trainer writes as ``stage`` -> the report's section for it.
STAGE_KINDS = {"stage1": "stage1", "stage2": "stage2", "llava-pretrain": "llava", "llava-finetune": "llava"}


class NotARunError(ValueError):
    """A RUN argument that holds no run (the message names the path)."""


@dataclass
class Run:
    """One training run as the report sees it."""

    label: str
    path: Path
    rows: list[dict[str, Any]]
    retrieval_gallery: dict[str, Any] = field(default_factory=dict)
    answers: list[dict[str, Any]] = field(default_factory=list)
    # The ``train`` section of the run's metrics.json (schema 1; empty while it runs, or for an
    # older run, whose metrics.json the report names in one warning line).
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """``stage1`` (CRA), ``stage2`` (retrieval), ``llava`` (held-out answers) or ``train``."""
        stages = {r.get("stage") for r in self.rows} & set(STAGE_KINDS)
        if len(stages) == 1:
            return STAGE_KINDS[stages.pop()]
        keys = {k for r in self.evals for k in r}  # lines without a stage: what was measured
        if "cra" in keys:
            return "stage1"
        if any(k.startswith("retrieval/") for k in keys):
            return "stage2"
        if any(k.startswith("heldout/") for k in keys):
            return "llava"
        return "train"

    @property
    def train(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r.get("kind") == "train"]

    @property
    def evals(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r.get("kind") == "eval"]

    def before_after(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The first evaluation (step 0: before training) and the last one (after), if any."""
        ev = sorted(self.evals, key=lambda r: r["step"])
        before = ev[0] if ev and ev[0]["step"] == 0 else {}
        after = ev[-1] if ev and ev[-1]["step"] > 0 else {}
        return before, after

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """``(steps, values)`` of a training scalar."""
        pts = [(r["step"], r[key]) for r in self.train if isinstance(r.get(key), (int, float))]
        return [p[0] for p in pts], [p[1] for p in pts]


def _inside(base: Path, path: Path) -> bool:
    """``path`` is a file under ``base`` once links are resolved (a run's files may be edited or
    linked by anyone: the report reads nothing outside the run folders it was given)."""
    return path.resolve().is_relative_to(base.resolve()) and path.is_file()


def _read_json(base: Path, path: Path, check: Callable[[Any], bool]) -> Any:
    """A gallery JSON file of the run, or None (with one warning) when it is outside the run,
    not UTF-8 JSON, or not shaped as :mod:`llm2clip_vlm.tracking.gallery` writes it."""
    if not path.exists() and not path.is_symlink():
        return None
    if not _inside(base, path):
        log.warning("%s: left out of the report (it leads outside the run folder %s)", path, base)
        return None
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        log.warning("%s: left out of the report (not UTF-8 JSON: %s)", path, e)
        return None
    if not check(doc):
        log.warning("%s: left out of the report (not the layout the run writes)", path)
        return None
    return doc


def _is_retrieval(doc: Any) -> bool:
    def query_ok(q: Any) -> bool:
        return (
            isinstance(q, dict)
            and isinstance(q.get("top"), list)
            and all(isinstance(t, list) and len(t) == 2 for t in q["top"])
            and "answer" in q
            and "caption" in q
        )

    def image_ok(q: Any) -> bool:
        return (
            isinstance(q, dict)
            and "image" in q
            and isinstance(q.get("top"), list)
            and all(isinstance(c, dict) and "caption" in c and "correct" in c for c in q["top"])
        )

    return isinstance(doc, dict) and all(
        isinstance(g, dict)
        and isinstance(g.get("images"), dict)
        and isinstance(g.get("text_to_image"), list)
        and isinstance(g.get("image_to_text"), list)
        and all(map(query_ok, g["text_to_image"]))
        and all(map(image_ok, g["image_to_text"]))
        for g in doc.values()
    )


def _is_answers(doc: Any) -> bool:
    return isinstance(doc, list) and all(isinstance(ex, dict) for ex in doc)


def _read_run(path: Path, label: str) -> Run:
    gallery = path / GALLERY_DIR
    retrieval = _read_json(path, gallery / RETRIEVAL_FILE, _is_retrieval) or {}
    answers = _read_json(path, gallery / ANSWERS_FILE, _is_answers) or []
    metrics = path / FILENAME
    rows = read_jsonl(metrics) if _inside(path, metrics) else []
    if not rows and metrics.is_file() and not _inside(path, metrics):
        log.warning("%s: left out of the report (it leads outside the run folder %s)", metrics, path)
    return Run(label, path, rows, retrieval, answers, _summary(path))


def _summary(path: Path) -> dict[str, Any]:
    """The run's metrics.json ``train`` section, or {} (not finished, or one warning line naming it)."""
    file = path / METRICS_FILE
    if not file.is_file() or not _inside(path, file):
        return {}
    try:
        train = read_metrics(file).get("train")
    except ValueError as e:
        log.warning("%s", e)
        return {}
    return train if isinstance(train, dict) else {}


def load_runs(paths: list[Path]) -> list[Run]:
    """The runs under ``paths`` (a build-tower directory gives one run per stage).

    Raises:
        NotARunError: a path that does not exist or holds no ``metrics.jsonl``.
    """
    runs: list[Run] = []
    for path in paths:
        if not path.is_dir():
            raise NotARunError(f"{path}: no such run directory")
        if (path / FILENAME).is_file():
            runs.append(_read_run(path, path.resolve().name))
            continue
        stages = [path / s for s in BUILD_STAGES if (path / s / FILENAME).is_file()]
        if not stages:
            raise NotARunError(
                f"{path}: no {FILENAME} here or in {'/, '.join(BUILD_STAGES)}/ (not a run directory, "
                "or a run made before metrics.jsonl existed)"
            )
        runs += [_read_run(s, f"{path.resolve().name}/{s.name}") for s in stages]
    return runs
