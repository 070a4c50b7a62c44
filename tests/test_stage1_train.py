"""Stage 1 training: CRA, 1 vs 2 processes, resume, QLoRA on the CPU."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_env import free_port

from llm2clip_vlm.data.records import Caption, ImageCaptions
from llm2clip_vlm.recipe import RunConfig
from llm2clip_vlm.text.cra import caption_pairs, cra_from_embeddings
from llm2clip_vlm.text.encoder import CaptionEncoder
from llm2clip_vlm.text.modeling import ModelRef, load_bidirectional
from llm2clip_vlm.text.tiny import save_tiny_llm
from llm2clip_vlm.text.train import train_stage1
from llm2clip_vlm.training.checkpoint import CHECKPOINTS, Checkpointer
from llm2clip_vlm.training.config import LoopConfig

COLOURS = ["red", "blue", "green", "yellow"]
SHAPES = ["circle", "square", "star"]


def scene_records(n: int, offset: int = 0) -> list[ImageCaptions]:
    """Small scenes (count, colour, shape), two short captions and one long one each."""
    out = []
    for i in range(offset, offset + n):
        k, c, s = 1 + i % 5, COLOURS[(i // 5) % 4], SHAPES[(i // 20) % 3]
        out.append(
            ImageCaptions(
                f"img{i}",
                f"/data/{i}.png",
                [
                    Caption(f"{k} {c} {s}s", "short"),
                    Caption(f"a picture of {k} {c} {s}s", "short"),
                    Caption(f"an image showing {k} {c} {s}s on a white background", "long"),
                ],
            )
        )
    return out


LOOP_KEYS = {f.name for f in dataclasses.fields(LoopConfig)}


def tiny_cfg(model: Path, **stage1: object) -> RunConfig:
    """A tiny stage-1 config; keyword arguments that are LoopConfig fields go to ``stage1.loop``."""
    cfg = RunConfig()
    base: dict[str, object] = dict(
        model=str(model), batch_size=8, max_length=48, gradient_checkpointing=False, chunk_size=8,
        cra_captions=20, lr=1e-2,
    )  # fmt: skip
    loop: dict[str, object] = dict(warmup_steps=1, max_steps=4, precision="fp32", save_every_steps=0)
    for k, v in stage1.items():
        (loop if k in LOOP_KEYS else base)[k] = v
    cfg.stage1 = dataclasses.replace(cfg.stage1, **base, loop=dataclasses.replace(cfg.stage1.loop, **loop))  # type: ignore[arg-type]
    cfg.stage1.lora.dropout = 0.0  # dropout would make runs with different process counts differ
    return cfg


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llm(tmp_path_factory.mktemp("train") / "llama")


def test_cra_constructed_case() -> None:
    e = torch.eye(4)
    a = torch.stack([e[0], e[1], e[2]])
    b = torch.stack([e[0] + 0.3 * e[3], e[1] + 0.3 * e[3], e[0] + 0.1 * e[2]])
    # a0 retrieves b2 (cos .995 > .958 to b0) and b2 retrieves a0: 4 of 6 captions are right.
    assert abs(cra_from_embeddings(a, b) - 100 * 4 / 6) < 1e-4
    assert cra_from_embeddings(a, a + 0.01) == 100.0
    pairs = caption_pairs(scene_records(30), max_captions=20)
    assert len(pairs) == 10 and pairs[0] == ("1 red circles", "a picture of 1 red circles")


def test_resume_reproduces_the_uninterrupted_run(tiny: Path, tmp_path: Path) -> None:
    train, held = scene_records(64), scene_records(20, offset=200)
    cfg = tiny_cfg(tiny, save_every_steps=2, lora=dataclasses.replace(RunConfig().stage1.lora, dropout=0.1))
    full = train_stage1(cfg.stage1, tmp_path / "full", train, held)
    # Every save_every_steps and at the end; the newest keep_checkpoints (2) are kept.
    assert Checkpointer(tmp_path / "full" / CHECKPOINTS).latest().name == "step-0000004"  # type: ignore[union-attr]
    ckpt = tmp_path / "full" / CHECKPOINTS / "step-0000002"
    assert (ckpt / "checkpoint.json").is_file()
    assert not list((tmp_path / "full" / CHECKPOINTS).glob(".tmp-*"))
    # A run killed after step 3 leaves the step-2 checkpoint; restarting resumes from it.
    (tmp_path / "killed" / CHECKPOINTS).mkdir(parents=True)
    shutil.copytree(ckpt, tmp_path / "killed" / CHECKPOINTS / ckpt.name)
    resumed = train_stage1(cfg.stage1, tmp_path / "killed", train, held)
    assert resumed["train"]["losses"][:2] == full["train"]["losses"][:2]  # restored history
    assert resumed["train"]["losses"][2:] == pytest.approx(full["train"]["losses"][2:], abs=1e-6)
    assert resumed["train"]["steps"] == full["train"]["steps"] == 4
    assert resumed["details"]["encoder_identity"] == full["details"]["encoder_identity"]
    assert (
        json.loads((tmp_path / "full" / "metrics.json").read_text())["eval"]["after"] == full["eval"]["after"]
    )
    enc = CaptionEncoder.from_pretrained(tmp_path / "killed" / "encoder", device="cpu")
    assert enc.max_length == 48 and enc.model.config.is_causal is False


DRIVER = """
import dataclasses, sys
sys.path.insert(0, {tests!r})
from test_stage1_train import scene_records, tiny_cfg
from llm2clip_vlm.text.train import train_stage1
from pathlib import Path
train_stage1(tiny_cfg(Path({model!r}), max_steps=3, chunk_size=5).stage1, sys.argv[1], scene_records(64), scene_records(20, 200))
"""


def test_two_processes_match_one_process(tiny: Path, tmp_path: Path) -> None:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(tests=str(Path(__file__).parent), model=str(tiny)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    one = subprocess.run([sys.executable, driver, tmp_path / "one"], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         driver, tmp_path / "two"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert (m1["train"]["processes"], m2["train"]["processes"]) == (1, 2)
    assert len(m1["train"]["losses"]) == len(m2["train"]["losses"]) == 3
    # Step 1 checks the gathered loss; steps 2-3 check that the gradients (through the gather,
    # averaged over processes) made the same update.
    assert m2["train"]["losses"] == pytest.approx(m1["train"]["losses"], abs=1e-5)
    assert len(set(m1["train"]["losses"])) == 3  # the model did change between steps


def test_qlora_4bit_base_on_cpu(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Linear4bit

    # bitsandbytes' CPU 4-bit kernels work in blocks of 64: a 32-wide model has no whole block.
    tiny = save_tiny_llm(tmp_path / "llama64", hidden_size=64)

    base = load_bidirectional(ModelRef(str(tiny)), quantization="4bit")
    assert isinstance(base.layers[0].self_attn.q_proj, Linear4bit)
    assert base.config.is_causal is False
    cfg = tiny_cfg(tiny, max_steps=2)
    cfg.stage1.lora.quantization = "4bit"
    m = train_stage1(cfg.stage1, tmp_path / "q", scene_records(64), scene_records(20, 200))
    assert len(m["train"]["losses"]) == 2 and all(math.isfinite(x) for x in m["train"]["losses"])
    # The saved embedder is the full-precision base with the LoRA merged, not a 4-bit model.
    enc = CaptionEncoder.from_pretrained(tmp_path / "q" / "encoder", device="cpu")
    assert type(enc.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    plain = CaptionEncoder(load_bidirectional(ModelRef(str(tiny))), enc.tokenizer, 48)
    texts = ["2 red circles", "3 blue stars"]
    assert not torch.allclose(enc.encode(texts), plain.encode(texts), atol=1e-4)  # the LoRA trained


def test_zero_epochs_saves_the_base_llm_as_the_encoder(tiny: Path, tmp_path: Path) -> None:
    """``epochs: 0`` = the "without stage 1" baseline: the base LLM, bidirectional, mean pooled."""
    cfg = tiny_cfg(tiny, epochs=0, max_steps=4)  # max_steps only caps the epochs
    metrics = train_stage1(cfg.stage1, tmp_path / "run", scene_records(32), scene_records(20, offset=200))
    assert metrics["train"]["steps"] == 0 and metrics["train"]["losses"] == []
    assert metrics["eval"]["after"] == metrics["eval"]["before"]
    enc = CaptionEncoder.from_pretrained(tmp_path / "run" / "encoder", device="cpu")
    assert enc.model.config.is_causal is False
    base = load_bidirectional(ModelRef(str(tiny)), dtype=torch.float32).state_dict()
    saved = enc.model.state_dict()
    assert set(saved) == set(base)
    assert all(torch.equal(saved[k], base[k]) for k in base)  # not one weight moved
