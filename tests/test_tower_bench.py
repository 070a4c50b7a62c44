"""The bench harness, the ``bench`` command's dispatch, and the ``tower`` suite on a tiny preset."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from llm2clip_vlm.bench import SUITES, SuiteNotBuilt, run_suite, suite_module
from llm2clip_vlm.bench import tower as tower_suite
from llm2clip_vlm.bench.harness import Timing, measure, paired_ratio, render, reset_peak_rss
from llm2clip_vlm.cli import app
from llm2clip_vlm.tower.synthetic import TowerShape


def test_measure_interleaves_and_counts() -> None:
    calls: list[str] = []
    timings = measure(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
        device=torch.device("cpu"),
        warmup=2,
        repeats=3,
        items_per_call=4,
    )
    # 2 warm-up rounds, then rounds alternate order so neither variant always runs first, then
    # one more call each for the peak memory (on Linux, where the peak RSS can be reset).
    peak_calls = ["a", "b"] if reset_peak_rss() else []
    assert calls == ["a", "b", "a", "b", "a", "b", "b", "a", "a", "b", *peak_calls]
    assert [t.name for t in timings] == ["a", "b"]
    if peak_calls:
        assert all(t.peak_memory_bytes and t.peak_memory_bytes > 0 for t in timings)
    assert all(len(t.times_s) == 3 and t.items_per_call == 4 for t in timings)


def test_paired_ratio_and_summary() -> None:
    a = Timing("a", [1.0, 2.0, 3.0], items_per_call=2)
    b = Timing("b", [1.0, 1.0, 2.0])
    assert paired_ratio(a, b) == pytest.approx(1.5)  # median of 1, 2, 1.5
    s = a.summary()
    assert s["median_ms"] == pytest.approx(2000.0) and s["items_per_s"] == pytest.approx(1.0)
    assert (s["min_ms"], s["max_ms"], s["repeats"]) == (pytest.approx(1000.0), pytest.approx(3000.0), 3)


def test_dispatch_knows_built_and_unbuilt_suites() -> None:
    assert suite_module("tower") == "llm2clip_vlm.bench.tower"
    with pytest.raises(ValueError, match="known: stage1, embed, stage2, tower, llava"):
        suite_module("nope")
    unbuilt = [name for name in SUITES if name != "tower"]
    for name in unbuilt:
        try:
            suite_module(name)
        except SuiteNotBuilt as e:
            assert SUITES[name] in str(e)
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        run_suite("tower", "huge")


@pytest.fixture
def small_preset(monkeypatch: pytest.MonkeyPatch) -> str:
    shape = TowerShape(
        image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64
    )
    preset = tower_suite.TowerPreset("clip", shape, 2, "fp32", "cpu", 1, 5)
    monkeypatch.setitem(tower_suite.PRESETS, "test-small", preset)
    return "test-small"


def test_tower_suite_report(small_preset: str) -> None:
    report = run_suite("tower", small_preset)
    by_name = {t.name: t for t in report.timings}
    assert set(by_name) == {"raw", "tower"}
    assert all(len(t.times_s) == 5 and t.items_per_call == 2 for t in report.timings)
    r = report.results
    assert r["tokens_per_image"] == 16
    assert r["overhead_pct"] == pytest.approx(100 * (paired_ratio(by_name["tower"], by_name["raw"]) - 1))
    assert r["within_target"] == (r["overhead_pct"] <= 2.0)
    assert report.device.startswith("CPU")
    d = json.loads(render(report, json_out=True))
    assert d["suite"] == "tower" and d["preset"] == small_preset and len(d["timings"]) == 2
    assert "overhead_pct" in render(report, json_out=False)


def test_bench_command(small_preset: str) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["bench", "tower", "--preset", small_preset, "--json", "--repeats", "2"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)  # stdout is the JSON object alone (progress and logs go to stderr)
    assert d["settings"]["repeats"] == 2 and d["timings"][0]["repeats"] == 2
    assert runner.invoke(app, ["bench", "nope"]).exit_code == 2
    assert runner.invoke(app, ["bench", "tower", "--preset", "huge"]).exit_code == 2
    unbuilt = [name for name in SUITES if name != "tower"]
    for name in unbuilt:
        try:
            suite_module(name)
        except SuiteNotBuilt:
            assert runner.invoke(app, ["bench", name]).exit_code == 3
