"""Lay out the report: one HTML file, no external resources (figures and thumbnails inlined).

Rendered with Jinja2 and autoescape: every string read from a run's files is escaped wherever it
lands (text or attribute), and thumbnails are read only from inside each run's ``gallery/``.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2

from llm2clip_vlm.reports import plots
from llm2clip_vlm.reports.runs import Run
from llm2clip_vlm.tracking.gallery import GALLERY_DIR

R_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1180px;color:#1d2430;padding:0 16px}
h1{font-size:24px;margin-bottom:4px} h2{font-size:19px;border-bottom:1px solid #dde2ea;padding-bottom:4px;margin-top:32px}
h3{font-size:15px;margin:18px 0 6px} .muted{color:#6b7585;font-size:13px}
table{border-collapse:collapse;margin:6px 0 12px;font-size:13px} th,td{border:1px solid #dde2ea;padding:3px 8px;text-align:right}
th{background:#f3f5f9} td.l,th.l{text-align:left} img.plot{max-width:100%;display:block;margin:6px 0}
.q{display:flex;align-items:center;gap:10px;margin:6px 0;flex-wrap:wrap} .cap{width:300px;font-size:13px}
.th{position:relative;display:inline-block} .th img{width:72px;height:72px;object-fit:cover;border:3px solid #e3e6ec;border-radius:4px}
.th.ok img{border-color:#19a463} .th .tag{position:absolute;top:2px;left:4px;font-size:11px;background:#fffd;border-radius:3px;padding:0 3px}
.th.ok .tag{background:#19a463;color:#fff} ul.caps{margin:0;padding-left:18px;font-size:13px} li.ok{color:#12804c;font-weight:600}
.ex{display:flex;gap:12px;align-items:flex-start;margin:8px 0;font-size:13px} .ex img{width:96px;border-radius:4px}
.grid{display:grid;grid-template-columns:repeat(3,1fr);gap:4px 16px} img.bars{max-width:520px}
.good{color:#12804c;font-weight:600} .bad{color:#c0392b;font-weight:600}
"""


# The page: one Jinja2 template with autoescape on, so every string from a run's files (captions,
# questions, answers, labels) is escaped in text and in attributes alike; only the base64 data
# URIs built here go into src attributes (they are [A-Za-z0-9+/=] and need no escaping).
TEMPLATE = """\
{%- macro table(head, rows, left=1) -%}
<table><tr>{% for h in head %}<th class="{{ 'l' if loop.index0 < left else '' }}">{{ h }}</th>{% endfor %}</tr>
{%- for r in rows %}<tr>{% for c in r %}<td class="{{ 'l' if loop.index0 < left else '' }}">{{ c }}</td>{% endfor %}</tr>{% endfor %}</table>
{%- endmacro -%}
{%- macro img(src, alt, cls="plot") -%}
{% if src %}<img class="{{ cls }}" alt="{{ alt }}" src="{{ src }}">{% endif %}
{%- endmacro -%}
<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title><style>{{ css|safe }}</style></head><body>
<h1>{{ title }}</h1>
<p class="muted">{{ runs|length }} run(s); generated {{ now }} by <code>llm2clip-vlm report</code> from each run's metrics.jsonl.</p>
<h2>Runs</h2>{{ table(overview.head, overview.rows, 2) }}
{% if curves %}<h2>Training curves</h2>
{% for src, alt in curves %}{{ img(src, alt) }}
{% endfor %}{% endif %}
{% if cra %}<h2>Stage 1: caption retrieval accuracy (CRA)</h2><p class="muted">Top-1: each held-out caption retrieves the other caption of its image.</p>{{ table(cra.head, cra.rows) }}{{ img(cra.bars, "CRA before and after", "plot bars") }}
{% endif %}
{% if retrieval %}<h2>Stage 2: zero-shot retrieval on held-out sets (%)</h2>
{% for r in retrieval %}<h3>{{ r.label }}</h3>{{ table(r.head, r.rows, 2) }}
{% for g in r.galleries %}<h3>Retrieval gallery: {{ g.name }} (after training)</h3>
<p class="muted">Held-out caption &rarr; top-5 images; the green frame is its own image.</p>
{% for q in g.t2i %}<div class="q"><div class="cap">&ldquo;{{ q.caption }}&rdquo;</div>
{%- for t in q.thumbs %}<span class="th{{ ' ok' if t.ok else '' }}"><img src="{{ t.src }}" alt="image {{ t.image }}"><span class="tag">{{ t.n }}{% if t.ok %} &#10003;{% endif %}</span></span>{% endfor %}
{%- if not q.found %}<span class="muted">its image:</span><span class="th"><img src="{{ q.answer_src }}" alt="answer"></span>{% endif %}</div>
{% endfor %}<p class="muted">Image &rarr; its top captions (green: a caption of this image).</p>
<div class="grid">
{% for q in g.i2t %}<div class="q"><span class="th"><img src="{{ q.src }}" alt="image {{ q.image }}"></span><ul class="caps">{% for c in q.caps %}<li class="{{ 'ok' if c.ok else '' }}">{{ c.caption }}</li>{% endfor %}</ul></div>
{% endfor %}</div>
{% endfor %}{% endfor %}{% endif %}
{% if llava %}<h2>LLaVA: held-out accuracy by question type, and generated answers</h2>
{% for r in llava %}<h3>{{ r.label }}</h3>
{% if r.rows %}{{ table(["question type", "before (%)", "after (%)", "after, blind (%)", "gap (points)", "majority answer (%)", "questions"], r.rows) }}{% if r.blind %}<p class="muted">Blind: the same questions asked with {{ r.blind }} instead of their own; gap = after &minus; blind (what the image adds). Majority answer: always answering the most frequent answer of the type in the held-out set.</p>{% endif %}{{ img(r.bars, "held-out accuracy by question type", "plot bars") }}
{% else %}<p class="muted">No held-out questions were evaluated in this run.</p>
{% endif %}
{% for ex in r.examples %}<div class="ex">{% if ex.src %}<img src="{{ ex.src }}" alt="question image">{% endif %}<div><b>Q</b> ({{ ex.qtype }}): {{ ex.question }}<br><b>expected</b>: {{ ex.answer }}<br><b>generated</b>: {{ ex.prediction }} {% if ex.ok %}<span class="good">correct</span>{% else %}<span class="bad">wrong</span>{% endif %}{% if ex.blind is not none %}<br><b>blind</b>: {{ ex.blind }}{% endif %}</div></div>
{% endfor %}{% endfor %}{% endif %}
</body></html>
"""

_ENV = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
PAGE = _ENV.from_string(TEMPLATE)


def _png(png: bytes | None) -> str:
    return f"data:image/png;base64,{base64.b64encode(png).decode()}" if png is not None else ""


def _thumb(run: Run, rel: Any) -> str:
    """A gallery thumbnail as a data URI; "" unless ``rel`` names a file inside ``RUN/gallery``.

    The gallery JSON is data, not trusted: ``"../../secret"``, an absolute path or a symlink out
    of the gallery folder is never read.
    """
    if not isinstance(rel, str) or not rel:
        return ""
    gallery = (run.path / GALLERY_DIR).resolve()
    path = (gallery / rel).resolve()
    if not path.is_relative_to(gallery) or not path.is_file():
        return ""
    return f"data:image/jpeg;base64,{base64.b64encode(path.read_bytes()).decode()}"


def _fmt(v: Any, nd: int = 1) -> str:
    return f"{v:.{nd}f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def _text(v: Any) -> str:
    """A value from a run's files as text (the template escapes it)."""
    return "-" if v is None else str(v)


# --------------------------------------------------------------------------------------------
def _overview(runs: Sequence[Run]) -> dict[str, Any]:
    rows = []
    for r in runs:
        last = r.train[-1] if r.train else {}
        # A finished run's metrics.json says how many steps were planned and how long they took.
        steps = _text(last.get("step", "-"))
        if r.summary.get("planned_steps") is not None:
            steps = f"{r.summary.get('steps', steps)}/{r.summary['planned_steps']}"
        rows.append([
            r.label, r.kind, steps, _fmt(last.get("loss"), 4), _fmt(last.get("samples_per_s"), 1),
            _fmt(last.get("tokens_per_s"), 0), _fmt(last.get("peak_gpu_gib", last.get("peak_rss_gib")), 2),
            _fmt(r.summary.get("seconds"), 0), str(r.path),
        ])  # fmt: skip
    head = ["run", "kind", "steps", "last loss", "samples/s", "tokens/s", "peak mem GiB", "train s"]
    head.append("directory")
    return {"head": head, "rows": rows}


def _curves(runs: Sequence[Run]) -> list[tuple[str, str]]:
    return [
        (_png(plots.training_curves(runs, kind)), f"{kind} training curves") for kind in plots.kinds(runs)
    ]


def _cra(runs: Sequence[Run]) -> dict[str, Any] | None:
    rows, labels, before, after = [], [], [], []
    for r in runs:
        if r.kind != "stage1":
            continue
        b, a = r.before_after()
        rows.append([r.label, _fmt(b.get("cra")), _fmt(a.get("cra")), _text(a.get("step", "-"))])
        labels.append(r.label)
        before.append(_number(b.get("cra")))
        after.append(_number(a.get("cra")))
    if not rows:
        return None
    return {
        "head": ["run", "CRA before (%)", "CRA after (%)", "steps"],
        "rows": rows,
        "bars": _png(plots.before_after_bars(labels, before, after, "CRA (%)")),
    }


def _number(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0.0


def _retrieval_sets(row: dict[str, Any]) -> dict[str, dict[str, Any]]:
    sets: dict[str, dict[str, Any]] = {}
    for key, value in row.items():
        if key.startswith("retrieval/"):
            *name, metric = key.split("/")[1:]
            sets.setdefault("/".join(name), {})[metric] = value
    return sets


def _retrieval(runs: Sequence[Run]) -> list[dict[str, Any]]:
    out = []
    head = [
        "set",
        "when",
        "images",
        "captions",
        "I2T R@1",
        "I2T R@5",
        "I2T R@10",
        "T2I R@1",
        "T2I R@5",
        "T2I R@10",
    ]
    for r in runs:
        if r.kind != "stage2":
            continue
        b, a = r.before_after()
        before, after = _retrieval_sets(b), _retrieval_sets(a)
        rows = []
        for name in sorted(set(before) | set(after)):
            for when, m in (("before", before.get(name)), ("after", after.get(name))):
                if m:
                    rows.append([
                        name, when, _text(m.get("n_images", "-")), _text(m.get("n_captions", "-")),
                        *(_fmt(m.get(k)) for k in R_KEYS),
                    ])  # fmt: skip
        out.append({"label": r.label, "head": head, "rows": rows, "galleries": _galleries(r)})
    return out


def _galleries(run: Run) -> list[dict[str, Any]]:
    out = []
    for name, g in run.retrieval_gallery.items():
        images = g["images"]
        t2i = []
        for q in g["text_to_image"]:
            thumbs = [
                {"src": _thumb(run, images.get(str(i))), "image": i, "n": n + 1, "ok": i == q["answer"]}
                for n, (i, _) in enumerate(q["top"])
            ]
            t2i.append({
                "caption": _text(q["caption"]), "thumbs": thumbs, "found": any(t["ok"] for t in thumbs),
                "answer_src": _thumb(run, images.get(str(q["answer"]))),
            })  # fmt: skip
        i2t = [
            {
                "src": _thumb(run, images.get(str(q["image"]))),
                "image": q["image"],
                "caps": [{"caption": _text(c["caption"]), "ok": bool(c["correct"])} for c in q["top"]],
            }
            for q in g["image_to_text"]
        ]
        out.append({"name": name, "t2i": t2i, "i2t": i2t})
    return out


def _heldout_row(name: str, key: str, b: dict[str, Any], a: dict[str, Any]) -> list[Any]:
    """One row of the held-out table: before, after, after blind (the same questions with the image
    withheld: another question's image, or a blank one), the gap after - blind, and the majority
    answer's accuracy (always the type's most frequent held-out answer)."""
    return [
        name,
        _fmt(b.get(f"{key}accuracy")),
        _fmt(a.get(f"{key}accuracy")),
        _fmt(a.get(f"{key}blind_accuracy")),
        _fmt(a.get(f"{key}gap")),
        _fmt(a.get(f"{key}majority_accuracy")),
        _text(a.get(f"{key}n", b.get(f"{key}n", "-"))),
    ]


def _llava(runs: Sequence[Run]) -> list[dict[str, Any]]:
    out = []
    for r in runs:
        if r.kind != "llava":
            continue
        b, a = r.before_after()
        types = sorted({k.split("/")[2] for row in (b, a) for k in row if k.startswith("heldout/per_type/")})
        rows, bars = [], ""
        if a or b:
            rows = [_heldout_row("all", "heldout/", b, a)]
            rows += [_heldout_row(t, f"heldout/per_type/{t}/", b, a) for t in types]
            if types:
                bars = _png(plots.before_after_bars(
                    types, [_number(b.get(f"heldout/per_type/{t}/accuracy")) for t in types],
                    [_number(a.get(f"heldout/per_type/{t}/accuracy")) for t in types], "accuracy (%)",
                ))  # fmt: skip
        examples = [
            {
                "src": _thumb(r, ex.get("image")),
                "qtype": _text(ex.get("question_type") or "-"),
                "question": _text(ex.get("question", "")),
                "answer": _text(ex.get("answer")),
                "prediction": _text(ex.get("prediction")),
                "ok": bool(ex.get("correct")),
                "blind": None if ex.get("blind_prediction") is None else _text(ex["blind_prediction"]),
            }
            for ex in r.answers
        ]
        # Blind: the same questions with another question's image (shuffle) or a blank one.
        blind = {"shuffle": "the image of another question", "blank": "a blank image"}.get(
            str(a.get("heldout/blind")), ""
        )
        out.append({"label": r.label, "rows": rows, "bars": bars, "examples": examples, "blind": blind})
    return out


def render(runs: Sequence[Run], title: str = "llm2clip-vlm run report") -> str:
    """The whole page as a string."""
    return PAGE.render(
        title=title,
        css=CSS,
        runs=runs,
        now=dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        overview=_overview(runs),
        curves=_curves(runs),
        cra=_cra(runs),
        retrieval=_retrieval(runs),
        llava=_llava(runs),
    )


def write_report(runs: Sequence[Run], out: str | Path, title: str = "llm2clip-vlm run report") -> Path:
    """Write the page to ``out`` (a ``.html`` file, or a folder that gets ``report.html``)."""
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        out = out / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(render(runs, title), encoding="utf-8")
    tmp.replace(out)
    return out
