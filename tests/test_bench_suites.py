"""The stage1, embed, stage2 and llava bench suites on small presets, and the FLOPs arithmetic."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from llm2clip_vlm.bench import embed, llava, run_suite, stage1, stage2
from llm2clip_vlm.bench.common import LLMShape
from llm2clip_vlm.bench.flops import batches_flops, bf16_peak_flops, encoder_flops, peak_share
from llm2clip_vlm.bench.harness import BenchReport, Timing, render
from llm2clip_vlm.cli import app

SMALL_LLM = LLMShape(32, 64, 1, 4, 2, 0)


def test_encoder_flops_and_peak_share() -> None:
    # 2 * P * T + 4 * L * d * T^2
    assert encoder_flops(1000, 2, 8, 10) == 2 * 1000 * 10 + 4 * 2 * 8 * 100
    assert batches_flops(1000, 2, 8, [[10, 10], [5]]) == 2 * encoder_flops(1000, 2, 8, 10) + encoder_flops(
        1000, 2, 8, 5
    )
    assert peak_share(494.5e12, 1.0, 989e12) == pytest.approx(0.5)
    assert peak_share(1e12, 2.0, 312e12) == pytest.approx(1e12 / 2 / 312e12)
    assert peak_share(1e12, 1.0, None) is None


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA L4", 121e12),
        ("Tesla T4", None),
    ],
)
def test_bf16_peak_by_device_name(name: str, peak: float | None) -> None:
    assert bf16_peak_flops(name) == peak


def test_variants_go_to_the_top_level_of_the_json() -> None:
    report = BenchReport("x", "p", "cpu", {}, [Timing("a", [1.0])], variants={"a": {"samples_per_s": 1.0}})
    assert json.loads(render(report, json_out=True))["a"] == {"samples_per_s": 1.0}
    with pytest.raises(ValueError, match="clash"):
        BenchReport("x", "p", "cpu", {}, [], variants={"suite": {}}).to_dict()


def test_embed_suite(monkeypatch: pytest.MonkeyPatch) -> None:
    preset = embed.EmbedPreset(SMALL_LLM, 16, 8, "fp32", "fp32", 1, 128, "cpu", 0, 1, cpu_threads=1)
    monkeypatch.setitem(embed.PRESETS, "test", preset)
    d = run_suite("embed", "test").to_dict()
    for name in ("bucketed", "unbucketed"):
        v = d[name]
        assert v["captions_per_s"] > 0 and v["tokens_per_s"] > 0
        assert v["computed_tokens"] >= v["real_tokens"] > 0
        assert v["padding_share"] == pytest.approx(1 - v["real_tokens"] / v["computed_tokens"], abs=1e-5)
        assert v["peak_share"] is None  # no bf16 peak on a CPU
    assert d["bucketed"]["padding_share"] < d["unbucketed"]["padding_share"]
    assert d["results"]["captions"] == 16 * 5
    # Through the CLI: stdout is the JSON object alone (the writer's bars and logs go to stderr).
    res = CliRunner().invoke(app, ["bench", "embed", "--preset", "test", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["bucketed"]["padding_share"] == d["bucketed"]["padding_share"]


def test_stage2_suite_has_the_three_variants(monkeypatch: pytest.MonkeyPatch) -> None:
    preset = stage2.Stage2Preset(
        stage2.ViTShape(32, 8, 32, 1, 2), LLMShape(64, 128, 2, 4, 2, 0), 8, 32, "fp32", False, "cpu", 0, 1
    )
    monkeypatch.setitem(stage2.PRESETS, "test", preset)
    d = json.loads(render(run_suite("stage2", "test"), json_out=True))
    for name in ("offline", "online", "lora"):
        assert d[name]["samples_per_s"] > 0
        assert "peak_mem_mb" in d[name]
    r = d["results"]
    assert r["image_tokens"] == 17 and r["llm_to_vit_param_ratio"] > 1
    assert r["offline_vs_lora"] > 0 and isinstance(r["meets_targets"], bool)
    assert r["lora_trainable_params"] > 0 and d["suite"] == "stage2"


def test_stage1_suite(monkeypatch: pytest.MonkeyPatch) -> None:
    preset = stage1.Stage1Preset(SMALL_LLM, 4, 64, 0, "fp32", "fp32", False, "cpu", 0, 1)
    monkeypatch.setitem(stage1.PRESETS, "test", preset)
    d = run_suite("stage1", "test").to_dict()
    names = {t["name"] for t in d["timings"]}
    assert "lora" in names and ("qlora" in names or "qlora_skipped" in d["results"])
    for name in names:
        assert d[name]["samples_per_s"] > 0 and d[name]["tokens_per_s"] > 0
    r = d["results"]
    assert r["sequences_per_step"] == 12
    assert r["computed_tokens_per_step"] >= r["real_tokens_per_step"] > 0


def test_llava_suite(monkeypatch: pytest.MonkeyPatch) -> None:
    small = llava.LlavaPreset(
        llava.TowerShape(32, 8, 32, 1, 2, 64), LLMShape(32, 64, 1, 4, 2, 0), 32, 2, "fp32", False, "cpu", 0, 1
    )
    monkeypatch.setitem(llava.PRESETS, "test", small)
    d = run_suite("llava", "test").to_dict()
    for name in llava.VARIANTS:
        assert d[name]["samples_per_s"] > 0
    r = d["results"]
    assert r["image_tokens"] == 16
    # Projector pretraining trains the projector only; the finetunes train more.
    assert r["pretrain_trainable_params"] == r["projector_params"]
    assert r["finetune-full_trainable_params"] == r["projector_params"] + r["llm_params"]
    assert r["finetune-lora_trainable_params"] > r["projector_params"]


def _spy(monkeypatch: pytest.MonkeyPatch, cls: type, method: str) -> list[type]:
    """Count calls of ``cls.method`` (the trainer's own step), still running it."""
    calls: list[type] = []
    real = getattr(cls, method)

    def spy(self, *a, **k):  # type: ignore[no-untyped-def]
        calls.append(type(self))
        return real(self, *a, **k)

    monkeypatch.setattr(cls, method, spy)
    return calls


def test_stage2_and_llava_benches_time_the_trainers_own_step(monkeypatch: pytest.MonkeyPatch) -> None:
    from llm2clip_vlm.llava import stage as llava_stage
    from llm2clip_vlm.llava.step import LlavaStep
    from llm2clip_vlm.vision import stage as vision_stage
    from llm2clip_vlm.vision.step import Stage2Step

    # The classes the bench calls are the ones the trainers build their Stage from.
    assert vision_stage.Stage2Step is Stage2Step and llava_stage.LlavaStep is LlavaStep
    s2 = _spy(monkeypatch, Stage2Step, "forward_backward")
    preset = stage2.Stage2Preset(
        stage2.ViTShape(32, 8, 32, 1, 2), LLMShape(64, 128, 2, 4, 2, 0), 8, 32, "fp32", False, "cpu", 0, 1
    )
    monkeypatch.setitem(stage2.PRESETS, "test", preset)
    run_suite("stage2", "test")
    assert len(s2) >= len(stage2.VARIANTS)  # every variant's step went through Stage2Step

    ll = _spy(monkeypatch, LlavaStep, "__call__")
    small = llava.LlavaPreset(
        llava.TowerShape(32, 8, 32, 1, 2, 64), LLMShape(32, 64, 1, 4, 2, 0), 32, 2, "fp32", False, "cpu", 0, 1
    )
    monkeypatch.setitem(llava.PRESETS, "test", small)
    run_suite("llava", "test")
    assert len(ll) >= len(llava.VARIANTS)


def test_stage1_bench_times_the_trainers_own_step(monkeypatch: pytest.MonkeyPatch) -> None:
    from llm2clip_vlm.text import train as text_train
    from llm2clip_vlm.text.step import SimCSEStep

    assert text_train.SimCSEStep is SimCSEStep  # the class the trainer builds its Stage from
    calls = _spy(monkeypatch, SimCSEStep, "__call__")
    preset = stage1.Stage1Preset(SMALL_LLM, 4, 64, 0, "fp32", "fp32", False, "cpu", 0, 1, variants=("lora",))
    monkeypatch.setitem(stage1.PRESETS, "test", preset)
    run_suite("stage1", "test")
    assert len(calls) >= 1
