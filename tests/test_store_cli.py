"""``llm2clip-vlm embed``: one store per split, the encoder's resolution, and its errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from store_driver import make_encoder_dir, make_records
from typer.testing import CliRunner

from llm2clip_vlm.cli import app
from llm2clip_vlm.commands import run_embed
from llm2clip_vlm.recipe import RunConfig
from llm2clip_vlm.store.config import EmbedConfig
from llm2clip_vlm.store.run import MissingEncoderError, resolve_encoder_dir
from llm2clip_vlm.store.store import EmbeddingStore
from llm2clip_vlm.text.encoder import CaptionEncoder


@pytest.fixture(scope="module")
def enc_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_encoder_dir(tmp_path_factory.mktemp("cli-enc"))


def test_run_embed_writes_one_store_per_split(tmp_path: Path, enc_dir: Path) -> None:
    cfg = RunConfig()
    cfg.embed = EmbedConfig(encoder=str(enc_dir), dtype="bf16", batch_size=4, shard_size=8, precision="fp32")
    train, short, long = make_records(9, seed=1), make_records(5, seed=2), make_records(4, seed=3)
    out = tmp_path / "stores"
    summary = run_embed(cfg, out, data=(train, {"short": short, "long": long}))
    assert list(summary) == ["train", "heldout-short", "heldout-long"]
    identity = CaptionEncoder.from_pretrained(enc_dir, device="cpu").identity()
    for name, records in [("train", train), ("heldout-short", short), ("heldout-long", long)]:
        store = EmbeddingStore.open(out / name, captions=records, encoder_identity=identity)
        assert summary[name]["rows"] == store.num_rows == sum(len(r.captions) for r in records)
        assert (summary[name]["images"], summary[name]["dtype"]) == (len(records), "bf16")
    # The resolved config is written next to the stores and reloads to the same config.
    assert yaml.safe_load((out / "config.yaml").read_text())["embed"]["encoder"] == str(enc_dir)


def test_encoder_resolution(tmp_path: Path, enc_dir: Path) -> None:
    cfg = RunConfig()
    with pytest.raises(MissingEncoderError, match="embed.encoder"):
        resolve_encoder_dir(cfg.embed.encoder)
    stage1_run = tmp_path / "stage1"
    shutil.copytree(enc_dir, stage1_run / "encoder")
    assert resolve_encoder_dir(cfg.embed.encoder, stage1_output=stage1_run) == stage1_run / "encoder"
    cfg.embed.encoder = str(stage1_run)  # a stage-1 run directory is accepted too
    assert resolve_encoder_dir(cfg.embed.encoder) == stage1_run / "encoder"
    cfg.embed.encoder = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a stage-1 encoder directory"):
        resolve_encoder_dir(cfg.embed.encoder)


def test_cli_embed_without_encoder_says_so(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["embed", "--output", str(tmp_path / "s")])
    assert result.exit_code == 2
    assert "no stage-1 encoder" in result.output and "embed.encoder" in result.output
    assert not (tmp_path / "s").exists()
