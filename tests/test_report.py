"""``llm2clip-vlm report``: one self-contained HTML page from run directories, checked in Chromium."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image
from report_runs import write_all
from typer.testing import CliRunner

from llm2clip_vlm.cli import app
from llm2clip_vlm.reports import NotARunError, load_runs, write_report


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_all(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def page(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report.html"
    r = CliRunner().invoke(
        app, ["report", str(runs["build"]), str(runs["other"]), str(runs["llava"]), "-o", str(out)]
    )
    assert r.exit_code == 0, r.output
    assert f"report: {out} (4 runs)" in r.output
    return out


def _pngs(html: str) -> list[Image.Image]:
    return [
        Image.open(io.BytesIO(base64.b64decode(b)))
        for b in re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    ]


def test_a_build_tower_dir_gives_its_stages_and_runs_are_classified(runs: dict[str, Path]) -> None:
    found = load_runs([runs["build"], runs["other"], runs["llava"]])
    assert [(r.label, r.kind) for r in found] == [
        ("build/stage1", "stage1"), ("build/stage2", "stage2"), ("stage2-no-stage1", "stage2"),
        ("llava-finetune", "llava"),
    ]  # fmt: skip
    s2 = found[1]
    assert s2.series("loss")[0] == list(range(1, 31))
    before, after = s2.before_after()
    assert (before["step"], before["retrieval/held/i2t_r1"]) == (0, 8.3)
    assert (after["step"], after["retrieval/held/i2t_r1"]) == (30, 30.0)


def test_a_run_without_evaluations_is_classified_by_its_stage(tmp_path: Path) -> None:
    from llm2clip_vlm.tracking.metrics_log import MetricsLog

    log = MetricsLog(tmp_path / "pre", stage="llava-pretrain")
    log.write(1, {"loss": 2.0})
    log.close()
    (run,) = load_runs([tmp_path / "pre"])
    assert run.kind == "llava" and run.series("loss") == ([1], [2.0])


def test_page_has_the_curves_tables_and_galleries(page: Path) -> None:
    html = page.read_text()
    # Self-contained: nothing fetched from anywhere.
    assert not re.search(r'(src|href)="(?!data:)', html) and "<script" not in html and "<link" not in html
    # Training curves (one figure per kind of run: stage 1, stage 2 with both runs, LLaVA) + 2 bar charts.
    plots = _pngs(html)
    assert len(plots) == 5 and all(p.size[0] > 600 for p in plots[:3])
    assert html.count('alt="stage2 training curves"') == 1
    # CRA before/after, and both stage-2 runs' retrieval tables (before and after rows).
    assert re.search(r"<td[^>]*>build/stage1</td><td[^>]*>2\.5</td><td[^>]*>36\.5</td>", html)
    assert html.count(">I2T R@1</th>") == 2
    assert re.search(
        r"<td[^>]*>held</td><td[^>]*>after</td><td[^>]*>12</td><td[^>]*>24</td><td[^>]*>30\.0</td>", html
    )
    # Gallery: 6 held-out captions x top-5 images per stage-2 run, the right one framed when found.
    assert html.count('<div class="q"><div class="cap">') == 12
    assert html.count('class="th ok"') >= 6 and html.count("&#10003;") == html.count('class="th ok"')
    assert html.count('<li class="ok">') >= 6
    # LLaVA: accuracy by question type next to the blind baseline (gap) and the majority answer,
    # generated answers next to their images.
    for qtype, before, after, blind, gap, majority in (
        ("choice", "25.0", "60.0", "50.0", "10.0", "40.0"),
        ("color", "20.0", "80.0", "30.0", "50.0", "20.0"),
        ("count", "10.0", "45.0", "40.0", "5.0", "30.0"),
    ):
        cells = "".join(rf"</td><td[^>]*>{v}" for v in (before, after, blind, gap, majority))
        assert re.search(rf"<td[^>]*>{qtype}{cells}</td><td[^>]*>10</td>", html), qtype
    assert "after, blind (%)" in html and "the image of another question" in html
    assert "<b>blind</b>: blue" in html
    assert html.count('<div class="ex"><img src="data:image/jpeg;base64,') == 3
    assert '<b>generated</b>: 3 <span class="bad">wrong</span>' in html


def test_not_a_run_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotARunError, match="empty: no metrics.jsonl"):
        load_runs([tmp_path / "empty"])
    r = CliRunner().invoke(app, ["report", str(tmp_path / "empty"), "-o", str(tmp_path / "r.html")])
    assert r.exit_code == 2 and "report:" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "r.html").exists()


def test_output_folder_gets_report_html(runs: dict[str, Path], tmp_path: Path) -> None:
    out = write_report(load_runs([runs["llava"]]), tmp_path / "out")
    assert out == tmp_path / "out" / "report.html" and out.is_file()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
# Reads back, after load, how many images failed to decode (the report itself has no script).
CHECK = (
    "<script>window.addEventListener('load',()=>{const bad=[...document.images].filter(i=>!i.complete||"
    "i.naturalWidth===0).length;document.body.setAttribute('data-images',document.images.length);"
    "document.body.setAttribute('data-broken',bad);document.body.setAttribute('data-height',"
    "document.body.scrollHeight);});</script>"
)


def _chromium(*args: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--allow-file-access-from-files",
    ]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)  # type: ignore[list-item]


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (apt-get install chromium)")
def test_page_renders_in_headless_chromium(page: Path, tmp_path: Path) -> None:
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", CHECK + "</body>"))
    dom = _chromium("--virtual-time-budget=10000", "--dump-dom", probe.as_uri()).stdout
    attrs = dict(re.findall(r'data-(images|broken|height)="(\d+)"', dom))
    assert int(attrs["images"]) > 60 and attrs["broken"] == "0" and int(attrs["height"]) > 3000, attrs
    shot = tmp_path / "report.png"
    _chromium("--window-size=1200,1600", f"--screenshot={shot}", page.as_uri())
    img = Image.open(shot).convert("L")
    assert img.size == (1200, 1600)
    # Rendered, not blank: plenty of non-white pixels (text, plot lines, thumbnails).
    dark = sum(1 for v in img.getdata() if v < 200)
    assert dark > 0.02 * 1200 * 1600
