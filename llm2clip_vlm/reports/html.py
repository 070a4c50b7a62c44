"""Lay out the report: one HTML file, no external resources (figures and thumbnails inlined)."""

from __future__ import annotations

import base64
import datetime as dt
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


def _e(x: Any) -> str:
    return html.escape(str(x))


def _img(png: bytes | None, alt: str, cls: str = "plot") -> str:
    if png is None:
        return ""
    return f'<img class="{cls}" alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _thumb(run: Run, rel: str | None) -> str:
    path = run.path / GALLERY_DIR / rel if rel else None
    if path is None or not path.is_file():
        return ""
    return f"data:image/jpeg;base64,{base64.b64encode(path.read_bytes()).decode()}"


def _fmt(v: Any, nd: int = 1) -> str:
    return f"{v:.{nd}f}" if isinstance(v, (int, float)) else "-"


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1) -> str:
    th = "".join(f'<th class="{"l" if i < left else ""}">{_e(h)}</th>' for i, h in enumerate(head))
    body = "".join(
        "<tr>"
        + "".join(f'<td class="{"l" if i < left else ""}">{_e(c)}</td>' for i, c in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f"<table><tr>{th}</tr>{body}</table>"


# --------------------------------------------------------------------------------------------
def _overview(runs: Sequence[Run]) -> str:
    rows = []
    for r in runs:
        last = r.train[-1] if r.train else {}
        rows.append([
            r.label, r.kind, last.get("step", "-"), _fmt(last.get("loss"), 4), _fmt(last.get("samples_per_s"), 1),
            _fmt(last.get("tokens_per_s"), 0), _fmt(last.get("peak_gpu_gib", last.get("peak_rss_gib")), 2), str(r.path),
        ])  # fmt: skip
    head = ["run", "kind", "steps", "last loss", "samples/s", "tokens/s", "peak mem GiB", "directory"]
    return "<h2>Runs</h2>" + _table(head, rows, left=2)


def _curves(runs: Sequence[Run]) -> str:
    parts = ["<h2>Training curves</h2>"]
    for kind in plots.kinds(runs):
        parts.append(_img(plots.training_curves(runs, kind), f"{kind} training curves"))
    return "\n".join(parts) if len(parts) > 1 else ""


def _cra(runs: Sequence[Run]) -> str:
    rows, labels, before, after = [], [], [], []
    for r in runs:
        if r.kind != "stage1":
            continue
        b, a = r.before_after()
        rows.append([r.label, _fmt(b.get("cra")), _fmt(a.get("cra")), a.get("step", "-")])
        labels.append(r.label)
        before.append(float(b.get("cra", 0.0) or 0.0))
        after.append(float(a.get("cra", 0.0) or 0.0))
    if not rows:
        return ""
    return (
        "<h2>Stage 1: caption retrieval accuracy (CRA)</h2>"
        '<p class="muted">Top-1: each held-out caption retrieves the other caption of its image.</p>'
        + _table(["run", "CRA before (%)", "CRA after (%)", "steps"], rows)
        + _img(plots.before_after_bars(labels, before, after, "CRA (%)"), "CRA before and after", "plot bars")
    )


def _retrieval_sets(row: dict[str, Any]) -> dict[str, dict[str, Any]]:
    sets: dict[str, dict[str, Any]] = {}
    for key, value in row.items():
        if key.startswith("retrieval/"):
            *name, metric = key.split("/")[1:]
            sets.setdefault("/".join(name), {})[metric] = value
    return sets


def _retrieval(runs: Sequence[Run]) -> str:
    parts = []
    for r in runs:
        if r.kind != "stage2":
            continue
        b, a = r.before_after()
        before, after = _retrieval_sets(b), _retrieval_sets(a)
        rows = []
        for name in sorted(set(before) | set(after)):
            for when, m in (("before", before.get(name)), ("after", after.get(name))):
                if m:
                    rows.append(
                        [
                            name,
                            when,
                            m.get("n_images", "-"),
                            m.get("n_captions", "-"),
                            *(_fmt(m.get(k)) for k in R_KEYS),
                        ]
                    )
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
        parts.append(f"<h3>{_e(r.label)}</h3>" + _table(head, rows, left=2) + _gallery(r))
    if not parts:
        return ""
    return "<h2>Stage 2: zero-shot retrieval on held-out sets (%)</h2>" + "\n".join(parts)


def _gallery(run: Run) -> str:
    out = []
    for name, g in run.retrieval_gallery.items():
        images = g.get("images", {})
        out.append(f"<h3>Retrieval gallery: {_e(name)} (after training)</h3>")
        out.append(
            '<p class="muted">Held-out caption &rarr; top-5 images; the green frame is its own image.</p>'
        )
        for q in g.get("text_to_image", []):
            thumbs = "".join(
                f'<span class="th{" ok" if i == q["answer"] else ""}"><img src="{_thumb(run, images.get(str(i)))}" '
                f'alt="image {i}"><span class="tag">{n + 1}{" &#10003;" if i == q["answer"] else ""}</span></span>'
                for n, (i, _) in enumerate(q["top"])
            )  # fmt: skip
            found = any(i == q["answer"] for i, _ in q["top"])
            missing = "" if found else (
                f'<span class="muted">its image:</span><span class="th"><img src="{_thumb(run, images.get(str(q["answer"])))}" alt="answer"></span>'
            )  # fmt: skip
            out.append(
                f'<div class="q"><div class="cap">&ldquo;{_e(q["caption"])}&rdquo;</div>{thumbs}{missing}</div>'
            )
        out.append('<p class="muted">Image &rarr; its top captions (green: a caption of this image).</p>')
        out.append('<div class="grid">')
        for q in g.get("image_to_text", []):
            caps = "".join(
                f'<li class="{"ok" if c["correct"] else ""}">{_e(c["caption"])}</li>' for c in q["top"]
            )
            out.append(
                f'<div class="q"><span class="th"><img src="{_thumb(run, images.get(str(q["image"])))}" '
                f'alt="image {q["image"]}"></span><ul class="caps">{caps}</ul></div>'
            )
        out.append("</div>")
    return "\n".join(out)


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
        a.get(f"{key}n", b.get(f"{key}n", "-")),
    ]


def _llava(runs: Sequence[Run]) -> str:
    parts = []
    for r in runs:
        if r.kind != "llava":
            continue
        b, a = r.before_after()
        types = sorted({k.split("/")[2] for row in (b, a) for k in row if k.startswith("heldout/per_type/")})
        section = [f"<h3>{_e(r.label)}</h3>"]
        if a or b:
            rows = [_heldout_row("all", "heldout/", b, a)]
            rows += [_heldout_row(t, f"heldout/per_type/{t}/", b, a) for t in types]
            header = ["question type", "before (%)", "after (%)", "after, blind (%)", "gap (points)",
                      "majority answer (%)", "questions"]  # fmt: skip
            section.append(_table(header, rows))
            blind = a.get("heldout/blind")
            if blind:
                shown = "another question's image" if blind == "shuffle" else "a blank image"
                section.append(
                    f'<p class="muted">Blind: the same questions asked with {shown} instead of their own; '
                    "gap = after &minus; blind (what the image adds). Majority answer: always answering the "
                    "most frequent answer of the type in the held-out set.</p>"
                )
            if types:
                section.append(_img(plots.before_after_bars(
                    types, [float(b.get(f"heldout/per_type/{t}/accuracy") or 0) for t in types],
                    [float(a.get(f"heldout/per_type/{t}/accuracy") or 0) for t in types], "accuracy (%)",
                ), "held-out accuracy by question type", "plot bars"))  # fmt: skip
        else:
            section.append('<p class="muted">No held-out questions were evaluated in this run.</p>')
        for ex in r.answers:
            ok = ex.get("correct")
            mark = '<span class="good">correct</span>' if ok else '<span class="bad">wrong</span>'
            img = f'<img src="{_thumb(r, ex.get("image"))}" alt="question image">' if ex.get("image") else ""
            section.append(
                f'<div class="ex">{img}<div><b>Q</b> ({_e(ex.get("question_type") or "-")}): {_e(ex.get("question", ""))}<br>'
                f'<b>expected</b>: {_e(ex.get("answer"))}<br><b>generated</b>: {_e(ex.get("prediction"))} {mark}'
                + (f'<br><b>blind</b>: {_e(ex["blind_prediction"])}' if ex.get("blind_prediction") is not None else "")
                + "</div></div>"
            )  # fmt: skip
        parts.append("\n".join(section))
    if not parts:
        return ""
    return "<h2>LLaVA: held-out accuracy by question type, and generated answers</h2>" + "\n".join(parts)


def render(runs: Sequence[Run], title: str = "llm2clip-vlm run report") -> str:
    """The whole page as a string."""
    now = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    body = [
        f"<h1>{_e(title)}</h1>",
        f'<p class="muted">{len(runs)} run(s); generated {now} by <code>llm2clip-vlm report</code> from each run\'s metrics.jsonl.</p>',
        _overview(runs), _curves(runs), _cra(runs), _retrieval(runs), _llava(runs),
    ]  # fmt: skip
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>\n"
        + "\n".join(p for p in body if p)
        + "\n</body></html>\n"
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
