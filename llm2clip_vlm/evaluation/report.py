"""Metrics out of lmms-eval results, the paper's reference numbers, and the comparison table.

lmms-eval reports MME as two scores (perception out of 2000, cognition out of 800: per category
accuracy + "acc+" over image pairs, summed over categories), ScienceQA-IMG and VizWiz as
``exact_match`` in [0, 1] (VizWiz's is the 10-annotator VQA accuracy); the table shows the last
two in percent, as papers do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# (column, task, lmms-eval metric key, scale to the reported unit)
COLUMNS: tuple[tuple[str, str, str, float], ...] = (
    ("MME perception", "mme", "mme_perception_score,none", 1.0),
    ("MME cognition", "mme", "mme_cognition_score,none", 1.0),
    ("SQA-IMG", "scienceqa_img", "exact_match,none", 100.0),
    ("VizWiz", "vizwiz_vqa_val", "exact_match,none", 100.0),
)


@dataclass(frozen=True)
class Reference:
    """A published result (SPEC section 1)."""

    name: str
    metrics: dict[str, float]


# LLaVA-1.5-7B, LLM2CLIP paper (arXiv 2411.04997). Its VizWiz figures are on test-dev; lmms-eval's
# vizwiz_vqa_val is the val split, so those two columns are not directly comparable.
REFERENCES = (
    Reference(
        "paper: LLaVA-1.5-7B + CLIP ViT-L/14-336",
        {"MME perception": 1476.7, "SQA-IMG": 67.97, "VizWiz": 50.57},
    ),
    Reference(
        "paper: LLaVA-1.5-7B + LLM2CLIP tower",
        {"MME perception": 1505.8, "SQA-IMG": 69.92, "VizWiz": 52.37},
    ),
)
NOTES = (
    "Reference VizWiz numbers are on test-dev; `vizwiz_vqa_val` is the val split (not directly comparable).",
    "MME perception of the CLIP model: 1476.7 is the LLM2CLIP paper's run; the LLaVA-1.5 paper reports 1510.7.",
)


def _task_of(name: str) -> str:
    """``mme_local`` -> ``mme``: local copies report under the standard name."""
    return name[: -len("_local")] if name.endswith("_local") else name


def extract_metrics(results: dict[str, Any]) -> dict[str, float]:
    """Table columns from an lmms-eval results dict (``{"results": {task: {metric: value}}}``)."""
    per_task = {_task_of(task): values for task, values in results.get("results", {}).items()}
    out: dict[str, float] = {}
    for column, task, key, scale in COLUMNS:
        value = per_task.get(task, {}).get(key)
        if isinstance(value, int | float):
            out[column] = float(value) * scale
    return out


def load_results_file(path: str | Path) -> tuple[str, dict[str, float]]:
    """(label, metrics) from an lmms-eval results JSON or an ``llm2clip-vlm eval`` summary entry.

    Raises:
        ValueError: the file has no ``results`` section.
    """
    path = Path(path)
    data = json.loads(path.read_text())
    if "results" not in data:
        raise ValueError(f"{path}: not an lmms-eval results file (no 'results' key)")
    model_args = str(data.get("config", {}).get("model_args", ""))
    label = next(
        (Path(a.split("=", 1)[1]).name for a in model_args.split(",") if a.startswith("pretrained=")),
        path.stem,
    )
    return label, extract_metrics(data)


def _fmt(value: float | None, column: str) -> str:
    if value is None:
        return "—"
    return f"{value:.1f}" if column.startswith("MME") else f"{value:.2f}"


def comparison_rows(rows: dict[str, dict[str, float]], with_references: bool = True) -> list[list[str]]:
    """Table body: one row per model, then the references."""
    body = [[label, *(_fmt(m.get(c[0]), c[0]) for c in COLUMNS)] for label, m in rows.items()]
    if with_references:
        body += [[r.name, *(_fmt(r.metrics.get(c[0]), c[0]) for c in COLUMNS)] for r in REFERENCES]
    return body


def markdown_table(rows: dict[str, dict[str, float]], title: str) -> str:
    """The comparison as a markdown table with the reference rows and notes."""
    header = ["model", *(c[0] for c in COLUMNS)]
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in comparison_rows(rows)]
    lines += ["", *(f"- {n}" for n in NOTES), ""]
    return "\n".join(lines)


def rich_table(rows: dict[str, dict[str, float]], title: str) -> Any:
    """The same comparison as a rich Table (reference rows dimmed)."""
    from rich.table import Table

    table = Table(title=title, caption=" ".join(NOTES[:1]))
    table.add_column("model")
    for column, *_ in COLUMNS:
        table.add_column(column, justify="right")
    n_models = len(rows)
    for i, row in enumerate(comparison_rows(rows)):
        table.add_row(*row, style="dim" if i >= n_models else None)
    return table


__all__ = [
    "COLUMNS",
    "NOTES",
    "REFERENCES",
    "comparison_rows",
    "extract_metrics",
    "load_results_file",
    "markdown_table",
    "rich_table",
]
