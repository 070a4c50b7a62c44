"""Model cards in the hub's format (towers and LLaVA models) and the offline file set of --push-to-hub."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_llava_train import _overrides, parts, pretrained  # noqa: F401  (module fixtures)
from test_stage2 import _run
from typer.testing import CliRunner

from llm2clip_vlm import config_io
from llm2clip_vlm.cli import app
from llm2clip_vlm.commands import run_export as export_tower
from llm2clip_vlm.hub.cards import is_hub_id, llava_card, tower_card
from llm2clip_vlm.hub.push import PushError, files_to_upload, push_to_hub
from llm2clip_vlm.recipe import RunConfig
from llm2clip_vlm.tracking.metrics_log import read_jsonl


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert isinstance(meta, dict)
    return meta


def metric_values(meta: dict) -> dict[str, float]:
    (entry,) = meta["model-index"]
    return {m["name"]: m["value"] for r in entry["results"] for m in r["metrics"]}


class FakeHub:
    """Records what push_to_hub would send; contacts nothing."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id: str, **kw: object) -> None:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kw}))

    def upload_folder(self, **kw: object) -> str:
        self.calls.append(("upload_folder", kw))
        return "https://hub.invalid/commit/1"


def test_hub_ids_are_told_from_local_paths(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    assert is_hub_id("openai/clip-vit-large-patch14-336") and is_hub_id("lmsys/vicuna-7b-v1.5")
    assert (
        not is_hub_id(str(tmp_path / "a"))
        and not is_hub_id("")
        and not is_hub_id("builtin:smollm2-135m-instruct")
    )


def test_exported_tower_card_parses_with_model_index_and_uploads_the_right_files(tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    run = tmp_path / "run"
    extra = ["hub.datasets=[pixparse/cc3m-wds]", "hub.tags=[demo]"]
    metrics = _run(tmp_path / "data", run, ["stage2.batch_size=8", "stage2.loop.max_steps=2", *extra])
    tower = export_tower(run, tmp_path / "export" / "tower")
    text = (tower / "README.md").read_text()
    meta = front_matter(text)
    assert meta["license"] == "apache-2.0" and meta["pipeline_tag"] == "image-feature-extraction"
    assert meta["datasets"] == ["pixparse/cc3m-wds"] and {"llm2clip", "vision-tower", "demo"} <= set(
        meta["tags"]
    )
    assert "base_model" not in meta  # a random demo backbone has no hub base model
    after = metrics["eval"]["after"]["short"]
    assert metric_values(meta) == {
        "I2T R@1": round(after["i2t_r1"], 2), "I2T R@5": round(after["i2t_r5"], 2), "I2T R@10": round(after["i2t_r10"], 2),
        "T2I R@1": round(after["t2i_r1"], 2), "T2I R@5": round(after["t2i_r5"], 2), "T2I R@10": round(after["t2i_r10"], 2),
    }  # fmt: skip
    # The hub's own parser reads the same model-index back.
    card = ModelCard(text)
    assert len(card.data.eval_results) == 6 and card.data.eval_results[0].dataset_name == "short (held-out)"
    assert f"| {after['i2t_r1']:.1f} | {after['i2t_r5']:.1f} |" in text  # the readable table stays

    (tower / ".cache").mkdir()
    (tower / ".cache" / "x").write_text("x")
    (tower / "model.safetensors.tmp").write_text("half")
    expected = [
        "README.md",
        "config.json",
        "llm2clip_provenance.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    assert files_to_upload(tower) == expected
    hub = FakeHub()
    assert push_to_hub(tower, "me/tower", api=hub) == "https://hub.invalid/commit/1"
    (_, create), (_, upload) = hub.calls
    assert create == {"repo_id": "me/tower", "repo_type": "model", "private": False, "exist_ok": True}
    assert upload["allow_patterns"] == expected and upload["folder_path"] == str(tower)


def test_tower_card_names_a_hub_backbone_as_base_model() -> None:
    cfg = config_io.load(RunConfig, None, ["stage2.backbone.name_or_path=openai/clip-vit-large-patch14-336"])
    r = {
        "n_images": 2,
        "n_captions": 2,
        **dict.fromkeys(("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"), 50.0),
    }
    p = {
        "backbone": {"kind": "clip", "init": cfg.stage2.backbone.name_or_path}, "dtype": "fp32",
        "caption_encoder": {"path": "", "identity": "", "dim": 8}, "data": {"train": "x"},
        "stage2": config_io.to_dict(cfg.stage2), "run_dir": "/r", "retrieval": {"coco": r},
        "retrieval_before": {}, "train": {"steps": 1},
    }  # fmt: skip
    meta = front_matter(tower_card(p, cfg.hub, []))
    assert meta["base_model"] == "openai/clip-vit-large-patch14-336"
    assert meta["model-index"][0]["results"][0]["dataset"]["name"] == "coco (held-out)"


def test_push_refuses_a_folder_without_card_or_weights(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_text("x")
    with pytest.raises(PushError, match="no README.md"):
        files_to_upload(tmp_path / "m")
    (tmp_path / "m" / "README.md").write_text("---\n---\n")
    (tmp_path / "m" / "model.safetensors").unlink()
    (tmp_path / "m" / "pytorch_model.bin").write_text("pickle")
    with pytest.raises(PushError, match="no .safetensors"):
        files_to_upload(tmp_path / "m")


def test_llava_finetune_cli_writes_card_metrics_gallery_report(parts, pretrained, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "ft"
    args = ["llava-finetune", "-o", str(out), "--from", str(pretrained)]
    for s in _overrides(
        parts,
        "finetune",
        [
            "llava.finetune.tune=full",
            "tracking.log_every_steps=1",
            # the card's "before" column: the demo recipe turns it off
            "llava.finetune.eval_before=true",
        ],
    ):
        args += ["--set", s]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert (
        f"report: {out / 'report.html'}" in r.output
        and f"TensorBoard logs: {out / 'tensorboard'}" in r.output
    )
    metrics = json.loads((out / "metrics.json").read_text())
    rows = read_jsonl(out / "metrics.jsonl")
    train = [x for x in rows if x["kind"] == "train"]
    assert [x["step"] for x in train] == [1, 2, 3] and all(x["tokens_per_s"] > 0 for x in train)
    assert [x["loss"] for x in train] == pytest.approx(metrics["train"]["losses"])
    evals = [x for x in rows if x["kind"] == "eval"]
    assert [x["step"] for x in evals] == [0, 3]
    assert evals[1]["heldout/accuracy"] == pytest.approx(metrics["eval"]["after"]["accuracy"])
    assert any(k.startswith("heldout/per_type/") for k in evals[1])
    answers = json.loads((out / "gallery" / "answers.json").read_text())
    assert len(answers) == 6 and all((out / "gallery" / a["image"]).is_file() for a in answers if a["image"])
    assert "generated</b>" in (out / "report.html").read_text()

    card = (out / "model" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["pipeline_tag"] == "image-text-to-text" and "llava" in meta["tags"]
    assert "base_model" not in meta  # tiny local LLM and tower: not hub ids
    values = metric_values(meta)
    assert values["held-out accuracy"] == round(metrics["eval"]["after"]["accuracy"], 2)
    assert {f"accuracy ({t})" for t in metrics["eval"]["after"]["per_type"]} <= set(values)
    for needle in ("LlavaForConditionalGeneration.from_pretrained", "apply_chat_template", "--pretrain_mm_mlp_adapter",
                   f"llm2clip-vlm llava-finetune {out / 'config.yaml'} --output {out} --from {pretrained}",
                   f"base LLM: `{parts['llm']}`", "Resolved config",
                   "| question type | before | after | after, blind | majority answer | questions |"):  # fmt: skip
        assert needle in card, needle
    a = metrics["eval"]["after"]
    assert (
        f"| all | {metrics['eval']['before']['accuracy']:.1f} | {a['accuracy']:.1f} | {a['blind_accuracy']:.1f} "
        in card
    )
    files = files_to_upload(out / "model")
    assert {"README.md", "config.json", "model.safetensors", "llava_template.json"} <= set(files)
    assert not [f for f in files if f.endswith(".bin")]


def test_llava_card_says_not_measured_when_the_pass_before_training_was_skipped(tmp_path: Path) -> None:
    # llava.<phase>.eval_before=false (the demo recipe): metrics.json has no "before" section
    cfg = RunConfig()
    after = {"accuracy": 40.0, "blind_accuracy": 20.0, "majority_accuracy": 25.0, "n": 10,
             "per_type": {"colour": {"accuracy": 50.0, "blind_accuracy": 10.0, "majority_accuracy": 15.0, "n": 4}}}  # fmt: skip
    metrics = {"eval": {"after": after}, "train": {"steps": 1}, "details": {"records": 8}}
    card = llava_card(cfg.llava, cfg.hub, "finetune", metrics, tmp_path, None, tmp_path / "train.json", None)
    assert "| all | not measured | 40.0 | 20.0 | 25.0 | 10 |" in card
    assert "| colour | not measured | 50.0 | 10.0 | 15.0 | 4 |" in card
    assert "nan" not in card
