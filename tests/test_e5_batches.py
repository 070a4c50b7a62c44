"""Stage 1's reference route: llm2vec's E5 tasks + the caption pairs in task-homogeneous batches
(equal to a copy of the reference's ``E5Data``, tests/reference_e5data.py), started from an
``import-encoder`` output (a tiny Llama + LoRA adapters in llm2vec's layout), resumed exactly;
MNTP starting from the base plus extra adapters (the reference's ``extra_model_name_or_path``)."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import random
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from reference_e5data import E5Data
from test_caption_template import llama3_like_tokenizer
from transformers import AutoModel, AutoModelForCausalLM

from llm2clip_vlm.data.records import Caption, ImageCaptions
from llm2clip_vlm.imports.encoder import import_encoder
from llm2clip_vlm.recipe import RunConfig
from llm2clip_vlm.text.e5 import CAPTION_TASK, E5_EMBEDDING_PROMPTS, TaskBatches
from llm2clip_vlm.text.encoder import CaptionEncoder
from llm2clip_vlm.text.lora import merge_adapters
from llm2clip_vlm.text.modeling import ModelRef, load_bidirectional
from llm2clip_vlm.text.tiny import tiny_config
from llm2clip_vlm.text.train import train_stage1
from llm2clip_vlm.training.checkpoint import CHECKPOINTS

SEP = "!@#$%^&*()"  # E5Data's separator
INSTRUCTIONS = {
    "short": "Given a sentence, retrieve a detailed relevant sentence",
    "long": "Given a detailed sentence, retrieve a short relevant sentence",
}


def write_e5(folder: Path, sizes: dict[str, int], split: tuple[str, ...] = ()) -> None:
    """``<task>.jsonl`` files with unique texts (``<task>_split1/2.jsonl`` for tasks in ``split``)."""
    folder.mkdir(parents=True, exist_ok=True)
    for task, n in sizes.items():
        recs = [
            {"query": f"{task} q{i}", "positive": f"{task} p{i}", "negative": f"{task} n{i}"}
            for i in range(n)
        ]
        if task in split:
            half = n // 2
            for k, part in ((1, recs[:half]), (2, recs[half:])):
                (folder / f"{task}_split{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
        else:
            (folder / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def caption_images(n: int) -> list[ImageCaptions]:
    return [
        ImageCaptions(
            f"img{i}", f"/d/{i}.jpg", [Caption(f"short {i}", "short"), Caption(f"a long caption {i}", "long")]
        )
        for i in range(n)
    ]


def as_reference(task_batches: TaskBatches, step: int, batch_size: int) -> list[tuple[str, str, str]]:
    """Our triplets written as E5Data writes them (instruction; separator; text)."""
    return [
        (f"{t.instruction}; {SEP}{t.query}", SEP + t.positive, SEP + (t.negative or ""))
        for t in task_batches.batch(step, batch_size)
    ]


@pytest.mark.parametrize(("seed", "batch_size"), [(42, 4), (7, 3)])
def test_batch_order_equals_the_reference_e5data(tmp_path: Path, seed: int, batch_size: int) -> None:
    rng = random.Random(seed)
    sizes = {task: rng.randint(0, 13) for task in E5_EMBEDDING_PROMPTS}
    write_e5(tmp_path / "echo-data", sizes)
    images = caption_images(23)
    with (tmp_path / "cc3m.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["short_caption", "long_caption"])
        w.writerows([[r.captions[0].text, r.captions[1].text] for r in images])

    random.seed(seed)  # the reference's set_seed(training_args.seed) before load_dataset
    ref = E5Data(split="train", file_path=str(tmp_path / "echo-data"), effective_batch_size=batch_size,
                 extra_cc3m=str(tmp_path / "cc3m.csv"))  # fmt: skip
    ours = TaskBatches(tmp_path / "echo-data", [], images, INSTRUCTIONS, batch_size, seed)

    assert len(ours) == len(ref) and len(ref) > 0
    steps = ours.steps_per_epoch(batch_size)
    for k in range(steps):
        expected = [
            (d.query, d.positive, d.negative) for d in ref.data[k * batch_size : (k + 1) * batch_size]
        ]
        assert as_reference(ours, k, batch_size) == expected, f"step {k}"
        assert {d.task_name for d in ref.data[k * batch_size : (k + 1) * batch_size]} == {
            ours.task_of_step(k)
        }
    # Per-task counts: samples read, full batches kept.
    counts = ours.describe()
    assert counts[CAPTION_TASK] == {"samples": 23, "batches": 23 // batch_size}
    assert all(
        counts[t]["samples"] == n and counts[t]["batches"] == n // batch_size for t, n in sizes.items()
    )
    # Every epoch replays the order (the reference's SequentialSampler over a fixed list).
    assert as_reference(ours, steps, batch_size) == as_reference(ours, 0, batch_size)


def test_split_files_merge_and_bad_records_are_named(tmp_path: Path) -> None:
    write_e5(tmp_path / "e5", {"allnli": 6, "squad": 4}, split=("allnli",))
    tb = TaskBatches(tmp_path / "e5", ["allnli", "squad"], [], INSTRUCTIONS, 2, 0)
    assert tb.describe() == {"allnli": {"samples": 6, "batches": 3}, "squad": {"samples": 4, "batches": 2}}
    texts = {t.query for k in range(5) for t in tb.batch(k, 2)}
    assert texts == {f"allnli q{i}" for i in range(6)} | {f"squad q{i}" for i in range(4)}
    # allnli alternates its two prompts by line number within its file (E5_cc3m.py:126-130).
    prompts = {t.query: t.instruction for k in range(5) for t in tb.batch(k, 2)}
    assert prompts["allnli q0"] == E5_EMBEDDING_PROMPTS["allnli"][0]
    assert prompts["allnli q1"] == E5_EMBEDDING_PROMPTS["allnli"][1]

    with (tmp_path / "e5" / "squad.jsonl").open("a") as f:
        f.write('{"query": "q", "positive": 3, "negative": "n"}\n')
    with pytest.raises(ValueError, match=r"squad\.jsonl:5: field 'positive'"):
        TaskBatches(tmp_path / "e5", ["squad"], [], INSTRUCTIONS, 2, 0)
    with pytest.raises(FileNotFoundError, match="no fever.jsonl"):
        TaskBatches(tmp_path / "e5", ["fever"], [], INSTRUCTIONS, 2, 0)
    with pytest.raises(ValueError, match="unknown task 'wiki'"):
        TaskBatches(tmp_path / "e5", ["wiki"], [], INSTRUCTIONS, 2, 0)


def _bare(path: Path) -> torch.nn.Module:
    model = AutoModel.from_pretrained(path)
    model.config.is_causal = False
    return model.eval()


def _adapter(model: torch.nn.Module, out: Path, r: int, targets: list[str], seed: int) -> None:
    """A LoRA adapter of the bare decoder, saved by peft as llm2vec saves its -mntp/-supervised."""
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    peft.save_pretrained(out)


@pytest.fixture(scope="module")
def llm2vec(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llm2vec")
    tok = llama3_like_tokenizer()
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config(vocab_size=len(tok))).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    _adapter(_bare(root / "base"), root / "mntp", 4, ["q_proj", "v_proj", "gate_proj"], 1)
    first = PeftModel.from_pretrained(_bare(root / "base"), root / "mntp").merge_and_unload()
    _adapter(first, root / "supervised", 2, ["o_proj", "up_proj", "k_proj"], 2)
    import_encoder(root / "base", root / "encoder", adapters=[root / "mntp", root / "supervised"])
    write_e5(root / "echo-data", {"allnli": 13, "squad": 9, "nq": 3})
    return {"base": root / "base", "mntp": root / "mntp", "supervised": root / "supervised",
            "encoder": root / "encoder", "e5": root / "echo-data"}  # fmt: skip


def _cfg(model: Path, e5: Path, **loop: object) -> RunConfig:
    cfg = RunConfig()
    s = cfg.stage1
    cfg.stage1 = dataclasses.replace(
        s, model=str(model), batch_size=4, max_length=192, gradient_checkpointing=False, cra_captions=10, lr=1e-2,
        e5=dataclasses.replace(s.e5, path=str(e5), tasks=["allnli", "squad", "nq"]),
        lora=dataclasses.replace(s.lora, dropout=0.1),
        loop=dataclasses.replace(s.loop, warmup_steps=1, precision="fp32", **loop),  # type: ignore[arg-type]
    )  # fmt: skip
    return cfg


def test_stage1_on_e5_from_an_imported_encoder_resumes_exactly(
    llm2vec: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    train = caption_images(10)
    held = [ImageCaptions(f"h{i}", f"/h/{i}.jpg", [Caption(f"held {i}", "short"), Caption(f"a held {i}", "short")]) for i in range(6)]  # fmt: skip
    cfg = _cfg(llm2vec["encoder"], llm2vec["e5"], save_every_steps=3, keep_checkpoints=3, max_steps=0)
    with caplog.at_level(logging.INFO):
        full = train_stage1(cfg.stage1, tmp_path / "full", train, held)
    # allnli 13 -> 3 batches, squad 9 -> 2, nq 3 -> 0, captions 10 -> 2: one epoch is 7 steps.
    assert full["train"]["steps"] == 7
    assert full["details"]["tasks"] == {
        "allnli": {"samples": 13, "batches": 3}, "squad": {"samples": 9, "batches": 2},
        "nq": {"samples": 3, "batches": 0}, CAPTION_TASK: {"samples": 10, "batches": 2},
    }  # fmt: skip
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "task allnli" in logged and "13 samples" in logged and "(3 dropped)" in logged
    # Killed after step 4: the step-3 checkpoint resumes to the same losses and weights.
    ckpt = tmp_path / "full" / CHECKPOINTS / "step-0000003"
    (tmp_path / "killed" / CHECKPOINTS).mkdir(parents=True)
    shutil.copytree(ckpt, tmp_path / "killed" / CHECKPOINTS / ckpt.name)
    resumed = train_stage1(cfg.stage1, tmp_path / "killed", train, held)
    assert resumed["train"]["losses"][:3] == full["train"]["losses"][:3]
    assert resumed["train"]["losses"][3:] == pytest.approx(full["train"]["losses"][3:], abs=1e-6)
    assert resumed["details"]["encoder_identity"] == full["details"]["encoder_identity"]
    enc = CaptionEncoder.from_pretrained(tmp_path / "killed" / "encoder", device="cpu")
    assert enc.model.config.is_causal is False


def test_adapters_merge_into_the_causal_lm_for_mntp(llm2vec: dict[str, Path], tmp_path: Path) -> None:
    """The reference's MNTP start: the base *ForCausalLM + LLM2Vec's adapters (of the bare
    decoder) merged in order; the decoder equals import-encoder's merge, the LM head is kept."""
    lm = load_bidirectional(ModelRef(str(llm2vec["base"])), with_lm_head=True)
    head = lm.lm_head.weight.clone()
    merge_adapters(lm, [str(llm2vec["mntp"]), str(llm2vec["supervised"])])
    imported = CaptionEncoder.from_pretrained(llm2vec["encoder"], device="cpu").model.state_dict()
    merged = lm.model.state_dict()
    assert set(imported) == set(merged)
    assert all(torch.allclose(merged[k], imported[k], atol=1e-6) for k in imported)
    assert torch.equal(lm.lm_head.weight, head)
    # MNTP from an encoder directory is refused (no LM head), in one line naming it.
    cfg = _cfg(llm2vec["encoder"], llm2vec["e5"], max_steps=1)
    cfg.stage1.mntp.enabled = True
    with pytest.raises(ValueError, match="caption encoder, which has no LM head"):
        train_stage1(cfg.stage1, tmp_path / "run", caption_images(10), caption_images(4))
