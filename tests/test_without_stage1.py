"""``build-tower --without-stage1``: the paper's ablation of stage 1. The stage-1 encoder is the base
LLM as pretrained (causal attention, mean pooling, untrained), and embed / stage 2 / export run on
its caption embeddings unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_build_tower import TINY
from transformers import AutoModel, AutoTokenizer
from typer.testing import CliRunner

from llm2clip_vlm.cli import app
from llm2clip_vlm.data.records import Caption, ImageCaptions
from llm2clip_vlm.text.config import Stage1Config
from llm2clip_vlm.text.cra import caption_pairs, caption_retrieval_accuracy
from llm2clip_vlm.text.encoder import CaptionEncoder
from llm2clip_vlm.text.modeling import ModelRef, load_bidirectional, load_tokenizer
from llm2clip_vlm.text.raw import write_raw_encoder
from llm2clip_vlm.text.tiny import save_tiny_llm

CAPTIONS = [
    ("a red circle at the top", "a picture of a red circle in the top"),
    ("a blue square on the left", "a picture of a blue square at the left"),
    ("two green crosses", "a picture of two green crosses"),
]


def _records() -> list[ImageCaptions]:
    return [
        ImageCaptions(f"k{i}", f"/img/{i}.png", [Caption(a, "short"), Caption(b, "short")])
        for i, (a, b) in enumerate(CAPTIONS)
    ]


def test_the_raw_encoder_is_the_causal_base_llm_mean_pooled(tmp_path: Path) -> None:
    llm = save_tiny_llm(tmp_path / "llm", seed=4)
    s = Stage1Config(model=str(llm), max_length=32, pad_to_multiple_of=8, eval_batch_size=4)
    metrics = write_raw_encoder(s, tmp_path / "stage1", _records())
    enc = CaptionEncoder.from_pretrained(tmp_path / "stage1" / "encoder", device="cpu")
    assert enc.attention == "causal" and metrics["train"]["steps"] == 0
    assert "causal" in metrics["details"]["without_stage1"]
    texts = [c for pair in CAPTIONS for c in pair]
    got = enc.encode(texts, batch_size=8)
    # The same numbers as transformers' own causal model, mean-pooled over each caption's own
    # tokens (the special tokens the tokenizer adds are fed, not pooled), one caption at a time.
    tok, base = AutoTokenizer.from_pretrained(llm), AutoModel.from_pretrained(llm).eval()
    want = []
    with torch.no_grad():
        for t in texts:
            batch = tok(t, return_tensors="pt", return_special_tokens_mask=True)
            keep = batch.pop("special_tokens_mask")[0] == 0
            want.append(base(**batch).last_hidden_state[0][keep].mean(0))
    want = torch.stack(want)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    # Not the bidirectional model of the same weights (what stage 1 starts from).
    ref = ModelRef(str(llm))
    bi = CaptionEncoder(load_bidirectional(ref), load_tokenizer(ref), 32, pad_to_multiple_of=8)
    assert not torch.allclose(bi.encode(texts), got, atol=1e-3)
    # Another identity than a bidirectional encoder of the same weights: a store made with one is
    # never taken for the other's.
    bi.save_pretrained(tmp_path / "bi")
    assert CaptionEncoder.from_pretrained(tmp_path / "bi", device="cpu").identity() != enc.identity()
    # Its CRA is measured on the same pairs as stage 1's.
    assert metrics["eval"]["after"] == round(caption_retrieval_accuracy(enc, caption_pairs(_records()), 4), 2)
    assert json.loads((tmp_path / "stage1" / "metrics.json").read_text()) == metrics


def test_a_bad_attention_in_the_encoder_file_is_named(tmp_path: Path) -> None:
    llm = save_tiny_llm(tmp_path / "llm", seed=4)
    write_raw_encoder(
        Stage1Config(model=str(llm), max_length=16, eval_batch_size=4), tmp_path / "s1", _records()
    )
    meta_file = tmp_path / "s1" / "encoder" / "llm2clip_encoder.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps(dict(meta, attention="sideways")))
    with pytest.raises(ValueError, match="attention must be one of bidirectional, causal, got 'sideways'"):
        CaptionEncoder.from_pretrained(tmp_path / "s1" / "encoder", device="cpu")


def _build(tmp_path: Path, llm: Path, *flags: str) -> str:
    args = ["build-tower", "-o", str(tmp_path / "run"), "--set", f"stage1.model={llm}", *flags]
    for s in TINY:
        args += ["--set", s]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


@pytest.mark.slow
def test_build_tower_without_stage1_end_to_end_then_skip_then_with_stage1(tmp_path: Path) -> None:
    llm = save_tiny_llm(tmp_path / "llm")
    out = _build(tmp_path, llm, "--without-stage1")
    run = tmp_path / "run"
    s1 = json.loads((run / "metrics.json").read_text())["stage1"]
    assert (
        s1["train"]["steps"] == 0
        and s1["eval"]["captions"] == 16
        and "causal" in s1["details"]["without_stage1"]
    )
    assert "stage 1: not trained (base LLM as pretrained" in out
    assert not (run / "stage1" / "checkpoints").exists()  # nothing trained
    store = json.loads((run / "store" / "train" / "manifest.json").read_text())
    assert store["encoder_identity"] == s1["details"]["encoder_identity"]  # stage 2 aligned to the raw LLM
    assert (run / "tower" / "model.safetensors").is_file()
    # Again with the flag: every stage is skipped.
    assert _build(tmp_path, llm, "--without-stage1").count("skipped") == 4
    # Without it, the raw encoder is not taken for a stage-1 one: stage 1 (and all after it) run.
    out = _build(tmp_path, llm)
    assert "stage1: its config or inputs changed" in out
    assert json.loads((run / "metrics.json").read_text())["stage1"]["train"]["steps"] == 2
