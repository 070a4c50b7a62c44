"""Fault injection through the CLI on tiny data: one case per reliability promise (docs/RELIABILITY.md).

Every case runs ``python -m llm2clip_vlm.cli ...`` in a fresh process (forked from a server that
imported torch and transformers once, ``tests/cli_fork.py``: the package itself loads anew in each
process; ``LLM2CLIP_TEST_NO_FORK=1`` starts a new interpreter instead) on a tiny world (a 2-layer
LLM, 32 training images of 64 px, 2 stage-2 steps), injects one fault (an edited caption, a
broken image, pickled weights, replaced encoder weights, a wrong path, flipped checkpoint bytes,
a SIGTERM...) and checks what the user sees: exit status, the one line that names the problem,
no traceback, and that no finished work is lost or silently reused. It prints a table
``case | issue item | outcome | ok``::

    python tests/fault_injection.py                    # all cases (~2 min on 2 busy cores)
    python tests/fault_injection.py --only pickle,owner # cases whose name contains a word
    python tests/fault_injection.py --keep DIR         # keep the work folder for inspection

``tests/test_fault_injection.py`` runs every case as a test.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cli_fork

ROOT = Path(__file__).resolve().parents[1]
ENV = cli_fork.ENV  # one torch thread, no warnings, COLUMNS=250 (one line per message)

STAGE2_TINY = [
    "stage2.backbone.image_size=32", "stage2.backbone.hidden_size=32", "stage2.backbone.num_layers=2",
    "stage2.backbone.num_heads=2", "stage2.embed_dim=16", "stage2.num_workers=0", "stage2.loop.precision=fp32",
    "stage2.eval_batch_size=32", "stage2.batch_size=8", "stage2.loop.max_steps=2", "stage2.loop.save_every_steps=1",
]  # fmt: skip
STAGE1_TINY = ["stage1.loop.max_steps=2", "stage1.batch_size=4", "stage1.cra_captions=16"]
BUILD_TINY = [
    "data.demo_train_images=48", "data.demo_heldout_images=16", *STAGE1_TINY,
    "stage2.loop.max_steps=2", "stage2.batch_size=8", "stage2.embed_dim=32", "stage2.num_workers=0",
    "stage2.backbone.hidden_size=32", "stage2.backbone.num_layers=2", "stage2.backbone.num_heads=2",
    "stage2.backbone.image_size=32",
]  # fmt: skip


def _stage2_train(run: Path) -> dict:
    """The ``train`` and ``details`` sections of a stage-2 run's metrics.json (schema 1)."""
    m = json.loads((run / "metrics.json").read_text())
    return {**m["train"], **m["details"]}


def sets(items: list[str]) -> list[str]:
    return [f"--set={s}" for s in items]


@dataclass
class Run:
    """A finished CLI process."""

    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err

    def error_lines(self) -> list[str]:
        """The lines that report an error (what a user reads at the end)."""
        keys = ("error", "refused", "stopped by", "bug")
        return [ln for ln in self.err.splitlines() if any(k in ln.lower() for k in keys) and "INFO" not in ln]


def start(*args: str, code: str | None = None) -> Any:
    """``python -m llm2clip_vlm.cli ARGS`` (or ``python -c CODE``) started in a new process, forked
    from a server that has the third-party modules imported (tests/cli_fork.py): a Popen-like."""
    return cli_fork.start(list(args), code=code)


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600, code: str | None = None) -> Run:
    return Run(*cli_fork.run(list(args), code=code, env=env, timeout=timeout))


def expect_one_line(r: Run, code: int, *needles: str) -> str:
    """The run failed with ``code``, without a traceback, on one line holding every needle."""
    assert r.code == code, f"exit {r.code}, expected {code}: {r.err[-1500:]}"
    assert "Traceback" not in r.err, f"traceback shown: {r.err[-1500:]}"
    lines = [ln for ln in r.err.splitlines() if all(n in ln for n in needles)]
    assert lines, f"no line holds {needles}: {r.err[-1500:]}"
    return lines[-1].strip()


@dataclass
class World:
    """The shared tiny inputs, built once (in-process: they are not what is tested)."""

    root: Path
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def llm(self) -> Path:
        if "llm" not in self.cache:
            from llm2clip_vlm.text.tiny import save_tiny_llm

            self.cache["llm"] = save_tiny_llm(self.root / "llm")
        return self.cache["llm"]

    @property
    def data(self) -> Path:
        if "data" not in self.cache:
            from llm2clip_vlm.data.synthetic import write_demo_dataset

            write_demo_dataset(
                self.root / "data", seed=0, train_images=32, heldout_images=16, show_progress=False
            )
            self.cache["data"] = self.root / "data"
        return self.cache["data"]

    def encoder(self, name: str = "enc", seed: int = 0) -> Path:
        if name not in self.cache:
            from llm2clip_vlm.text.encoder import CaptionEncoder
            from llm2clip_vlm.text.modeling import ModelRef, load_bidirectional, load_tokenizer
            from llm2clip_vlm.text.tiny import save_tiny_llm

            llm = save_tiny_llm(self.root / f"{name}-llm", seed=seed)
            ref = ModelRef(str(llm))
            enc = CaptionEncoder(load_bidirectional(ref), load_tokenizer(ref), max_length=64)
            self.cache[name] = enc.save_pretrained(self.root / name)
        return self.cache[name]

    def copy_data(self, name: str) -> Path:
        dst = self.root / name
        shutil.copytree(self.data, dst)
        return dst

    def common(self, data: Path | None = None, encoder: Path | None = None) -> list[str]:
        return sets([
            f"data.demo_dir={data or self.data}", "data.demo_train_images=32", "data.demo_heldout_images=16",
            "embed.batch_size=16", "embed.precision=fp32", "embed.dtype=fp32",
            f"embed.encoder={encoder or self.encoder()}",
        ])  # fmt: skip

    @property
    def store(self) -> Path:
        if "store" not in self.cache:
            r = cli("embed", "-o", str(self.root / "store"), *self.common())
            assert r.code == 0, r.err[-2000:]
            self.cache["store"] = self.root / "store"
        return self.cache["store"]

    def stage2(self, out: Path, *extra: str, store: Path | None = None, data: Path | None = None) -> Run:
        return cli(
            "stage2", "-o", str(out), f"--store={store or self.store}", *self.common(data),
            *sets(STAGE2_TINY), *extra,
        )  # fmt: skip

    @property
    def stage2_run(self) -> Path:
        """A finished stage-2 run (2 steps, checkpoints at steps 1 and 2)."""
        if "s2" not in self.cache:
            r = self.stage2(self.root / "s2")
            assert r.code == 0, r.err[-2000:]
            self.cache["s2"] = self.root / "s2"
        return self.cache["s2"]

    def build(self, out: Path, *extra: str) -> Run:
        return cli("build-tower", "-o", str(out), f"--set=stage1.model={self.llm}", *sets(BUILD_TINY), *extra)


def _stamps(run: Path) -> dict[str, dict[str, Any]]:
    return {
        d: json.loads((run / d / "stage.json").read_text()) for d in ("stage1", "store", "stage2", "tower")
    }


# ------------------------------------------------------------------------------------------------
# Cases: each returns the outcome in words, and raises AssertionError when a promise is broken.
# ------------------------------------------------------------------------------------------------
def case_build_tower_edited_caption(w: World) -> str:
    run = w.root / "bt"
    r = w.build(run)
    assert r.code == 0, r.err[-2000:]
    before = _stamps(run)
    manifest = run / "demo-data" / "train.jsonl"
    lines = manifest.read_text().splitlines()
    rec = json.loads(lines[3])
    rec["short_captions"][0] = "an edited caption: " + rec["short_captions"][0]
    lines[3] = json.dumps(rec)
    manifest.write_text("\n".join(lines) + "\n")
    r = w.build(run)
    assert r.code == 0, r.err[-2000:]
    after = _stamps(run)
    rerun = [d for d in before if before[d]["fingerprint"] != after[d]["fingerprint"]]
    assert rerun == ["stage1", "store", "stage2", "tower"], rerun
    assert "skipped" not in r.text
    r = w.build(run)
    assert r.code == 0 and r.text.count("skipped") == 4, r.err[-2000:]
    w.cache["bt"] = run
    return "edit 1 caption: stage1, embed, stage2, export re-ran (exit 0); same again: 4 skipped"


def case_build_tower_replaced_encoder_weights(w: World) -> str:
    run = w.cache.get("bt") or (case_build_tower_edited_caption(w) and w.cache["bt"])
    other = w.encoder("enc-other", seed=1)
    weights = run / "stage1" / "encoder" / "model.safetensors"
    shutil.copy(other / "model.safetensors", weights)
    r = w.build(run)
    assert r.code == 0, r.err[-2000:]
    # Issue 27: an artifact changed after it was written is never reused: stage 1 runs again, so
    # embed and stage 2 never train on weights the build did not make.
    assert "stage1: its artifact was changed after it was written" in r.err, r.err[-2000:]
    assert weights.read_bytes() != (other / "model.safetensors").read_bytes()
    return (
        "stage-1 encoder weights replaced by hand: not reused, stage1 rebuilt (sha256 differs from its stamp)"
    )


def _batch_positions(n: int, batch: int, step: int, seed: int = 42) -> list[int]:
    """Record positions of global batch ``step`` of epoch 0 (GlobalBatchSampler's permutation)."""
    import torch

    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return [int(i) for i in perm[step * batch : (step + 1) * batch]]


def case_skip_bad_mid_run(w: World) -> str:
    from safetensors.torch import load_file

    data = w.copy_data("data-midrun")
    rows = [json.loads(x) for x in (data / "train.jsonl").read_text().splitlines()]
    victim = _batch_positions(32, 8, 3)[0]  # met in step 4, after the checkpoint of step 3
    (data / rows[victim]["image"]).write_bytes(b"GIF89a not an image")
    lazy = ["--set=data.verify_images=false", "--set=stage2.loop.max_steps=4"]
    skip = ["--set=data.skip_bad=true", "--set=data.max_bad_fraction=0.2"]

    r = w.stage2(w.root / "mid-stop", *lazy, "--set=stage2.num_workers=2", data=data)
    line = expect_one_line(r, 1, rows[victim]["image"].split("/")[-1], "skip_bad")
    full = w.stage2(w.root / "mid-full", *lazy, *skip, data=data)
    assert full.code == 0, full.err[-2000:]
    workers = w.stage2(w.root / "mid-workers", *lazy, *skip, "--set=stage2.num_workers=2", data=data)
    assert workers.code == 0, workers.err[-2000:]
    m_full = _stage2_train(w.root / "mid-full")
    m_work = _stage2_train(w.root / "mid-workers")
    assert m_full["bad_images"] == 1 and m_full["losses"] == m_work["losses"], (m_full, m_work)
    # Resume: drop the last checkpoint, rerun -> step 4 (the one meeting the bad image) again.
    cut = w.root / "mid-cut"
    shutil.copytree(w.root / "mid-full", cut)
    shutil.rmtree(cut / "checkpoints" / "step-0000004")
    (cut / "metrics.json").unlink()
    resumed = w.stage2(cut, *lazy, *skip, data=data)
    assert resumed.code == 0, resumed.err[-2000:]
    m_cut = _stage2_train(cut)
    a = load_file(str(w.root / "mid-full" / "checkpoints" / "step-0000004" / "model.safetensors"))
    b = load_file(str(cut / "checkpoints" / "step-0000004" / "model.safetensors"))
    assert all(bool((a[k] == b[k]).all()) for k in a) and m_cut["losses"] == m_full["losses"]
    report = json.loads((w.root / "mid-full" / "bad_records.json").read_text())
    assert len(report["train"]["skipped"]) == 1
    return f"off: exit 1, one line ({line[:60]}...); on: skipped 1, same losses with 2 workers, resume bit-identical"


def case_bad_fraction_over_all_phases(w: World) -> str:
    data = w.copy_data("data-fraction")
    lines = (data / "train.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    lines[5], lines[6] = lines[5][:30], lines[6][:30]  # 2 broken JSON lines (read time)
    for i in (10, 11):  # 2 unreadable images (decode time)
        (data / rows[i]["image"]).write_bytes(b"not an image")
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    limit = ["--set=data.skip_bad=true", "--set=data.max_bad_fraction=0.1"]
    r = cli("embed", "-o", str(w.root / "store-fraction"), *w.common(data), *limit)
    assert r.code == 0, r.err[-2000:]  # 2 of 32 = 6% at read time: under 10%
    r = w.stage2(w.root / "s2-fraction", *limit, store=w.root / "store-fraction", data=data)
    line = expect_one_line(r, 1, "4 of 32 records are bad", "2 when reading, 2 here")
    return f"2 read-time + 2 decode-time bad of 32 (12.5% > 10%): refused: {line[:90]}"


def _pickle_only_clip(path: Path) -> Path:
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2)  # fmt: skip
    model = CLIPVisionModel(cfg)
    model.save_pretrained(path)
    (path / "model.safetensors").unlink()
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        path
    )
    return path


def case_pickle_backbone(w: World) -> str:
    bb = _pickle_only_clip(w.root / "clip-pickle")
    use = [f"--set=stage2.backbone.name_or_path={bb}"]
    r = w.stage2(w.root / "s2-pickle", *use)
    line = expect_one_line(r, 2, "pytorch_model.bin", "allow_pickle_weights")
    assert not (w.root / "s2-pickle" / "config.yaml").exists()
    r = w.stage2(w.root / "s2-pickle", *use, "--set=reliability.allow_pickle_weights=true")
    assert r.code == 0, r.err[-2000:]
    return f"refused (exit 2): {line[:80]}...; with the opt-in: trains"


def case_pickle_llm_stage1(w: World) -> str:
    import torch
    from safetensors.torch import load_file

    llm = w.root / "llm-pickle"
    shutil.copytree(w.llm, llm)
    torch.save(load_file(str(llm / "model.safetensors")), llm / "pytorch_model.bin")
    (llm / "model.safetensors").unlink()
    r = cli(
        "stage1",
        "-o",
        str(w.root / "s1-pickle"),
        *w.common(),
        f"--set=stage1.model={llm}",
        *sets(STAGE1_TINY),
    )
    line = expect_one_line(r, 2, "pytorch_model.bin", "allow_pickle_weights")
    return f"refused (exit 2): {line[:80]}..."


def case_pickle_eval_model(w: World) -> str:
    from llm2clip_vlm.errors import PickleRefusedError
    from llm2clip_vlm.evaluation.lmms_model import LLM2CLIPLlava
    from llm2clip_vlm.evaluation.tiny import save_tiny_llava

    model = save_tiny_llava(w.root / "llava-tiny", seed=0)
    import torch
    from safetensors.torch import load_file

    files = list(Path(model).glob("*.safetensors"))
    state = {k: v for f in files for k, v in load_file(str(f)).items()}
    for f in files:
        f.unlink()
    torch.save(state, Path(model) / "pytorch_model.bin")
    try:
        LLM2CLIPLlava(pretrained=str(model), device="cpu")
    except PickleRefusedError as e:
        assert "allow_pickle_weights" in str(e)
        return "lmms-eval model: pickle-only LLaVA refused, naming allow_pickle_weights (model_args)"
    raise AssertionError("a pickle-only LLaVA model was accepted")


def case_encoder_weights_replaced(w: World) -> str:
    enc = w.root / "enc-swap"
    shutil.copytree(w.encoder(), enc)
    store = w.root / "store-swap"
    r = cli("embed", "-o", str(store), *w.common(encoder=enc))
    assert r.code == 0, r.err[-2000:]
    old_identity = json.loads((store / "train" / "manifest.json").read_text())["encoder_identity"]
    kept = w.root / "store-swap-old"
    shutil.copytree(store, kept)
    shutil.copy(w.encoder("enc-other", seed=1) / "model.safetensors", enc / "model.safetensors")
    r = cli("embed", "-o", str(store), *w.common(encoder=enc))
    assert r.code == 0 and "embedding again" in r.text, r.err[-2000:]
    new_identity = json.loads((store / "train" / "manifest.json").read_text())["encoder_identity"]
    assert new_identity != old_identity
    r = w.stage2(w.root / "s2-swap", f"--encoder={enc}", store=kept)
    line = expect_one_line(r, 1, "store refused", "embedded by encoder")
    return f"embed re-embedded (identity {old_identity[:8]} -> {new_identity[:8]}); stage2 on the old store: {line[:70]}..."


def case_output_is_a_file(w: World) -> str:
    f = w.root / "a-file"
    f.write_text("not a directory")
    r = w.stage2(f)
    line = expect_one_line(r, 2, str(f), "is a file")
    return line


def case_missing_store(w: World) -> str:
    r = w.stage2(w.root / "s2-nostore", store=w.root / "no-such-store")
    return expect_one_line(r, 1, "no-such-store", "not an embedding store")


def case_missing_encoder(w: World) -> str:
    r = w.stage2(w.root / "s2-noenc", f"--encoder={w.root / 'no-such-encoder'}")
    return expect_one_line(r, 2, "no-such-encoder", "not a CaptionEncoder directory")


def case_export_missing_run(w: World) -> str:
    r = cli("export-tower", str(w.root / "no-such-run"), "-o", str(w.root / "tower-x"))
    line = expect_one_line(r, 2, "no-such-run", "not a finished stage-2 run")
    assert not (w.root / "tower-x").exists()
    return line


def case_stage1_unknown_cra_set(w: World) -> str:
    recipe = w.root / "no-short.yaml"
    recipe.write_text(
        "data:\n"
        f"  train: {{path: {w.data / 'train.jsonl'}, key_column: key}}\n"
        f"  heldout:\n    long: {{path: {w.data / 'heldout_long.jsonl'}, key_column: key,"
        " caption_columns: {long_captions: long}}\n"
    )
    r = cli(
        "stage1",
        str(recipe),
        "-o",
        str(w.root / "s1-noshort"),
        f"--set=stage1.model={w.llm}",
        "--set=stage1.cra_set=coco",
        *sets(STAGE1_TINY),
    )
    return expect_one_line(r, 1, "stage1.cra_set: no held-out set named 'coco'")


def case_llava_from_projector_bin(w: World) -> str:
    pre = w.root / "llava-pre"
    pre.mkdir()
    (pre / "mm_projector.bin").write_bytes(b"\x80\x04 a pickle")
    tower = w.root / "some-tower"
    tower.mkdir(exist_ok=True)
    r = cli(
        "llava-finetune",
        "-o",
        str(w.root / "llava-ft"),
        f"--tower={tower}",
        f"--from={pre / 'mm_projector.bin'}",
    )
    return expect_one_line(r, 2, "mm_projector.bin", "safetensors")


def case_a_bug_says_it_is_one(w: World) -> str:
    code = (
        "import sys, llm2clip_vlm.vision.export as ex\n"
        "def broken(*a, **k): raise TypeError('injected bug')\n"
        "ex.export_tower = broken\n"
        "from llm2clip_vlm.cli import main\n"
        f"sys.argv = ['llm2clip-vlm', 'export-tower', {str(w.stage2_run)!r}, '-o', {str(w.root / 'tower-bug')!r}]\n"
        "main()\n"
    )
    r = cli(code=code)
    assert r.code == 70, r.err[-1500:]
    assert "Traceback" in r.err and "this is a bug" in r.err and "injected bug" in r.err
    return "traceback + 'this is a bug (an unexpected TypeError) ...', exit 70"


def case_owner_stage2_into_stage1_run(w: World) -> str:
    run = w.cache.get("bt") or (case_build_tower_edited_caption(w) and w.cache["bt"])
    s1 = run / "stage1"
    before = (s1 / "config.yaml").read_bytes()
    r = w.stage2(s1)
    line = expect_one_line(r, 2, "holds a `stage1` run", "another --output")
    assert (s1 / "config.yaml").read_bytes() == before
    return f"refused, config.yaml untouched: {line[:80]}"


def case_owner_stage1_into_stage2_run(w: World) -> str:
    r = cli("stage1", "-o", str(w.stage2_run), *w.common(), f"--set=stage1.model={w.llm}", *sets(STAGE1_TINY))
    return expect_one_line(r, 2, "holds a `stage2` run")


def case_resume_with_changed_config(w: World) -> str:
    run = w.root / "s2-change"
    shutil.copytree(w.stage2_run, run)
    cfg_before = (run / "config.yaml").read_bytes()
    r = w.stage2(run, "--set=stage2.lr=5e-3", "--set=stage2.batch_size=16")
    line = expect_one_line(r, 2, "stage2.batch_size: 8 -> 16", "stage2.lr", "--allow-config-change")
    assert (run / "config.yaml").read_bytes() == cfg_before
    r = w.stage2(run, "--set=stage2.num_workers=1", "--set=runtime.threads=1")
    assert r.code == 0, r.err[-2000:]  # speed settings may change
    r = w.stage2(run, "--set=stage2.lr=5e-3", "--allow-config-change")
    assert r.code == 0, r.err[-2000:]
    return f"refused ({line[line.index('(') + 1 : line.index(')')]}); workers/threads accepted; --allow-config-change accepted"


def case_checkpoint_flipped_bytes(w: World) -> str:
    run = w.root / "s2-flip"
    shutil.copytree(w.stage2_run, run)
    weights = run / "checkpoints" / "step-0000002" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    r = w.stage2(run)
    return expect_one_line(r, 1, str(weights), "corrupt")


def case_non_utf8_jsonl(w: World) -> str:
    data = w.copy_data("data-utf8")
    raw = (data / "train.jsonl").read_bytes().split(b"\n")
    raw[4] = raw[4].replace(b'"short_captions": ["', b'"short_captions": ["\xff', 1)
    (data / "train.jsonl").write_bytes(b"\n".join(raw))
    r = cli("embed", "-o", str(w.root / "store-utf8"), *w.common(data))
    line = expect_one_line(r, 1, "train.jsonl:5: not UTF-8 (byte 0xff")
    r = cli("embed", "-o", str(w.root / "store-utf8"), *w.common(data), "--set=data.skip_bad=true",
            "--set=data.max_bad_fraction=0.1")  # fmt: skip
    assert r.code == 0, r.err[-2000:]
    return f"names line 5 ({line[:60]}...); with skip_bad: skipped, embed completes"


def case_malformed_csv(w: World) -> str:
    rows = [json.loads(x) for x in (w.data / "train.jsonl").read_text().splitlines()]
    csv = w.data / "bad.csv"
    lines = ["image,short_captions"] + [f'{r["image"]},"{r["short_captions"][0]}"' for r in rows[:6]]
    lines[4] = lines[4] + ",an extra field,and another"
    csv.write_text("\n".join(lines) + "\n")
    recipe = w.root / "csv.yaml"
    recipe.write_text(f"data:\n  train: {{path: {csv}}}\n  heldout: {{}}\n")
    r = cli("embed", str(recipe), "-o", str(w.root / "store-csv"), f"--set=embed.encoder={w.encoder()}")
    return expect_one_line(r, 1, "bad.csv:5", "malformed CSV row")


def case_duplicate_keys(w: World) -> str:
    data = w.copy_data("data-dup")
    lines = (data / "train.jsonl").read_text().splitlines()
    lines[9] = lines[2]  # line 10 repeats line 3's key
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    r = cli("embed", "-o", str(w.root / "store-dup"), *w.common(data))
    line = expect_one_line(r, 1, "train.jsonl:10: duplicate key", "first at")
    r = cli("embed", "-o", str(w.root / "store-dup"), *w.common(data), "--set=data.skip_bad=true",
            "--set=data.max_bad_fraction=0.1")  # fmt: skip
    assert r.code == 0 and "duplicate key" in r.err, r.err[-2000:]
    return f"refused: {line[:70]}...; with skip_bad: skipped with a warning"


def case_sigterm_during_image_check(w: World) -> str:
    marker = w.root / "check-started"
    code = (
        "import sys, time, pathlib, llm2clip_vlm.data.images as im\n"
        "orig = im.load_rgb\n"
        "def slow(*a, **k):\n"
        f"    pathlib.Path({str(marker)!r}).touch(); time.sleep(0.3); return orig(*a, **k)\n"
        "im.load_rgb = slow\n"
        "from llm2clip_vlm.cli import main\n"
        f"sys.argv = ['llm2clip-vlm', 'stage2', '-o', {str(w.root / 's2-term')!r}, '--store={w.store}',"
        f" *{w.common() + sets(STAGE2_TINY)!r}]\n"
        "main()\n"
    )
    p = start(code=code)
    deadline = time.time() + 300
    while not marker.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    r = Run(p.returncode, "", err)
    return expect_one_line(r, 143, "stopped by SIGTERM", "checking")


# ------------------------------------------------------------------------------------------------
# Issue 27 ("round 3"), items 5-9: damaged inputs, resources, config ranges, report/shards
# containment, SIGTERM anywhere. tests/test_faults_config.py and tests/test_faults_inputs.py hold
# the full set in-process; these are the same promises in fresh processes, as a user meets them.
# ------------------------------------------------------------------------------------------------
def _patched_main(patch: str, argv: list[str]) -> Run:
    """The CLI in a fresh process after ``patch`` (Python) ran: a fault only a fake can make."""
    code = f"import sys\n{patch}\nfrom llm2clip_vlm.cli import main\nsys.argv = {['llm2clip-vlm', *argv]!r}\nmain()\n"
    return cli(code=code, timeout=600)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def case_config_ranges(w: World) -> str:
    lines = []
    for item in ("stage2.batch_size=0", "stage2.lr=.nan", "stage2.embed_dim=0", "data.max_bad_fraction=7",
                 "stage2.loop.max_steps=-5", "data.text_corpus_ratio=1.5"):  # fmt: skip
        r = cli("stage2", "-o", str(w.root / "cfg-range"), f"--set={item}")
        lines.append(expect_one_line(r, 2, "config error:", item.split("=")[0], "must be"))
    assert not (w.root / "cfg-range").exists()
    recipe = w.root / "dup.yaml"
    recipe.write_text("stage2:\n  lr: 0.001\n  lr: 0.01\n")
    dup = expect_one_line(cli("stage2", str(recipe), "-o", str(w.root / "cfg-range")), 2, str(recipe), "'lr'")
    return f"6 out-of-range values refused before any write (e.g. `{lines[1][:70]}`); duplicate key: `{dup[-60:]}`"


def case_text_corpus_nul(w: World) -> str:
    corpus = w.root / "corpus-nul.txt"
    corpus.write_bytes(b"a line of text long enough to be a sample\x00 and a NUL byte\n")
    r = cli("stage1", "-o", str(w.root / "s1-nul"), *w.common(), f"--set=stage1.model={w.llm}",
            *sets(STAGE1_TINY), "--set=stage1.mntp.enabled=true", f"--set=data.text_corpus=[{corpus}]",
            "--set=data.text_corpus_ratio=0.5")  # fmt: skip
    line = expect_one_line(r, 1, str(corpus), "a NUL byte")
    return f"refused (exit 1): {line[:110]}"


def case_report_stays_inside(w: World) -> str:
    run = w.root / "s2-report"
    shutil.copytree(w.stage2_run, run)
    secret = w.root / "secret.txt"
    secret.write_bytes(b"SECRET-CONTENT-0123456789")
    doc = json.loads((run / "gallery" / "retrieval.json").read_text())
    g = next(iter(doc.values()))
    first = next(iter(g["images"]))
    g["images"][first] = "../../secret.txt"
    g["images"][next(iter(list(g["images"])[1:]))] = str(secret)
    g["text_to_image"][0]["caption"] = '"><script>alert(1)</script>'
    (run / "gallery" / "retrieval.json").write_text(json.dumps(doc))
    r = cli("report", str(run), "-o", str(w.root / "report.html"))
    assert r.code == 0, r.err[-2000:]
    html = (w.root / "report.html").read_text()
    import base64

    assert base64.b64encode(b"SECRET-CONTENT-0123456789").decode()[:16] not in html
    assert "<script>" not in html and "&lt;script&gt;" in html
    return 'gallery naming ../../secret.txt and an absolute path: not inlined; `"><script>` escaped'


def case_llava_shards_prefix(w: World) -> str:
    from llm2clip_vlm.data.synthetic_llava import write_llava_demo

    data = w.root / "llava-data"
    if not data.exists():
        write_llava_demo(data, pretrain_images=8, instruct_images=8, heldout_images=4, image_size=32)
    out = w.root / "shards" / "inner"
    r = cli("llava-shards", str(data / "llava_pretrain.json"), "-o", str(out), "--prefix", "../../escaped")
    line = expect_one_line(r, 2, "--prefix", "plain name")
    assert not list(w.root.rglob("escaped*")) and not out.exists()
    return f"refused, nothing written: {line[:90]}"


def case_damaged_backbone(w: World) -> str:
    bb = _pickle_only_clip(w.root / "clip-damaged")
    import torch
    from safetensors.torch import save_file

    save_file(torch.load(bb / "pytorch_model.bin", weights_only=True), str(bb / "model.safetensors"))
    (bb / "pytorch_model.bin").unlink()
    f = bb / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # a partial copy
    r = w.stage2(w.root / "s2-damaged-bb", f"--set=stage2.backbone.name_or_path={bb}")
    line = expect_one_line(r, 1, str(f), "is damaged")
    (bb / "config.json").write_text("{ not json")
    r = w.stage2(w.root / "s2-damaged-bb", f"--set=stage2.backbone.name_or_path={bb}")
    line2 = expect_one_line(r, 1, "config.json", "not valid UTF-8 JSON")
    return f"truncated safetensors: `{line[:80]}...`; bad config.json: `...{line2[-60:]}`"


def case_damaged_metrics_and_index(w: World) -> str:
    run = w.root / "s2-metrics"
    shutil.copytree(w.stage2_run, run)
    with (run / "metrics.jsonl").open("ab") as f:
        f.write(b'\x92\xff garbage \x00{{\n{"step": 1\n')
    r = cli("report", str(run), "-o", str(w.root / "report-metrics.html"))
    warned = expect_one_line(r, 0, "metrics.jsonl", "damaged line")
    r = w.stage2(run, "--set=stage2.loop.max_steps=3", "--allow-config-change")
    assert r.code == 0, r.err[-2000:]
    # A private cache (never the user's): build it, damage every index in it, run again.
    env = dict(ENV, LLM2CLIP_VLM_CACHE=str(w.root / "cache-damaged"))
    r = cli("embed", "-o", str(w.root / "store-reindexed"), *w.common(), env=env)
    assert r.code == 0, r.err[-2000:]
    arrows = list((w.root / "cache-damaged" / "index").glob("*/records.arrow"))
    for p in arrows:
        p.write_bytes(b"not arrow")
    r = cli("embed", "-o", str(w.root / "store-reindexed"), *w.common(), env=env)
    assert r.code == 0 and "rebuilding it" in r.err, r.err[-2000:]
    return f"report: one warning (`{warned[-70:]}`), resume ok; {len(arrows)} damaged index caches rebuilt"


def case_full_disk_torch_save(w: World) -> str:
    out = w.root / "s2-full"
    patch = (
        "from llm2clip_vlm.training import checkpoint as c\nfrom llm2clip_vlm import resources\n"
        "real = c._save_pickle\n"
        "def full(obj, path):\n"
        "    if path.parent.name == '.tmp-step-0000002': raise RuntimeError('PytorchStreamWriter failed writing file data/0: file write failed')\n"
        "    real(obj, path)\n"
        "c._save_pickle = full\nresources.free_bytes = lambda p: 0\n"
    )  # fmt: skip
    args = ["stage2", "-o", str(out), f"--store={w.store}", *w.common(), *sets(STAGE2_TINY)]
    r = _patched_main(patch, args)
    line = expect_one_line(r, 1, "could not write checkpoint", "no space left", "step-0000001 is intact")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001"]
    before = _files(out / "checkpoints" / "step-0000001")
    r = cli(*args)
    assert r.code == 0, r.err[-2000:]
    assert before, "the kept checkpoint had files"
    return f"exit 1, `{line[:120]}...`; rerun with room resumes and finishes"


def case_read_only_output(w: World) -> str:
    ro = w.root / "read-only"
    ro.mkdir(exist_ok=True)
    patch = (
        "import os, errno, builtins, pathlib\n"
        f"RO = {str(ro)!r}\n"
        "def under(p):\n    return os.path.abspath(os.fsdecode(p)).startswith(RO + os.sep)\n"
        "ro_open, ro_osopen, ro_mkdir = builtins.open, os.open, os.mkdir\n"
        "def op(f, mode='r', *a, **k):\n"
        "    if isinstance(f, (str, os.PathLike)) and any(c in mode for c in 'wax+') and under(f): raise OSError(errno.EROFS, 'Read-only file system', os.fsdecode(f))\n"
        "    return ro_open(f, mode, *a, **k)\n"
        "def oso(p, fl, *a, **k):\n"
        "    if fl & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and under(p): raise OSError(errno.EROFS, 'Read-only file system', os.fsdecode(p))\n"
        "    return ro_osopen(p, fl, *a, **k)\n"
        "def mk(p, *a, **k):\n"
        "    if under(p) and not os.path.isdir(p): raise OSError(errno.EROFS, 'Read-only file system', os.fsdecode(p))\n"
        "    return ro_mkdir(p, *a, **k)\n"
        "builtins.open, os.open, os.mkdir = op, oso, mk\n"
    )  # fmt: skip
    r = _patched_main(
        patch, ["stage2", "-o", str(ro / "run"), f"--store={w.store}", *w.common(), *sets(STAGE2_TINY)]
    )
    line = expect_one_line(r, 1, str(ro), "cannot write here (Read-only file system)")
    assert list(ro.iterdir()) == []
    return f"exit 1: `{line[:110]}`"


def case_sigterm_during_embed(w: World) -> str:
    marker = w.root / "embedding.started"
    code = (
        "import pathlib, sys, time\n"
        "from llm2clip_vlm.store import writer\n"
        "orig = writer.to_storage\n"
        "def slow(*a, **k):\n"
        f"    pathlib.Path({str(marker)!r}).touch(); time.sleep(2); return orig(*a, **k)\n"
        "writer.to_storage = slow\n"
        "from llm2clip_vlm.cli import main\n"
        f"sys.argv = ['llm2clip-vlm', 'embed', '-o', {str(w.root / 'store-term')!r}, *{w.common()!r}]\n"
        "main()\n"
    )
    p = start(code=code)
    deadline = time.time() + 300
    while not marker.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    line = expect_one_line(
        Run(p.returncode, "", err), 143, "stopped by SIGTERM", "run the same command again"
    )
    assert not list((w.root / "store-term").rglob("*.partial"))
    r = cli("embed", "-o", str(w.root / "store-term"), *w.common())
    assert r.code == 0, r.err[-2000:]
    return f"exit 143, `{line[:70]}...`; rerun completes the store"


CASES: list[tuple[str, str, Callable[[World], str]]] = [
    ("build-tower: edited caption", "1", case_build_tower_edited_caption),
    ("build-tower: replaced encoder weights", "1", case_build_tower_replaced_encoder_weights),
    ("stage2: bad image mid-run (skip_bad, workers, resume)", "2", case_skip_bad_mid_run),
    ("stage2: pickle-only backbone", "3", case_pickle_backbone),
    ("eval: pickle-only LLaVA model", "3", case_pickle_eval_model),
    ("embed/stage2: encoder weights replaced", "4", case_encoder_weights_replaced),
    ("stage2: max_bad_fraction over all phases", "5", case_bad_fraction_over_all_phases),
    ("--output is a file", "6", case_output_is_a_file),
    ("stage2 --store missing", "6", case_missing_store),
    ("stage2 --encoder missing", "6", case_missing_encoder),
    ("export-tower on a missing run", "6", case_export_missing_run),
    ("stage1 with an unknown stage1.cra_set", "6", case_stage1_unknown_cra_set),
    ("stage1: pickle-only LLM", "6", case_pickle_llm_stage1),
    ("llava-finetune --from mm_projector.bin", "6", case_llava_from_projector_bin),
    ("a bug shows a traceback and says so", "6", case_a_bug_says_it_is_one),
    ("stage2 -o <stage-1 run>", "7", case_owner_stage2_into_stage1_run),
    ("stage1 -o <stage-2 run>", "7", case_owner_stage1_into_stage2_run),
    ("resume with changed lr/batch_size", "7", case_resume_with_changed_config),
    ("checkpoint with flipped bytes", "8", case_checkpoint_flipped_bytes),
    ("non-UTF-8 byte in JSONL", "9", case_non_utf8_jsonl),
    ("malformed CSV", "9", case_malformed_csv),
    ("duplicate keys", "9", case_duplicate_keys),
    ("SIGTERM during the image check", "9", case_sigterm_during_image_check),
    ("config values out of range; duplicate YAML key", "27/8", case_config_ranges),
    ("text corpus with a NUL byte", "27/8", case_text_corpus_nul),
    ("report: gallery path traversal and markup", "27/5", case_report_stays_inside),
    ("llava-shards --prefix ../../escaped", "27/6", case_llava_shards_prefix),
    ("stage2: truncated backbone safetensors, bad config.json", "27/7", case_damaged_backbone),
    ("damaged metrics.jsonl and index caches", "27/7", case_damaged_metrics_and_index),
    ("full disk in torch.save (RuntimeError)", "27/7", case_full_disk_torch_save),
    ("read-only output folder", "27/7", case_read_only_output),
    ("SIGTERM during embed", "27/9", case_sigterm_during_embed),
]


def run_case(w: World, fn: Callable[[World], str]) -> tuple[bool, str, float]:
    start = time.perf_counter()
    try:
        outcome, ok = fn(w), True
    except AssertionError as e:
        outcome, ok = f"FAILED: {e}"[:400], False
    return ok, outcome, time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default="", help="comma-separated words; run the cases whose name holds one")
    p.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temporary one)")
    args = p.parse_args()
    words = [x.strip().lower() for x in args.only.split(",") if x.strip()]
    chosen = [c for c in CASES if not words or any(wd in c[0].lower() for wd in words)]
    root = args.keep or Path(tempfile.mkdtemp(prefix="fault-injection-"))
    root.mkdir(parents=True, exist_ok=True)
    w = World(root)
    rows = []
    for name, item, fn in chosen:
        ok, outcome, seconds = run_case(w, fn)
        rows.append((name, item, outcome, ok, seconds))
        print(
            f"{'ok  ' if ok else 'FAIL'} [{item}] {name} ({seconds:.0f} s): {outcome}",
            file=sys.stderr,
            flush=True,
        )
    print("| case | item | outcome | ok | s |\n|---|---|---|---|---|")
    for name, item, outcome, ok, seconds in rows:
        print(f"| {name} | {item} | {outcome.replace('|', '/')} | {'yes' if ok else 'NO'} | {seconds:.0f} |")
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if all(r[3] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
