"""Issue 27, items 1-3, through the real CLI entry point: every rerun knows its inputs, an output
folder has one owner (a lock, run.json at start), and build-tower never reuses a changed artifact.

Each test drives ``python -m llm2clip_vlm.cli`` on the tiny world of ``tests/fault_injection.py``
and asserts the one line, the exit status, and that nothing was lost or reused stale.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import fault_injection as fi
import pytest


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    yield fi.World(tmp_path_factory.mktemp("run-identity"))


def _tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its sha256 (what "nothing changed" compares)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _flip(path: Path, offset: int | None = None, n: int = 8) -> None:
    data = bytearray(path.read_bytes())
    start = len(data) // 2 if offset is None else offset
    for i in range(start, start + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _popen(*args: str):  # noqa: ANN202 - a Popen-like (tests/cli_fork.py)
    return fi.start(*args)


# -- one owner per output folder -----------------------------------------------------------------
@pytest.mark.slow  # 3 CLI processes (one killed): ~7 s on 2 busy cores (forked, tests/cli_fork.py)
def test_killed_stage1_still_owns_its_folder_and_stage2_is_refused(world, tmp_path: Path) -> None:
    out = tmp_path / "x"
    data = world.copy_data("data-stage1")
    args = [
        "stage1",
        "-o",
        str(out),
        f"--set=stage1.model={world.llm}",
        *world.common(data),
        *fi.sets(fi.STAGE1_TINY),
    ]
    # Killed as soon as it has started (run.json says `running`, before any checkpoint). The tiny
    # run can finish between two polls (it did in CI), so this process stops right after it marks
    # itself started, and waits there to be killed.
    hang = (
        "import time, llm2clip_vlm.run_dir as rd\n"
        "_started = rd.Claim.started\n"
        "def started(self):\n    _started(self)\n    time.sleep(600)\n"
        "rd.Claim.started = started\n"
    )
    code = f"import sys\n{hang}from llm2clip_vlm.cli import main\nsys.argv = {['llm2clip-vlm', *args]!r}\nmain()\n"
    p = fi.start(code=code)
    deadline = time.time() + 300
    while (
        time.time() < deadline
        and json.loads((out / "run.json").read_text() if (out / "run.json").is_file() else "{}").get("status")
        != "running"
    ):
        time.sleep(0.2)
    p.kill()
    p.wait()
    owner = json.loads((out / "run.json").read_text())
    assert owner["command"] == "stage1" and owner["status"] == "running" and owner["pid"] == p.pid
    before = _tree(out)
    r = world.stage2(out, data=data)
    line = fi.expect_one_line(r, 2, "holds a `stage1` run", "`stage2` will not resume")
    assert str(out) in line
    assert _tree(out) == before  # nothing of stage 1's was touched, nothing claimed
    # ... and stage 1 resumes in its own folder.
    r = fi.cli(*args)
    assert r.code == 0, r.err[-2000:]
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    # Its captions edited: the rerun refuses to call the old encoder current, naming the file.
    manifest = data / "train.jsonl"
    lines = manifest.read_text().splitlines()
    rec = json.loads(lines[2])
    rec["short_captions"][0] = "an edited caption: " + rec["short_captions"][0]
    lines[2] = json.dumps(rec)
    manifest.write_text("\n".join(lines) + "\n")
    finished = _tree(out)
    r = fi.cli(*args)
    fi.expect_one_line(r, 2, "made from other inputs", "train.jsonl changed", "--restart")
    assert _tree(out) == finished


@pytest.mark.slow  # 2 concurrent stage-2 runs + 1 refused one: ~5 s on 2 busy cores
def test_one_writer_per_folder_and_a_refused_command_writes_nothing(world, tmp_path: Path) -> None:
    out = tmp_path / "s2"
    # A refused command (missing --store) claims nothing: the folder is not even created.
    r = world.stage2(out, store=tmp_path / "no-store")
    fi.expect_one_line(r, 1, "no-store")
    assert not out.exists()

    first = _popen("stage2", "-o", str(out), f"--store={world.store}", *world.common(), *fi.sets(fi.STAGE2_TINY),
                   "--set=stage2.lr=0.001")  # fmt: skip
    time.sleep(2)
    second = _popen("stage2", "-o", str(out), f"--store={world.store}", *world.common(), *fi.sets(fi.STAGE2_TINY),
                    "--set=stage2.lr=0.005")  # fmt: skip
    runs = {}
    for name, p in (("first", first), ("second", second)):
        o, e = p.communicate(timeout=600)
        runs[name] = fi.Run(p.returncode, o, e)
    codes = sorted(r.code for r in runs.values())
    assert codes == [0, 2], {k: (r.code, r.err[-800:]) for k, r in runs.items()}
    winner = "first" if runs["first"].code == 0 else "second"
    loser = runs["second" if winner == "first" else "first"]
    # The loser is refused by the lock while the winner runs; on a loaded machine the winner may
    # already have finished when the loser starts, and then its finished run refuses the other
    # config. Either way one run wrote the folder (the lock itself: test_claim_lock_refuses_a_second_writer_but_not_other_ranks).
    lines = [ln for ln in loser.err.splitlines() if "is in use by `stage2` (pid" in ln]
    if lines:
        assert "one run writes a folder at a time" in lines[0]
    else:
        fi.expect_one_line(loser, 2, "another config", "--restart")
    lr = {"first": 0.001, "second": 0.005}[winner]
    cfg = (out / "config.yaml").read_text()
    assert f"lr: {lr}" in cfg  # config.yaml is the run's that wrote the weights
    owner = json.loads((out / "run.json").read_text())
    assert owner["status"] == "complete" and owner["outputs"]  # checksums of model/ for export-tower

    # The same folder refused again (changed config): run.json stays the finished run's.
    before = _tree(out)
    r = world.stage2(out, "--set=stage2.lr=0.01")
    fi.expect_one_line(r, 2, "another config", "--restart")
    assert _tree(out) == before


# -- every stage knows its inputs ----------------------------------------------------------------
@pytest.mark.slow  # 4 stage-2 processes: ~5 s on 2 busy cores
def test_stage2_rerun_refuses_changed_images_and_encoder_until_restart(world, tmp_path: Path) -> None:
    data = world.copy_data("data-images")
    out = tmp_path / "s2"
    r = world.stage2(out, data=data)
    assert r.code == 0, r.err[-2000:]
    owner = json.loads((out / "run.json").read_text())
    assert set(owner["inputs"]) == {"data", "images", "store", "encoder", "backbone"}
    # An image overwritten in place (same name, other content): refused, naming the images.
    image = (
        sorted((data / "images").rglob("*.png"))[3]
        if (data / "images").is_dir()
        else sorted(data.rglob("*.png"))[3]
    )
    other = sorted(image.parent.glob("*.png"))[0]
    image.write_bytes(other.read_bytes())
    before = _tree(out)
    r = world.stage2(out, data=data)
    line = fi.expect_one_line(r, 2, "made from other inputs", "images", "--restart")
    assert str(out) in line
    assert _tree(out) == before  # refused: nothing claimed or rewritten
    # --restart starts over from the new inputs.
    r = world.stage2(out, "--restart", data=data)
    assert r.code == 0, r.err[-2000:]
    assert json.loads((out / "run.json").read_text())["inputs"]["images"] != owner["inputs"]["images"]


@pytest.mark.slow  # 1 export on a tampered stage-2 run: ~3 s
def test_export_tower_refuses_a_stage2_model_changed_after_it_was_written(world, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "s2"
    shutil.copytree(world.stage2_run, run)
    _flip(run / "model" / "vision" / "model.safetensors")
    r = fi.cli("export-tower", str(run), "-o", str(tmp_path / "tower"))
    line = fi.expect_one_line(r, 2, "was changed after it was written", "model.safetensors")
    assert "sha256 differs" in line
    assert not (tmp_path / "tower").exists()  # refused before anything was exported


def _llava_args(w: object, parts: dict[str, Path], phase: str, out: Path, *extra: str) -> list[str]:
    name = "llava_pretrain.json" if phase == "pretrain" else "llava_instruct.json"
    p = f"llava.{phase}"
    sets = [
        f"llava.tower={parts['tower']}", f"llava.llm={parts['llm']}", f"{p}.data.path={parts['data'] / name}",
        f"{p}.batch_size=8", f"{p}.micro_batch_size=4", f"{p}.num_workers=0", f"{p}.loop.precision=fp32",
        f"{p}.loop.max_steps=2", f"{p}.eval_max_new_tokens=2", f"{p}.lr=1e-3", f"{p}.loop.warmup_ratio=0",
        f"{p}.gradient_checkpointing=false", f"{p}.loop.save_every_steps=1",
    ]  # fmt: skip
    return [f"llava-{phase}", "-o", str(out), *fi.sets(sets), *extra]


@pytest.fixture(scope="module")
def llava_parts(world) -> dict[str, Path]:
    from llm2clip_vlm.data.synthetic_llava import write_llava_demo
    from llm2clip_vlm.text.tiny import save_tiny_llm
    from llm2clip_vlm.tower.synthetic import TowerShape, save_random_tower

    root = world.root / "llava-parts"
    write_llava_demo(root / "data", pretrain_images=16, instruct_images=16, heldout_images=4, image_size=32)
    return {
        "tower": save_random_tower(root / "tower", "clip", TowerShape(32, 8, 32, 3, 2, 64), seed=1),
        "other_tower": save_random_tower(root / "tower2", "clip", TowerShape(32, 8, 32, 3, 2, 64), seed=2),
        "llm": save_tiny_llm(root / "llm", hidden_size=64, seed=2),
        "data": root / "data",
    }


@pytest.mark.slow  # 5 tiny LLaVA processes: ~13 s on 2 busy cores
def test_llava_reruns_refuse_changed_captions_tower_and_projector(world, llava_parts, tmp_path: Path) -> None:
    import shutil

    parts = dict(llava_parts)
    data = tmp_path / "data"
    shutil.copytree(parts["data"], data)
    tower = tmp_path / "tower"
    shutil.copytree(parts["tower"], tower)
    parts.update(data=data, tower=tower)
    pre = tmp_path / "pre"
    r = fi.cli(*_llava_args(world, parts, "pretrain", pre))
    assert r.code == 0, r.err[-2000:]
    trained = _tree(pre)

    # Every caption of the JSON changed: refused, naming the file; the model is untouched.
    js = data / "llava_pretrain.json"
    original, st = js.read_bytes(), js.stat()
    records = json.loads(original)
    for rec in records:
        rec["conversations"][-1]["value"] = "changed: " + rec["conversations"][-1]["value"]
    js.write_text(json.dumps(records))
    r = fi.cli(*_llava_args(world, parts, "pretrain", pre))
    line = fi.expect_one_line(r, 2, "made from other inputs", "llava_pretrain.json changed", "--restart")
    assert _tree(pre) == trained
    # The tower replaced by another of the same shape: refused, naming its weights.
    js.write_bytes(original)
    os.utime(js, ns=(st.st_atime_ns, st.st_mtime_ns))  # the captions exactly as they were
    shutil.copy(parts["other_tower"] / "model.safetensors", tower / "model.safetensors")
    r = fi.cli(*_llava_args(world, parts, "pretrain", pre))
    line = fi.expect_one_line(r, 2, "made from other inputs", "tower:", "model.safetensors changed")
    assert "llava_pretrain.json" not in line.split("(")[1]  # the restored captions are not named
    assert _tree(pre) == trained

    # llava-finetune into llava-pretrain's folder: refused, naming the owner.
    r = fi.cli(*_llava_args(world, parts, "finetune", pre, f"--from={pre}"))
    fi.expect_one_line(r, 2, "`llava-pretrain`", "`llava-finetune` will not resume")
    assert _tree(pre) == trained

    # llava-finetune from a projector that is later replaced: the rerun refuses it.
    shutil.copy(llava_parts["tower"] / "model.safetensors", tower / "model.safetensors")
    projector = tmp_path / "projector.safetensors"
    shutil.copy(pre / "mm_projector.safetensors", projector)
    ft = tmp_path / "ft"
    r = fi.cli(
        *_llava_args(
            world, parts, "finetune", ft, f"--from={projector}", "--set=llava.finetune.loop.max_steps=1"
        )
    )
    assert r.code == 0, r.err[-2000:]
    _flip(projector, n=16)
    r = fi.cli(
        *_llava_args(
            world, parts, "finetune", ft, f"--from={projector}", "--set=llava.finetune.loop.max_steps=1"
        )
    )
    fi.expect_one_line(r, 2, "made from other inputs", "projector:", "projector.safetensors changed")


# -- build-tower never reuses a changed artifact -------------------------------------------------
@pytest.mark.slow  # one tiny build + 3 partial rebuilds: ~20 s on 2 busy cores
def test_build_tower_rebuilds_changed_artifacts_and_follows_the_license(world, tmp_path: Path) -> None:
    run = tmp_path / "bt"
    r = world.build(run)
    assert r.code == 0, r.err[-2000:]
    stamps = {
        d: json.loads((run / d / "stage.json").read_text()) for d in ("stage1", "store", "stage2", "tower")
    }
    assert all(s["outputs"] for s in stamps.values())
    tower = (run / "tower" / "model.safetensors").read_bytes()

    # Bytes flipped inside stage 2's model: stage 2 runs again, the corrupted weight never ships.
    _flip(run / "stage2" / "model" / "vision" / "model.safetensors")
    r = world.build(run)
    assert r.code == 0, r.err[-2000:]
    assert "stage2: its artifact was changed after it was written" in r.err
    assert (run / "tower" / "model.safetensors").read_bytes() == tower  # deterministic retrain, not the flip
    assert r.text.count("skipped") == 2  # stage1, embed

    # A bit flip in the stage-1 encoder: stage 1 runs again (not embed/stage 2 on a corrupted encoder).
    weights = sorted((run / "stage1" / "encoder").glob("*.safetensors"))[0]
    _flip(weights, n=1)
    r = world.build(run)
    assert r.code == 0, r.err[-2000:]
    assert "stage1: its artifact was changed after it was written" in r.err
    assert r.text.count("skipped") == 3  # the retrained encoder is the same: embed, stage2, export kept

    # A changed hub.license: only the export runs again, and the card says so.
    assert "license: apache-2.0" in (run / "tower" / "README.md").read_text()
    r = world.build(run, "--set=hub.license=mit")
    assert r.code == 0, r.err[-2000:]
    card = (run / "tower" / "README.md").read_text()
    assert "license: mit" in card and "apache-2.0" not in card
    assert r.text.count("skipped") == 3


def test_stage_inputs_cover_gguf_files_and_the_text_corpus_tree(tmp_path: Path) -> None:
    """In-process (fast): the fingerprints of a GGUF base model and of a nested corpus file."""
    from llm2clip_vlm import config_io
    from llm2clip_vlm.pipeline import stage_fingerprint, stage_inputs
    from llm2clip_vlm.recipe import RunConfig

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(bytes(range(256)) * 64)
    corpus = tmp_path / "corpus" / "sub" / "deeper"
    corpus.mkdir(parents=True)
    (corpus / "a.txt").write_text("a line of text that is long enough to count\n" * 4)
    cfg = config_io.load(
        RunConfig, None, [f"stage1.model={gguf}", f"data.text_corpus=[{tmp_path / 'corpus'}]",
                          f"data.demo_dir={tmp_path / 'none'}"]
    )  # fmt: skip
    dirs = {
        "stage1": tmp_path / "s1",
        "embed": tmp_path / "st",
        "stage2": tmp_path / "s2",
        "export": tmp_path / "t",
    }

    def fp() -> str:
        return stage_fingerprint(cfg, "stage1", "", stage_inputs(cfg, "stage1", dirs))

    first = fp()
    assert str(gguf) in stage_inputs(cfg, "stage1", dirs)["base_model"]
    _flip(gguf, offset=100, n=64)  # 64 bytes flipped inside the GGUF file
    second = fp()
    assert second != first
    (corpus / "a.txt").write_text("an edited line of text, long enough to count\n" * 4)
    assert fp() != second


# -- the pieces, in-process (fast) ---------------------------------------------------------------
def test_claim_lock_refuses_a_second_writer_but_not_other_ranks(tmp_path: Path, monkeypatch) -> None:
    from llm2clip_vlm.errors import RunDirError
    from llm2clip_vlm.run_dir import claimed

    out = tmp_path / "run"
    with claimed(out, "stage2", started=True) as claim:
        doc = json.loads((out / "run.json").read_text())
        assert doc["command"] == "stage2" and doc["status"] == "running" and doc["pid"] == os.getpid()
        # flock is per open file: a second claim (even from this process) is refused, naming the holder.
        with pytest.raises(RunDirError, match=rf"is in use by `stage2` \(pid {os.getpid()}"):
            with claimed(out, "stage2"):
                pass
        assert json.loads((out / "run.json").read_text()) == doc  # the refused claim wrote nothing
        # Another rank of the same multi-process run follows the main one: no lock, no write.
        monkeypatch.setenv("RANK", "1")
        with claimed(out, "stage2") as other:
            assert not other.main
        monkeypatch.delenv("RANK")
        claim.record_outputs([])
    assert json.loads((out / "run.json").read_text())["status"] == "complete"


def test_a_claim_refused_before_it_started_leaves_the_folder_as_it_was(tmp_path: Path) -> None:
    from llm2clip_vlm.errors import RunDirError
    from llm2clip_vlm.run_dir import claimed

    new = tmp_path / "new"
    with pytest.raises(FileNotFoundError):
        with claimed(new, "stage2"):
            raise FileNotFoundError("no store")
    assert not new.exists()
    old = tmp_path / "old"
    with claimed(old, "stage2") as c:
        c.inputs({"data": {"a.jsonl": "1"}})
        c.started()
        (old / "checkpoints" / "step-0000001").mkdir(parents=True)
        (old / "checkpoints" / "step-0000001" / "checkpoint.json").write_text("{}")
    before = _tree(old)
    with pytest.raises(RunDirError, match=r"other inputs \(data: a.jsonl changed\).*--restart"):
        with claimed(old, "stage2") as c:
            c.inputs({"data": {"a.jsonl": "2"}})
    assert _tree(old) == before
    with pytest.raises(RunDirError, match="holds a `stage2` run .*`stage1` will not resume"):
        with claimed(old, "stage1"):
            pass
    assert _tree(old) == before
    with claimed(old, "stage2", restart=True) as c:  # --restart: the old run is discarded
        assert not (old / "checkpoints").exists()
        c.inputs({"data": {"a.jsonl": "2"}})
