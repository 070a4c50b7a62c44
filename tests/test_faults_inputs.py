"""Fault injection, round 3 (issue 27): damaged inputs are named, a full disk and a read-only
folder are one line that loses nothing, wrong folders for --tower / llava.llm / --from, import-tower's
refusals, and SIGTERM outside the training loop. Every case runs the real CLI entry point
(``llm2clip_vlm.cli.main``, in-process so a writer can be monkeypatched) on tiny inputs.

How a full disk is faked: the writer raises what the OS or the library raises on a full disk
(``OSError(ENOSPC)``; ``torch.save``'s ``RuntimeError``, with the disk's free space reported as 0
since that form carries no errno). How a read-only folder is faked: the tests run as root, for whom
``chmod`` does not stop writes, so ``os.open``/``os.mkdir``/``open`` raise ``OSError(EROFS)`` for
paths under the folder, as a read-only mount does.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from cli_inproc import one_line, run_main
from fault_world import World
from safetensors.torch import load_file, save_file

from llm2clip_vlm import resources


@pytest.fixture(scope="module")
def w(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("faults3")
    before = os.environ.get("LLM2CLIP_VLM_CACHE")
    os.environ["LLM2CLIP_VLM_CACHE"] = str(root / "cache")
    yield World(root)
    if before is None:
        os.environ.pop("LLM2CLIP_VLM_CACHE", None)
    else:
        os.environ["LLM2CLIP_VLM_CACHE"] = before


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- damaged model folders: --tower, llava.llm, --from ------------------------------------------
def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[:1000])


def _garbage(f: Path) -> None:
    f.write_bytes(os.urandom(5000))


def _bad_json(f: Path) -> None:
    f.write_text("{not json")


def _wrong_shape(f: Path) -> None:
    sd = load_file(str(f))
    key = next(k for k in sd if k.endswith("q_proj.weight"))
    sd[key] = torch.zeros(7, 5)
    save_file(sd, str(f), metadata={"format": "pt"})


def _pickle_only(f: Path) -> None:
    torch.save(load_file(str(f)), f.with_name("pytorch_model.bin"))
    f.unlink()


@pytest.mark.parametrize(
    ("part", "file", "damage", "code", "words"),
    [
        (
            "tower",
            "model.safetensors",
            _truncate,
            1,
            ("model.safetensors is not a readable safetensors file",),
        ),
        (
            "tower",
            "model.safetensors",
            _garbage,
            1,
            ("model.safetensors is not a readable safetensors file",),
        ),
        ("tower", "config.json", _bad_json, 1, ("config.json: not a readable JSON config",)),
        (
            "tower",
            "model.safetensors",
            _wrong_shape,
            1,
            ("q_proj.weight has shape [7, 5]", "describes [32, 32]"),
        ),
        ("tower", "model.safetensors", _pickle_only, 2, ("holds only pickled weights (pytorch_model.bin)",)),
        ("llm", "config.json", _bad_json, 1, ("config.json is not valid UTF-8 JSON",)),
        ("llm", "model.safetensors", _truncate, 1, ("model.safetensors is not a readable safetensors file",)),
    ],
    ids=[
        "tower-truncated",
        "tower-garbage",
        "tower-config",
        "tower-shape",
        "tower-pickle",
        "llm-config",
        "llm-truncated",
    ],  # fmt: skip
)
def test_a_damaged_tower_or_llm_is_named(w: World, part: str, file: str, damage, code: int, words) -> None:
    src = w.tower if part == "tower" else w.llm
    folder = w.copy(src, f"{part}-{damage.__name__}-{file}")
    damage(folder / file)
    out = w.root / f"out-{folder.name}"
    r = w.llava("pretrain", out, **{part: folder})
    one_line(r, code, str(folder), *words)
    assert not (out / "checkpoints").exists() and not (out / "model").exists()


def test_a_damaged_caption_encoder_is_named(w: World) -> None:
    enc = w.copy(w.encoder, "enc-damaged")
    _truncate(enc / "model.safetensors")
    r = run_main("embed", "-o", str(w.root / "store-enc-damaged"), *w.common(), f"--set=embed.encoder={enc}")
    one_line(r, 1, f"{enc}/model.safetensors is not a readable safetensors file")
    (enc / "llm2clip_encoder.json").write_bytes(b"\xff\xfe{")
    r = run_main("embed", "-o", str(w.root / "store-enc-damaged"), *w.common(), f"--set=embed.encoder={enc}")
    one_line(r, 1, f"{enc}/llm2clip_encoder.json: not valid JSON")


def test_a_tower_given_as_the_llm_and_the_reverse(w: World) -> None:
    r = w.llava("pretrain", w.root / "out-swap1", tower=w.llm)
    one_line(r, 1, f"{w.llm}/config.json", "no tower format for type 'llama'")
    r = w.llava("pretrain", w.root / "out-swap2", llm=w.tower)
    one_line(r, 1, f"LLM {w.tower}", "model_type 'clip_vision_model'", "not a causal language model")


def test_from_with_a_projector_of_other_shapes(w: World) -> None:
    pre = w.copy(w.pretrained, "pre-other")
    f = pre / "mm_projector.safetensors"
    save_file({k: torch.zeros(3, 3) for k in load_file(str(f))}, str(f))
    r = w.llava("finetune", w.root / "ft-other", "--from", str(pre))
    one_line(r, 1, f"pretrained projector {f}", "has shape [3, 3]", "pretrained with another tower or LLM")


# -- damaged data, stores, logs and caches --------------------------------------------------------
def test_utf16_llava_json_and_an_id_that_is_an_object(w: World) -> None:
    src = w.llava_data / "llava_pretrain.json"
    u16 = w.llava_data / "utf16.json"
    u16.write_bytes(src.read_text().encode("utf-16"))
    one_line(w.llava("pretrain", w.root / "o-u16", data=u16), 1, str(u16), "UTF-16 text, not UTF-8")
    records = json.loads(src.read_text())
    records[2]["id"] = {"a": 1}
    bad = w.llava_data / "id-object.json"
    bad.write_text(json.dumps(records))
    # The error line (the index's warning that counts the bad record repeats the reason).
    one_line(
        w.llava("pretrain", w.root / "o-id", data=bad), 1, "bad data:", f"{bad}[#2]",
        "'id' must be a string or a number",
    )  # fmt: skip


def test_a_damaged_store_manifest_is_named(w: World) -> None:
    store = w.copy(w.store, "store-damaged")
    (store / "train" / "manifest.json").write_text("{oops")
    r = w.stage2(w.root / "s2-damaged-store", store=store)
    one_line(r, 1, f"{store}/train/manifest.json", "not valid JSON")


def test_a_damaged_store_sidecar_is_redone_and_a_damaged_plan_named(w: World) -> None:
    store = w.copy(w.store, "store-sidecar")
    (store / "train" / "manifest.json").unlink()  # as if killed after the shard, before the manifest
    side = next((store / "train" / "shards").glob("*.json"))
    side.write_bytes(b"\xff\xfe\x00 not json")
    r = w.embed(store)
    assert r.code == 0 and f"shard sidecar {side} is damaged" in r.err, r.err[-3000:]
    assert _tree(store / "train") == _tree(w.store / "train")  # redone to the same bytes
    (store / "heldout-long" / "plan.json").write_bytes(b"\x92 garbage")
    (store / "heldout-long" / "manifest.json").unlink()
    r = w.embed(store)
    one_line(r, 1, f"{store}/heldout-long/plan.json: not valid JSON")


def _no_line_breaks(data: bytes) -> bytes:
    """Random bytes as one line: without \\n and \\r, both of which bytes.splitlines (the reader's) breaks at."""
    return bytes(b for b in data if b not in b"\n\r")


def test_random_bytes_in_metrics_jsonl_are_one_warning_and_resume_and_report_work(w: World) -> None:
    run = w.copy(w.stage2_run, "s2-metrics")
    m = run / "metrics.jsonl"
    good = m.read_bytes()
    # A damaged line inside the file (named), and a torn last line (a killed run's, silently left out).
    m.write_bytes(good + b"\x92\xff\x00garbage{{\n" + _no_line_breaks(os.urandom(64)) + b"\n")
    r = run_main("report", str(run), "-o", str(w.root / "metrics-report.html"))
    assert r.code == 0, r.err[-3000:]
    assert len([ln for ln in r.lines() if f"{m}: 1 damaged line(s) left out" in ln]) == 1, r.err
    r = w.stage2(run, "--set=stage2.loop.max_steps=3", "--allow-config-change")
    assert r.code == 0 and "Traceback" not in r.err, r.err[-3000:]
    steps = [json.loads(x)["step"] for x in m.read_text().splitlines() if '"train"' in x]
    assert steps == sorted(set(steps)) and steps[-1] == 3  # damaged lines gone, resumed steps appended


def test_a_damaged_index_cache_rebuilds_itself(w: World) -> None:
    assert w.store.is_dir()  # the caches exist
    index = Path(os.environ["LLM2CLIP_VLM_CACHE"]) / "index"
    arrows = sorted(index.glob("*/records.arrow"))
    assert arrows
    for f in arrows:
        f.write_bytes(os.urandom(100))
    r = w.embed(w.root / "store-idx1")
    assert r.code == 0, r.err[-3000:]
    # train + 2 held-out sets of this data (other tests' caches are not read here).
    assert sum("is damaged" in ln and "rebuilding it" in ln for ln in r.lines()) == 3, r.err
    for f in sorted(index.glob("*/meta.json")):
        f.write_bytes(b"\xff\xfe garbage")
    r = w.embed(w.root / "store-idx2")
    assert r.code == 0 and "rebuilding it" in r.err, r.err[-3000:]
    assert _tree(w.root / "store-idx2" / "train") == _tree(w.store / "train")  # same store as before


# -- import-tower ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def release(w: World) -> Path:
    from test_import_tower import released_tower

    released_tower(w.root / "release")
    return w.root / "release"


def _retype(release: Path, name: str, how: str) -> Path:
    out = release.with_name(f"release-{name}")
    if out.exists():
        return out
    import shutil

    shutil.copytree(release, out)
    f = out / "model.safetensors"
    sd = load_file(str(f))
    if how == "int64":
        sd["logit_scale"] = torch.tensor(4, dtype=torch.int64)
        save_file(sd, str(f))
    elif how == "nan":
        k = next(k for k in sd if k.endswith("fc1.weight"))
        sd[k][0, 0] = float("nan")
        save_file(sd, str(f))
    elif how == "lying":  # the header says one tensor is bigger than its bytes
        raw = bytearray(f.read_bytes())
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + n])
        k = next(k for k in header if k.endswith("fc1.weight"))
        header[k]["shape"] = [header[k]["shape"][0] * 2, header[k]["shape"][1]]
        text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
        assert len(text) == n
        f.write_bytes(bytes(raw[:8]) + text + bytes(raw[8 + n :]))
    elif how == "truncated":
        f.write_bytes(f.read_bytes()[:-100])
    return out


@pytest.mark.parametrize(
    ("how", "words"),
    [
        ("int64", "tensor 'logit_scale' is torch.int64, a weight must be floating point"),
        ("nan", "holds NaN or inf values"),
        ("lying", "not a readable safetensors file"),
        ("truncated", "is damaged: its header lists"),
    ],
)
def test_import_tower_refuses_what_it_cannot_trust(w: World, release: Path, how: str, words: str) -> None:
    src = _retype(release, how, how)
    out = w.root / f"imported-{how}"
    r = run_main("import-tower", str(src), "-o", str(out))
    one_line(r, 1, "import refused:", f"{src}/model.safetensors", words)
    assert not (out / "tower" / "model.safetensors").exists()


def test_import_and_export_refuse_an_unknown_dtype(w: World, release: Path) -> None:
    r = run_main("import-tower", str(release), "-o", str(w.root / "imp-int8"), "--dtype", "int8")
    one_line(r, 2, "--dtype must be one of fp32, bf16, fp16, got 'int8'")
    r = run_main("export-tower", str(w.stage2_run), "-o", str(w.root / "exp-int8"), "--dtype", "int8")
    one_line(r, 2, "--dtype must be one of")
    assert not (w.root / "imp-int8").exists() and not (w.root / "exp-int8").exists()


# -- a full disk, a read-only folder ----------------------------------------------------------------
def test_full_disk_in_torch_save_is_one_line_and_keeps_the_last_checkpoint(
    w: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llm2clip_vlm.training import checkpoint

    real = checkpoint._save_pickle

    def full_at_step_2(obj: object, path: Path) -> None:
        if path.parent.name == ".tmp-step-0000002":  # what torch.save raises when the disk fills
            raise RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 320 vs 256")
        real(obj, path)

    monkeypatch.setattr(checkpoint, "_save_pickle", full_at_step_2)
    monkeypatch.setattr(resources, "free_bytes", lambda path: 0)
    out = w.root / "s2-full"
    r = w.stage2(out)
    line = one_line(
        r, 1, "could not write checkpoint", "no space left on its disk", "needs about", "0 B free"
    )
    assert "step-0000001 is intact" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001"]
    monkeypatch.undo()
    r = w.stage2(out)  # room again: resumes from step 1 and finishes
    assert r.code == 0 and "resum" in r.err.lower(), r.err[-3000:]


def test_full_disk_when_the_final_model_is_saved(w: World, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors import SafetensorError

    from llm2clip_vlm.vision import model

    def full(*_a: object, **_k: object) -> None:  # safetensors' form: no errno
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(model, "save_file", full)
    monkeypatch.setattr(resources, "free_bytes", lambda path: 0)
    out = w.root / "s2-full-final"
    r = w.stage2(out)
    one_line(r, 1, f"{out}/model: no space left on its disk", "needs about")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001", "step-0000002"]
    monkeypatch.undo()
    r = w.stage2(out)  # room again: the finished checkpoints are used, the model written
    assert r.code == 0 and (out / "model" / "model.safetensors").is_file(), r.err[-3000:]


def test_full_disk_in_export_tower(w: World, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import PreTrainedModel

    def full(*_a: object, **_k: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    run = w.stage2_run  # built before the disk fills
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    out = w.root / "exported-full" / "tower"
    r = run_main("export-tower", str(run), "-o", str(out))
    one_line(r, 1, "no space left on its disk", "needs about")
    assert (w.stage2_run / "model" / "model.safetensors").is_file()  # the run is untouched


def _enospc(*_a: object, **_k: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_while_embedding_names_the_shard_and_keeps_the_finished_ones(
    w: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llm2clip_vlm.store import format as fmt

    calls = [0]
    real = fmt.np.save

    def full_after_one(f, array, **k):  # the first shard is written, the second fills the disk
        calls[0] += 1
        if calls[0] > 1:
            _enospc()
        real(f, array, **k)

    monkeypatch.setattr(fmt.np, "save", full_after_one)
    out = w.root / "store-full"
    r = w.embed(out, "--set=embed.shard_size=40")
    one_line(r, 1, f"{out}/", ".npy: no space left on its disk", "needs about")
    assert not list(out.rglob("*.partial"))
    kept = sorted(p.name for p in out.rglob("*.npy"))
    assert len(kept) == 1
    monkeypatch.undo()
    assert w.embed(out, "--set=embed.shard_size=40").code == 0


def test_full_disk_in_llava_shards_and_report(w: World, monkeypatch: pytest.MonkeyPatch) -> None:
    import tarfile

    monkeypatch.setattr(tarfile.TarFile, "addfile", _enospc)
    out = w.root / "shards-full"
    r = run_main(
        "llava-shards", str(w.llava_data / "llava_pretrain.json"), "-o", str(out), "--per-shard", "4"
    )
    one_line(r, 1, f"{out}/llava-000000.tar: no space left on its disk")
    assert not list(out.glob("*.tar")) and not list(out.glob("*.tmp"))
    monkeypatch.undo()
    real = Path.write_text

    def full(self: Path, *a: object, **k: object) -> int:
        if self.suffix == ".tmp":
            _enospc()
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", full)
    r = run_main("report", str(w.stage2_run), "-o", str(w.root / "full-report.html"))
    one_line(r, 1, "no space left on its disk")


@pytest.fixture
def read_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Path]]:
    """Folders to treat as a read-only mount: writes under them raise EROFS (root ignores chmod)."""
    folders: list[Path] = []

    def under(path: object) -> bool:
        try:
            p = Path(os.fsdecode(path)).absolute()  # type: ignore[arg-type]
        except TypeError:
            return False
        return any(p == f or f in p.parents for f in folders)

    def refuse(path: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system", os.fsdecode(path))  # type: ignore[arg-type]

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def fake_open(file, mode="r", *a, **k):  # type: ignore[no-untyped-def]
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+") and under(file):
            refuse(file)
        return real_open(file, mode, *a, **k)

    def fake_os_open(path, flags, *a, **k):  # type: ignore[no-untyped-def]
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and under(path):
            refuse(path)
        return real_os_open(path, flags, *a, **k)

    def fake_mkdir(path, *a, **k):  # type: ignore[no-untyped-def]
        if under(path) and not Path(os.fsdecode(path)).is_dir():
            refuse(path)
        return real_mkdir(path, *a, **k)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)
    yield folders


@pytest.mark.parametrize("command", ["stage2", "embed", "llava-shards", "report"])
def test_a_read_only_output_folder_is_one_line(w: World, read_only: list[Path], command: str) -> None:
    assert w.store and w.stage2_run and w.llava_data  # built before the folder goes read-only
    ro = w.root / f"ro-{command}"
    ro.mkdir()
    read_only.append(ro)
    out = ro / "out"
    if command == "stage2":
        r = w.stage2(out)
    elif command == "embed":
        r = w.embed(out)
    elif command == "llava-shards":
        r = run_main("llava-shards", str(w.llava_data / "llava_pretrain.json"), "-o", str(out))
    else:
        r = run_main("report", str(w.stage2_run), "-o", str(out / "r.html"))
    one_line(r, 1, str(ro), "cannot write here (Read-only file system)", "choose a writable output folder")
    assert list(ro.iterdir()) == []


# -- SIGTERM outside the training loop --------------------------------------------------------------
def _sigterm(*_a: object, **_k: object) -> None:
    os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("phase", ["start-up", "embed", "evaluation", "llava-shards"])
def test_sigterm_outside_the_loop_is_one_line_and_143(
    w: World, monkeypatch: pytest.MonkeyPatch, phase: str
) -> None:
    from llm2clip_vlm import cli
    from llm2clip_vlm.data import llava_shards as shards
    from llm2clip_vlm.store import writer
    from llm2clip_vlm.vision import train

    assert w.store and w.llava_data
    if phase == "start-up":
        real = cli.resolve_config
        monkeypatch.setattr(cli, "resolve_config", lambda *a: (_sigterm(), real(*a))[1])
        r = w.stage2(w.root / "term-start")
    elif phase == "embed":
        real_enc = writer._encode_shards
        monkeypatch.setattr(writer, "_encode_shards", lambda *a, **k: (_sigterm(), real_enc(*a, **k))[1])
        r = w.embed(w.root / "term-embed")
    elif phase == "evaluation":
        real_eval = train.evaluate_retrieval
        monkeypatch.setattr(train, "evaluate_retrieval", lambda *a, **k: (_sigterm(), real_eval(*a, **k))[1])
        r = w.stage2(w.root / "term-eval")
    else:
        real_write = shards._write_tar
        monkeypatch.setattr(shards, "_write_tar", lambda *a: (_sigterm(), real_write(*a))[1])
        out = w.root / "term-shards"
        r = run_main(
            "llava-shards", str(w.llava_data / "llava_pretrain.json"), "-o", str(out), "--per-shard", "4"
        )
        assert not list(out.glob("*.tar")) and not list(out.glob("*.tmp"))
    one_line(r, 143, "stopped by SIGTERM", "run the same command again")
