"""Fault injection: kills, a full disk, NaN, corrupt shards and images, unsafe inputs, a user's run.

The kill tests SIGKILL a training process (tests/fault_driver.py) in the middle of a step and in
the middle of a checkpoint write, resume, and require bit-identical weights to an uninterrupted run.
"""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import struct
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path

import cli_fork
import numpy as np
import pytest
import torch
from fault_driver import run_stage1, run_stage2
from PIL import Image
from safetensors.torch import load_file

from llm2clip_vlm import config_io
from llm2clip_vlm.data import DataError, load_caption_set
from llm2clip_vlm.data.config import CaptionSetConfig
from llm2clip_vlm.data.images import load_rgb
from llm2clip_vlm.recipe import RunConfig
from llm2clip_vlm.signals import TrainingInterrupted
from llm2clip_vlm.text.tiny import save_tiny_llm
from llm2clip_vlm.training import checkpoint as checkpointing
from llm2clip_vlm.training.checkpoint import Checkpointer, CheckpointWriteError
from llm2clip_vlm.training.guards import NonFiniteError
from llm2clip_vlm.training.losses import ClipLoss

DRIVER = Path(__file__).with_name("fault_driver.py")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Same thread count as the driver processes: bit-identical float sums need the same split."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _drive(*args: object, killed: bool) -> None:
    """``python tests/fault_driver.py ARGS`` in a new process (forked from tests/cli_fork.py's server,
    one torch thread), which the driver SIGKILLs where asked."""
    code = (
        f"import runpy, sys\nsys.path.insert(0, {str(DRIVER.parent)!r})\nsys.argv = [{str(DRIVER)!r}, *sys.argv[1:]]\n"
        f"runpy.run_path({str(DRIVER)!r}, run_name='__main__')\n"
    )
    rc, _, err = cli_fork.run([str(a) for a in args], code=code)
    if killed:
        assert rc == -signal.SIGKILL, err[-3000:]
    else:
        assert rc == 0, err[-3000:]


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step-{step:07d}" / "model.safetensors"))


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


# --------------------------------------------------------------------------------------------
# Kill at any step, resume, same weights
# --------------------------------------------------------------------------------------------
@pytest.mark.slow  # 3 tiny stage-1 runs, 2 of them in fresh processes: ~10-20 s on 2 shared cores
def test_stage1_sigkill_mid_step_and_mid_checkpoint_resumes_bit_identically(tmp_path: Path) -> None:
    model = save_tiny_llm(tmp_path / "llama")
    full = run_stage1(model, tmp_path / "full")
    cut = tmp_path / "cut"
    # Killed during step 3 (MNTP done and checkpointed, SimCSE checkpoint at step 2).
    _drive("stage1", model, cut, "--kill-at-loss", 3, killed=True)
    assert Checkpointer(cut / "checkpoints").latest().name == "step-0000002"  # type: ignore[union-attr]
    # Restarted, then killed half-way through writing the final (step 4) checkpoint.
    _drive("stage1", model, cut, "--kill-in-save", 4, killed=True)
    assert Checkpointer(cut / "checkpoints").latest().name == "step-0000002"  # type: ignore[union-attr]
    assert list((cut / "checkpoints").glob(".tmp-step-0000004"))  # the half-written one, ignored
    resumed = run_stage1(model, cut)
    _assert_identical(_weights(tmp_path / "full", 4), _weights(cut, 4))
    assert (
        resumed["train"]["losses"] == full["train"]["losses"]
        and resumed["details"]["encoder_identity"] == full["details"]["encoder_identity"]
    )
    assert not list((cut / "checkpoints").glob(".tmp-*"))


@pytest.mark.slow  # 3 tiny stage-2 runs, 2 in fresh processes: ~5-10 s on 2 shared cores
def test_stage2_sigkill_mid_step_and_mid_checkpoint_resumes_bit_identically(tmp_path: Path) -> None:
    full = run_stage2(tmp_path / "data", tmp_path / "full")
    cut = tmp_path / "cut"
    _drive("stage2", tmp_path / "data", cut, "--kill-at-loss", 4, killed=True)  # during step 4
    assert Checkpointer(cut / "checkpoints").latest().name == "step-0000002"  # type: ignore[union-attr]
    _drive("stage2", tmp_path / "data", cut, "--kill-in-save", 4, killed=True)
    assert Checkpointer(cut / "checkpoints").latest().name == "step-0000002"  # type: ignore[union-attr]
    resumed = run_stage2(tmp_path / "data", cut)
    _assert_identical(_weights(tmp_path / "full", 5), _weights(cut, 5))
    assert resumed["train"]["losses"] == full["train"]["losses"]
    assert resumed["eval"]["after"] == full["eval"]["after"]


def test_stage2_sigterm_saves_then_exits_and_resumes_identically(tmp_path: Path) -> None:
    full = run_stage2(tmp_path / "data", tmp_path / "full", ["stage2.loop.max_steps=3"])

    def sigterm(step: int, loss: float) -> None:
        if step == 1:  # arrives mid-run; the step finishes, a checkpoint is written, then it stops
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted, match="SIGTERM.*step-0000001") as e:
        run_stage2(tmp_path / "data", tmp_path / "cut", ["stage2.loop.max_steps=3"], on_step=sigterm)
    assert e.value.exit_code == 143
    resumed = run_stage2(tmp_path / "data", tmp_path / "cut", ["stage2.loop.max_steps=3"])
    assert resumed["train"]["losses"] == full["train"]["losses"]
    _assert_identical(_weights(tmp_path / "full", 3), _weights(tmp_path / "cut", 3))


# --------------------------------------------------------------------------------------------
# Full disk, NaN
# --------------------------------------------------------------------------------------------
def test_full_disk_during_training_keeps_the_last_checkpoint(tmp_path: Path, monkeypatch) -> None:
    save = checkpointing._save_tensors

    def disk_full_at_step_4(tensors: dict, path: Path, metadata: object = None) -> None:
        if path.parent.name == ".tmp-step-0000004":
            raise OSError(errno.ENOSPC, "No space left on device")
        save(tensors, path, metadata)

    monkeypatch.setattr(checkpointing, "_save_tensors", disk_full_at_step_4)
    with pytest.raises(
        CheckpointWriteError, match=r"step-0000004.*no space left on its disk.*step-0000002 is intact"
    ):
        run_stage2(tmp_path / "data", tmp_path / "run")
    ckpts = Checkpointer(tmp_path / "run" / "checkpoints")
    assert [p.name for p in ckpts.complete()] == ["step-0000002"]
    assert ckpts.load() is not None  # usable


def _nan_at_call(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    forward, calls = ClipLoss.forward, [0]

    def poisoned(self: ClipLoss, *a: object, **k: object) -> torch.Tensor:
        calls[0] += 1
        loss = forward(self, *a, **k)
        return loss * float("nan") if calls[0] == n else loss

    monkeypatch.setattr(ClipLoss, "forward", poisoned)


def test_nan_loss_stops_naming_the_step_and_keeps_the_good_checkpoint(tmp_path: Path, monkeypatch) -> None:
    _nan_at_call(monkeypatch, 3)
    with pytest.raises(NonFiniteError, match=r"stage2: loss is nan at step 3.*skip_nonfinite_steps"):
        run_stage2(tmp_path / "data", tmp_path / "run")
    resumed = Checkpointer(tmp_path / "run" / "checkpoints").load()
    assert resumed is not None and resumed.step == 2
    assert all(bool(torch.isfinite(t).all()) for t in resumed.weights.values())


def test_nan_loss_step_is_skipped_when_asked(tmp_path: Path, monkeypatch) -> None:
    _nan_at_call(monkeypatch, 3)
    m = run_stage2(tmp_path / "data", tmp_path / "run", ["reliability.skip_nonfinite_steps=true"])
    assert m["train"]["skipped_steps"] == [3] and m["train"]["steps"] == 5
    assert all(bool(torch.isfinite(t).all()) for t in _weights(tmp_path / "run", 5).values())


# --------------------------------------------------------------------------------------------
# Corrupt store shard
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small demo world, a tiny stage-1 encoder and its embedding stores (the `embed` output)."""
    from store_driver import make_encoder_dir

    from llm2clip_vlm.commands import run_embed
    from llm2clip_vlm.data.synthetic import write_demo_dataset

    root = tmp_path_factory.mktemp("demo-run")
    write_demo_dataset(root / "data", seed=0, train_images=32, heldout_images=16, show_progress=False)
    enc = make_encoder_dir(root / "enc")
    cfg = config_io.load(RunConfig, None, _demo_overrides(root / "data") + [f"embed.encoder={enc}"])
    run_embed(cfg, root / "store")
    return {"data": root / "data", "enc": enc, "store": root / "store"}


def _demo_overrides(data: Path) -> list[str]:
    return [
        f"data.demo_dir={data}", "data.demo_train_images=32", "data.demo_heldout_images=16",
        "embed.batch_size=16", "embed.precision=fp32", "embed.dtype=fp32",
    ]  # fmt: skip


def test_corrupt_store_shard_is_refused_by_stage2(demo_run: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    from llm2clip_vlm.commands import run_stage2 as stage2
    from llm2clip_vlm.store.reader import StoreMismatchError

    store = tmp_path / "store"
    shutil.copytree(demo_run["store"], store)
    shard = sorted((store / "train").rglob("*.npy"))[-1]
    if shard.name.startswith(("caption", "image")):
        shard = next(p for p in sorted((store / "train").rglob("*.npy")) if "shard" in p.name)
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit of one embedding
    shard.write_bytes(bytes(data))
    cfg = config_io.load(RunConfig, None, _demo_overrides(demo_run["data"]))
    with pytest.raises(StoreMismatchError, match=rf"shard .*{shard.name} is corrupt"):
        stage2(cfg, tmp_path / "s2", store_dir=store, encoder_dir=demo_run["enc"])


# --------------------------------------------------------------------------------------------
# Images of every broken kind
# --------------------------------------------------------------------------------------------
def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png(side: int = 30_000) -> bytes:
    """A 1-bit PNG claiming side x side pixels (900 M), a few KB on disk."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = b"\x00" + b"\x00" * (side // 8)
    idat = zlib.compress(row * 64, 9)  # the header lies: data for 64 rows only
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_image_modes_convert_as_documented(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 255, 0))  # fully transparent blue -> white background
    out = load_rgb(_png_bytes(rgba), "rec")
    assert (
        out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (255, 0, 0)
    )
    la = Image.new("LA", (2, 2), (0, 0))
    assert load_rgb(_png_bytes(la)).getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (2, 2), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.info["transparency"] = 0
    buf = io.BytesIO()
    pal.save(buf, format="PNG", transparency=0)
    assert load_rgb(buf.getvalue()).getpixel((0, 0)) == (0, 255, 0)
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # pure red in CMYK
    buf = io.BytesIO()
    cmyk.save(buf, format="JPEG", quality=100)
    r, g, b = load_rgb(buf.getvalue()).getpixel((0, 0))
    assert r > 200 and g < 60 and b < 60
    sixteen = Image.fromarray(np.array([[0, 32768], [65535, 256]], dtype=np.uint16))
    sixteen.save(tmp_path / "16.png")
    grey = load_rgb(tmp_path / "16.png")
    assert [grey.getpixel(p)[0] for p in ((0, 0), (1, 0), (0, 1), (1, 1))] == [0, 128, 255, 1]


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("truncated", "cannot read image .*truncated"),
        ("garbage", "cannot read image .*cannot identify"),
        ("missing", "does not exist"),
        ("bomb", "decompression bomb"),
        ("float", "unsupported mode 'F'"),
    ],
)
def test_broken_images_are_refused_naming_the_record(tmp_path: Path, kind: str, message: str) -> None:
    path = tmp_path / f"{kind}.png"
    if kind == "truncated":
        full = _png_bytes(
            Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
        )
        path.write_bytes(full[: len(full) // 2])
    elif kind == "garbage":
        path.write_bytes(b"this is not an image at all")
    elif kind == "bomb":
        path.write_bytes(_bomb_png())
    elif kind == "float":
        path = tmp_path / "f.tiff"
        Image.fromarray(np.ones((4, 4), dtype=np.float32)).save(path)
    with pytest.raises(DataError, match=rf"train\.jsonl:7: .*{message}"):
        load_rgb(path, "train.jsonl:7")


# --------------------------------------------------------------------------------------------
# Security: paths, YAML, pickles, remote code
# --------------------------------------------------------------------------------------------
def test_manifest_paths_must_stay_inside_the_image_root(tmp_path: Path) -> None:
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (4, 4)).save(root / "ok.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "secret.png")
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    for bad in ("../secret.png", str(tmp_path / "secret.png"), "link.png", "sub/../../secret.png"):
        manifest = root / "m.jsonl"
        manifest.write_text(json.dumps({"image": bad, "short_captions": ["a"]}) + "\n")
        with pytest.raises(DataError, match="leaves the image root"):
            load_caption_set(CaptionSetConfig(path=str(manifest)))


def test_yaml_recipe_with_a_python_tag_is_refused(tmp_path: Path) -> None:
    recipe = tmp_path / "evil.yaml"
    recipe.write_text("stage1:\n  model: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(config_io.ConfigError, match="not valid YAML"):
        config_io.load(RunConfig, recipe)
    assert not Path("pwned").exists()


def test_pickle_model_weights_refused_and_remote_code_never_run(tmp_path: Path) -> None:
    import shutil

    from llm2clip_vlm.text.modeling import ModelRef, load_bidirectional

    model = save_tiny_llm(tmp_path / "llama")
    pickled = tmp_path / "pickled"  # the same model as a pytorch_model.bin (a pickle) only
    shutil.copytree(model, pickled)
    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    assert (pickled / "pytorch_model.bin").is_file() and not list(pickled.glob("*.safetensors"))
    with pytest.raises((OSError, ValueError), match="safetensors"):
        load_bidirectional(ModelRef(str(pickled)))
    assert load_bidirectional(ModelRef(str(pickled)), allow_pickle=True).config.is_causal is False
    # A repository shipping its own modelling code: never imported, the built-in class is used.
    marker = tmp_path / "remote-code-ran"
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    cfg = json.loads((model / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.Cfg", "AutoModel": "evil.M", "AutoModelForCausalLM": "evil.M"}
    (model / "config.json").write_text(json.dumps(cfg))
    try:
        loaded = load_bidirectional(ModelRef(str(model)))
        assert type(loaded).__module__.startswith("transformers.")
    except ValueError as e:  # or refused outright: either way no code ran
        assert "trust_remote_code" in str(e)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# As a user would: a data set with broken files through the CLI
# --------------------------------------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m llm2clip_vlm.cli ARGS`` in a new process (forked from tests/cli_fork.py's server:
    one torch thread, no warnings, COLUMNS=250 so that rich keeps each message on one line)."""
    code, out, err = cli_fork.run(list(args))
    return subprocess.CompletedProcess(["llm2clip-vlm", *args], code, out, err)


@pytest.mark.slow  # 4 CLI processes (embed, stage 2; stopping and skipping): ~5-10 s
def test_cli_names_broken_files_and_skips_them_on_request(demo_run: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(demo_run["data"], data)
    lines = (data / "train.jsonl").read_text().splitlines()
    rec = [json.loads(x) for x in lines]
    lines[6] = lines[6][:25]  # line 7: a broken JSON line
    (data / rec[8]["image"]).unlink()  # line 9: image file missing
    truncated = data / rec[2]["image"]
    truncated.write_bytes(truncated.read_bytes()[:60])  # line 3: truncated PNG
    (data / rec[4]["image"]).write_bytes(b"GIF89a garbage")  # line 5: unreadable
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    common = [f"--set=embed.encoder={demo_run['enc']}", *[f"--set={o}" for o in _demo_overrides(data)]]
    tiny = [f"--set={o}" for o in ["stage2.loop.max_steps=2", *STAGE2_TINY_CLI]]

    r = _cli("embed", "-o", str(tmp_path / "store"), *common)
    assert r.returncode == 1 and "train.jsonl:7: broken JSON line" in r.stderr and "skip_bad" in r.stderr

    skip = ["--set=data.skip_bad=true", "--set=data.max_bad_fraction=0.2"]
    r = _cli("embed", "-o", str(tmp_path / "store"), *common, *skip)
    assert r.returncode == 0, r.stderr[-2000:]
    # 2 of 32 records and then 2 of the 30 images are bad: 4 of 32 in all (12.5%), so a limit of
    # 10% stops it although each phase alone (6.25%, 6.7%) is under it; the first is named.
    tight = ["--set=data.skip_bad=true", "--set=data.max_bad_fraction=0.1"]
    r = _cli("stage2", "-o", str(tmp_path / "s2"), f"--store={tmp_path / 'store'}", *common, *tiny, *tight)
    assert r.returncode == 1 and "4 of 32 records are bad (2 when reading, 2 here)" in r.stderr, r.stderr[
        -2000:
    ]
    assert "train.jsonl:7: broken JSON line" in r.stderr

    r = _cli("stage2", "-o", str(tmp_path / "s2"), f"--store={tmp_path / 'store'}", *common, *tiny, *skip)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / "s2" / "bad_records.json").read_text())
    reasons = " | ".join(s["reason"] for s in report["train"]["skipped"])
    assert report["train"]["records"] == 32 and len(report["train"]["skipped"]) == 4
    for expected in ("train.jsonl:7: broken JSON line", "does not exist", str(truncated), "cannot identify"):
        assert expected in reasons
    assert json.loads((tmp_path / "s2" / "metrics.json").read_text())["train"]["steps"] == 2


STAGE2_TINY_CLI = [
    "stage2.backbone.image_size=32", "stage2.backbone.hidden_size=32", "stage2.backbone.num_layers=2",
    "stage2.backbone.num_heads=2", "stage2.embed_dim=16", "stage2.num_workers=0", "stage2.loop.precision=fp32",
    "stage2.eval_batch_size=32", "stage2.batch_size=8",
]  # fmt: skip
