"""Towers side by side: the held-out tables of LLaVAs trained alike on different vision towers.

The paper's claim is that a LLaVA-1.5 on the LLM2CLIP tower answers better than on the tower it
started from. :func:`build_comparison` puts the held-out evaluation of one ``llava-finetune`` run
per tower next to each other: per question type the accuracy, the blind accuracy (the same
questions with the image withheld), the gap between them (what the image adds), and the
majority-answer baseline. A tower is only better at *seeing* when its gap is larger, not when its
accuracy is: the blind column tells habit from sight.

Three files come out of one comparison (:func:`write_comparison`): ``comparison.json`` (the
numbers, exactly as each run's ``metrics.json`` holds them), ``comparison.md`` (a table to paste)
and ``report.html`` (the same table, self-contained). Each run's numbers are read through
:func:`heldout_of`, the one place that knows where a finetune run keeps them.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from llm2clip_vlm.errors import UserError
from llm2clip_vlm.reports.html import CSS

METRICS_FILE = "metrics.json"
# The columns of each tower in the side-by-side table, and their headings.
TOWER_COLUMNS = (("accuracy", "acc"), ("blind_accuracy", "blind"), ("gap", "gap"))
BLIND_MEANING = {"shuffle": "another question's image", "blank": "a blank (mean-colour) image"}


class NoHeldoutError(UserError, ValueError):
    """A run directory has no finished held-out evaluation to compare."""

    exit_code = 1


@dataclass(frozen=True)
class TowerRun:
    """One column group of the comparison: a tower's name, its directory and its finetune run."""

    name: str
    tower: str
    finetune: Path
    pretrain: Path | None = None


def read_metrics(run: Path) -> dict[str, Any]:
    """A run's ``metrics.json`` as a dict (raises :class:`NoHeldoutError` naming the file)."""
    path = Path(run) / METRICS_FILE
    if not path.is_file():
        raise NoHeldoutError(f"{path}: missing (the run has not finished)")
    try:
        doc = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise NoHeldoutError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(doc, dict):
        raise NoHeldoutError(f"{path}: not a JSON object")
    return doc


def heldout_of(metrics: dict[str, Any]) -> dict[str, Any]:
    """The held-out evaluation after training, from a ``llava-finetune`` run's ``metrics.json``.

    The one place that knows the layout (metrics.json schema 1, docs/DATA.md): ``eval.after`` =
    ``{accuracy, n, blind_accuracy, gap, majority_accuracy, blind, per_type: {type: {... ,
    majority_answer}}}``.
    """
    after = metrics.get("eval", {}).get("after")
    return after if isinstance(after, dict) else {}


def train_of(metrics: dict[str, Any]) -> dict[str, Any]:
    """The ``train`` section (steps, seconds, ...) of a run's ``metrics.json`` (schema 1)."""
    train = metrics.get("train")
    return train if isinstance(train, dict) else {}


def _row(r: dict[str, Any]) -> dict[str, Any]:
    keep = ("n", "accuracy", "blind_accuracy", "gap", "majority_accuracy", "majority_answer")
    return {k: r[k] for k in keep if k in r}


def build_comparison(runs: Sequence[TowerRun]) -> dict[str, Any]:
    """The comparison document (what ``comparison.json`` holds) of finished finetune runs.

    Raises:
        NoHeldoutError: a run has no ``metrics.json`` or no held-out evaluation.
    """
    towers: list[dict[str, Any]] = []
    for run in runs:
        metrics = read_metrics(run.finetune)
        after = heldout_of(metrics)
        if not after:
            raise NoHeldoutError(
                f"{run.finetune / METRICS_FILE}: no held-out evaluation (llava.finetune.data has no held-out set)"
            )
        train = train_of(metrics)
        seconds = float(train.get("seconds", 0.0))
        pretrain: dict[str, Any] = {}
        if run.pretrain is not None and (run.pretrain / METRICS_FILE).is_file():
            pretrain = train_of(read_metrics(run.pretrain))
            seconds += float(pretrain.get("seconds", 0.0))
        towers.append(
            {
                "name": run.name,
                "tower": run.tower,
                "finetune": str(run.finetune),
                "steps": train.get("steps"),
                "planned_steps": train.get("planned_steps"),
                "pretrain_steps": pretrain.get("steps"),
                "pretrain_planned_steps": pretrain.get("planned_steps"),
                "train_seconds": round(seconds, 1),
                "blind": after.get("blind", "off"),
                "all": _row(after),
                "per_type": {t: _row(r) for t, r in (after.get("per_type") or {}).items()},
            }
        )
    types = sorted({t for tw in towers for t in tw["per_type"]})
    notes = []
    # The same held-out questions for every tower, or the columns are not comparable.
    for t in [*types, "all"]:
        counts = {
            tw["name"]: (tw["all"] if t == "all" else tw["per_type"].get(t, {})).get("n") for tw in towers
        }
        if len(set(counts.values())) > 1:
            notes.append(f"{t}: the towers were asked different numbers of questions {counts}")
    notes += _training_notes(towers)
    return {"towers": towers, "types": types, "notes": notes}


def _training_notes(towers: Sequence[dict[str, Any]]) -> list[str]:
    """Where the towers' LLaVAs did not train alike: a phase stopped before its planned steps (the
    ``loop.max_seconds`` cap on a slow or loaded machine), or phases of unequal length."""
    notes = []
    phases = (
        ("pretrain", "pretrain_steps", "pretrain_planned_steps"),
        ("finetune", "steps", "planned_steps"),
    )
    for phase, key, planned_key in phases:
        for tw in towers:
            done, planned = tw.get(key), tw.get(planned_key)
            if isinstance(done, int) and isinstance(planned, int) and done < planned:
                notes.append(
                    f"{tw['name']}: {phase} stopped at step {done} of {planned} "
                    f"(llava.{phase}.loop.max_seconds or an early stop)"
                )
        steps = {tw["name"]: tw.get(key) for tw in towers if tw.get(key) is not None}
        if len(set(steps.values())) > 1:
            notes.append(f"{phase}: the towers trained different numbers of steps {steps}")
    return notes


def _steps(done: Any, planned: Any) -> str:
    if done is None:
        return "?"
    return f"{done} of {planned}" if isinstance(planned, int) and planned != done else str(done)


def _num(v: Any, signed: bool = False) -> str:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return "-"
    return f"{v:+.1f}" if signed else f"{v:.1f}"


def table_rows(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Heading and rows of the side-by-side table: type, n, majority, then acc/blind/gap per tower."""
    towers = doc["towers"]
    head = ["type", "n", "majority answer"]
    head += [f"{tw['name']} {label}" for tw in towers for _, label in TOWER_COLUMNS]
    rows = []
    # Questions without a question_type are scored under "all", which is then the overall row.
    for t in [*(t for t in doc["types"] if t != "all"), "all"]:
        cells = [(tw["all"] if t == "all" else tw["per_type"].get(t, {})) for tw in towers]
        first = next((c for c in cells if c), {})
        majority = _num(first.get("majority_accuracy"))
        if first.get("majority_answer"):
            majority += f" ({first['majority_answer']})"
        row = [t, str(first.get("n", "-")), majority]
        row += [_num(c.get(key), signed=key == "gap") for c in cells for key, _ in TOWER_COLUMNS]
        rows.append(row)
    return head, rows


def _blind_line(doc: dict[str, Any]) -> str:
    modes = {tw["blind"] for tw in doc["towers"]}
    shown = ", ".join(BLIND_MEANING.get(m, m) for m in sorted(modes))
    return (
        f"blind = the same questions asked with {shown}; gap = acc - blind (what the image adds), "
        "in points; majority answer = always answering the type's most frequent held-out answer."
    )


def _training(tw: dict[str, Any]) -> str:
    """``pretrain 120 steps, finetune 74 of 80 steps; 3428 s`` (a comparison written by an older
    version has only the finetune's steps)."""
    parts = []
    if tw.get("pretrain_steps") is not None:
        parts.append(f"pretrain {_steps(tw['pretrain_steps'], tw.get('pretrain_planned_steps'))} steps")
    parts.append(f"finetune {_steps(tw.get('steps'), tw.get('planned_steps'))} steps")
    return ", ".join(parts) + f"; training {tw['train_seconds']:.0f} s"


def to_markdown(doc: dict[str, Any]) -> str:
    """``comparison.md``: the side-by-side table (percent), the towers and what the columns mean."""
    head, rows = table_rows(doc)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    lines += ["", _blind_line(doc), ""]
    for tw in doc["towers"]:
        lines.append(
            f"- **{tw['name']}**: tower `{tw['tower']}`; finetune run `{tw['finetune']}` ({_training(tw)})"
        )
    lines += [f"- note: {n}" for n in doc["notes"]]
    return "\n".join(lines) + "\n"


TEMPLATE = """\
<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title><style>{{ css|safe }}</style></head><body>
<h1>{{ title }}</h1>
<p class="muted">generated {{ now }} by <code>llm2clip-vlm llava-compare</code> from each tower's llava-finetune metrics.json.</p>
<h2>Held-out accuracy by question type (%)</h2>
<table><tr>{% for h in head %}<th class="{{ 'l' if loop.index0 == 0 else '' }}">{{ h }}</th>{% endfor %}</tr>
{% for r in rows %}<tr>{% for c in r %}<td class="{{ 'l' if loop.index0 == 0 else '' }}">{{ c }}</td>{% endfor %}</tr>
{% endfor %}</table>
<p class="muted">{{ blind }}</p>
<h2>Towers</h2><ul>
{% for tw in towers %}<li><b>{{ tw.name }}</b>: tower <code>{{ tw.tower }}</code>, finetune run <code>{{ tw.finetune }}</code> ({{ tw.training }})</li>
{% endfor %}</ul>
{% for n in notes %}<p class="bad">{{ n }}</p>{% endfor %}
</body></html>
"""
_PAGE = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined).from_string(TEMPLATE)


def to_html(
    doc: dict[str, Any], title: str = "LLaVA on two towers: held-out answers, sighted and blind"
) -> str:
    """``report.html``: the side-by-side table as one self-contained page."""
    head, rows = table_rows(doc)
    return _PAGE.render(
        title=title, css=CSS, head=head, rows=rows, blind=_blind_line(doc), towers=[{**tw, "training": _training(tw)} for tw in doc["towers"]],
        notes=doc["notes"], now=dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
    )  # fmt: skip


def write_comparison(runs: Sequence[TowerRun], out: Path) -> dict[str, Any]:
    """Write ``comparison.json``, ``comparison.md`` and ``report.html`` into ``out``; returns the doc."""
    doc = build_comparison(runs)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (
        ("comparison.json", json.dumps(doc, indent=2) + "\n"),
        ("comparison.md", to_markdown(doc)),
        ("report.html", to_html(doc)),
    ):
        tmp = out / f"{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out / name)
    return doc
