"""LLaVA on webdataset shards: the same records as JSON + folder, a streamed run that resumes
exactly mid-epoch, 2 processes on disjoint records, and a bad image named ``shard.tar:key``."""

from __future__ import annotations

import dataclasses
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from dist_env import free_port, join_as_rank
from llava_world import write_llava_world
from safetensors.torch import load_file

from llm2clip_vlm import config_io
from llm2clip_vlm.commands import run_llava
from llm2clip_vlm.data.conversations import load_llava_records
from llm2clip_vlm.data.errors import DataError
from llm2clip_vlm.data.llava_shards import write_llava_shards
from llm2clip_vlm.llava import stage as llava_stage
from llm2clip_vlm.recipe import RunConfig

BAD_ROW = 3  # the record whose image is broken in the "bad" shards


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    root = tmp_path_factory.mktemp("llava_stream")
    env = pytest.MonkeyPatch()
    env.setenv("LLM2CLIP_VLM_CACHE", str(root / "cache"))  # for this module only (undone below)
    world = write_llava_world(root, heldout_images=6)
    data = world["data"]
    pretrain = load_llava_records(data / "llava_pretrain.json")
    write_llava_shards(pretrain, root / "shards", per_shard=6)
    broken = [
        dataclasses.replace(r, image=b"not an image" if i == BAD_ROW else r.image)
        for i, r in enumerate(pretrain)
    ]
    write_llava_shards(broken, root / "bad", per_shard=5)
    yield {
        "root": root,
        "data": data,
        "shards": root / "shards",
        "bad": root / "bad",
        "tower": world["tower"],
        "llm": world["llm"],
    }
    env.undo()


def _overrides(
    parts: dict[str, Path], data: Path, extra: list[str] = (), phase: str = "pretrain"
) -> list[str]:
    p = f"llava.{phase}"
    return [
        f"llava.tower={parts['tower']}", f"llava.llm={parts['llm']}", f"{p}.data.path={data}",
        f"{p}.data.stream=true", f"{p}.data.shuffle_buffer=4", f"{p}.batch_size=8", f"{p}.micro_batch_size=4",
        f"{p}.num_workers=0", f"{p}.loop.precision=fp32", f"{p}.loop.max_steps=3", f"{p}.lr=1e-3",
        f"{p}.loop.warmup_ratio=0", f"{p}.gradient_checkpointing=false", *extra,
    ]  # fmt: skip


def _cfg(parts: dict[str, Path], data: Path, extra: list[str] = ()) -> RunConfig:
    return config_io.load(RunConfig, None, _overrides(parts, data, list(extra)))


def test_shards_hold_the_records_of_the_json_and_its_folder(parts, tmp_path: Path) -> None:
    # The instruct split has text-only records: a shard sample without an image member.
    from_json = load_llava_records(parts["data"] / "llava_instruct.json")
    write_llava_shards(from_json, tmp_path / "instruct", per_shard=7, prefix="mix")
    assert not all(from_json.has_image)
    for path in [tmp_path / "instruct", tmp_path / "instruct" / "mix-{000000..000003}.tar"]:
        from_shards = load_llava_records(path)
        assert len(from_shards) == len(from_json) > 24  # 24 images and the text-only records
        assert list(from_shards.has_image) == list(from_json.has_image)
        for a, b in zip(from_json, from_shards, strict=True):
            assert (a.id, a.conversations, a.extra) == (b.id, b.conversations, b.extra)
            assert (a.image.read_bytes() if a.image else None) == b.image
    assert ".tar:" in from_shards[0].source  # records are named shard.tar:key


def test_a_bad_shard_record_is_named_by_shard_and_key(parts, tmp_path: Path) -> None:
    records = list(load_llava_records(parts["data"] / "llava_pretrain.json"))
    records[2] = dataclasses.replace(
        records[2], conversations=[{"from": "human", "value": "no placeholder"}] * 2
    )
    write_llava_shards(records, tmp_path / "s", per_shard=5)
    with pytest.raises(DataError, match=r"llava-000000\.tar:000000002.*skip_bad"):
        load_llava_records(tmp_path / "s")
    kept = load_llava_records(tmp_path / "s", skip_bad=True, max_bad_fraction=0.1)
    assert len(kept) == 23 and "000000002" not in {r.source.split(" ")[0][-9:] for r in kept}


class _Killed(Exception):
    pass


@pytest.mark.parametrize("workers", [0, 2])
def test_a_streamed_run_killed_mid_epoch_resumes_to_the_same_weights(
    parts, tmp_path: Path, workers: int
) -> None:
    # 24 records in 4 shards, batches of 8: 3 steps an epoch; killed after step 3, resumed from
    # the checkpoint of step 2 (mid-epoch, buffer half full) and run into the second epoch. With
    # 2 DataLoader workers each reads its own 2 shards, batches taken from them in turn.
    extra = ["llava.pretrain.loop.max_steps=5", "llava.pretrain.loop.save_every_steps=2",
             f"llava.pretrain.num_workers={workers}"]  # fmt: skip
    full = run_llava(_cfg(parts, parts["shards"], extra), tmp_path / "full", "pretrain")

    def kill(step: int, loss: float) -> None:
        if step == 3:
            raise _Killed

    with pytest.raises(_Killed):
        run_llava(_cfg(parts, parts["shards"], extra), tmp_path / "cut", "pretrain", on_step=kill)
    saved = json.loads((tmp_path / "cut" / "checkpoints" / "step-0000002" / "checkpoint.json").read_text())[
        "state"
    ]
    # The stream position went in: 16 records read by one unit, or 8 by each of two.
    assert saved["extra"]["data"]["units"] == ({"0": [8, 0], "1": [8, 0]} if workers else {"0": [16, 0]})
    resumed = run_llava(_cfg(parts, parts["shards"], extra), tmp_path / "cut", "pretrain")
    assert len(full["train"]["losses"]) == 5 and resumed["train"]["losses"] == full["train"]["losses"]
    a = load_file(str(tmp_path / "full" / "mm_projector.safetensors"))
    b = load_file(str(tmp_path / "cut" / "mm_projector.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_bad_image_stops_naming_it_or_is_skipped_and_counted(parts, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"llava-000000\.tar:000000003.*skip_bad"):
        run_llava(_cfg(parts, parts["bad"]), tmp_path / "stop", "pretrain")
    skip = ["llava.pretrain.data.skip_bad=true", "llava.pretrain.data.max_bad_fraction=0.1"]
    metrics = run_llava(_cfg(parts, parts["bad"], skip), tmp_path / "skip", "pretrain")
    assert metrics["train"]["steps"] == 3 and metrics["details"]["bad_records"]["count"] == 1
    assert metrics["details"]["bad_records"]["records"][0]["record"].endswith("llava-000000.tar:000000003")
    listed = json.loads((tmp_path / "skip" / "bad_records.json").read_text())["bad"]
    assert listed["records"] == 24 and listed["skipped"][0]["record"].endswith("llava-000000.tar:000000003")


def test_a_bad_record_met_in_every_epoch_is_one_skipped_record(parts, tmp_path: Path) -> None:
    # 24 records, 8 a step: steps 4-6 are the second epoch and meet the bad image again. The
    # stream's ledger (data.errors.BadRecords, as stage 2's) lists it once, in metrics.json as in
    # bad_records.json.
    skip = ["llava.pretrain.data.skip_bad=true", "llava.pretrain.data.max_bad_fraction=0.1"]
    skip.append("llava.pretrain.loop.max_steps=6")
    metrics = run_llava(_cfg(parts, parts["bad"], skip), tmp_path / "skip", "pretrain")
    assert metrics["train"]["steps"] == 6 and metrics["details"]["bad_records"]["count"] == 1
    listed = json.loads((tmp_path / "skip" / "bad_records.json").read_text())["bad"]
    assert [s["record"] for s in listed["skipped"]] == [
        metrics["details"]["bad_records"]["records"][0]["record"]
    ]


def _worker(
    rank: int, world: int, port: int, overrides: list[str], out: str, phase: str = "pretrain", init: str = ""
) -> None:
    join_as_rank(rank, world, port)
    torch.set_num_threads(1)
    seen: list[str] = []

    class Recording(llava_stage.LlavaStep):  # what this rank trained on, record by record
        def __call__(self, batch):  # type: ignore[no-untyped-def]
            seen.extend(batch.sources)
            return super().__call__(batch)

    llava_stage.LlavaStep = Recording  # type: ignore[misc]
    cfg = config_io.load(RunConfig, None, overrides)
    run_llava(cfg, Path(out), phase, **({"init": Path(init)} if init else {}))  # type: ignore[arg-type]
    Path(out, f"seen-{rank}.json").write_text(json.dumps(seen))


@pytest.mark.slow  # spawns 2 processes (per phase)
@pytest.mark.parametrize("phase", ["pretrain", "finetune"])
def test_two_processes_stream_disjoint_records(parts, tmp_path: Path, phase: str) -> None:
    out, init = tmp_path / "two", ""
    if phase == "finetune":  # full finetuning of the LLM, from a projector pretrained first
        pre = tmp_path / "pre"
        run_llava(_cfg(parts, parts["shards"], ["llava.pretrain.loop.max_steps=1"]), pre, "pretrain")
        init = str(pre)
    overrides = _overrides(
        parts, parts["shards"], [f"llava.{phase}.tune=full"] if phase == "finetune" else [], phase
    )
    mp.spawn(_worker, args=(2, free_port(), overrides, str(out), phase, init), nprocs=2)
    seen = [json.loads((out / f"seen-{r}.json").read_text()) for r in range(2)]
    assert [len(s) for s in seen] == [12, 12]  # 3 steps x 4 records per rank
    assert not set(seen[0]) & set(seen[1]) and len(set(seen[0] + seen[1])) == 24
    # Each rank reads whole shards of its own (4 shards of 6 records, 2 per rank).
    shards = [{s.split(":")[0] for s in ranks} for ranks in seen]
    assert not shards[0] & shards[1]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["processes"] == 2 and len(metrics["train"]["losses"]) == 3
    state = json.loads(next((out / "checkpoints").glob("step-*/checkpoint.json")).read_text())["state"]
    assert sorted(state["extra"]["data"]["units"]) == ["0", "1"]


def test_streamed_finetune_mixes_image_and_text_only_records(parts, tmp_path: Path) -> None:
    # The instruct split has text-only records (no image member): streamed batches mix them.
    instruct = load_llava_records(parts["data"] / "llava_instruct.json")
    write_llava_shards(instruct, tmp_path / "instruct", per_shard=7)
    pre = tmp_path / "pre"
    run_llava(_cfg(parts, parts["shards"], ["llava.pretrain.loop.max_steps=1"]), pre, "pretrain")
    p = "llava.finetune"
    n = len(instruct)
    assert n % 2 == 0, n  # two steps of n / 2 = every record once
    extra = [f"{p}.batch_size={n // 2}", f"{p}.loop.max_steps=2", f"{p}.tune=projector"]
    cfg = config_io.load(RunConfig, None, _overrides(parts, tmp_path / "instruct", extra, phase="finetune"))
    metrics = run_llava(cfg, tmp_path / "ft", "finetune", init=pre)
    # 2 steps = every record once, the text-only ones among them.
    assert metrics["train"]["steps"] == 2 and metrics["details"]["records"] == n
    assert sum(not h for h in instruct.has_image) >= 1
    assert all(loss == loss for loss in metrics["train"]["losses"])


def test_map_style_training_on_shards_is_training_on_the_json(parts, tmp_path: Path) -> None:
    # Not streamed: the shard records, sampled at random like JSON ones, give the same batches.
    off = ["llava.pretrain.data.stream=false"]
    on_json = run_llava(
        _cfg(parts, parts["data"] / "llava_pretrain.json", off), tmp_path / "json", "pretrain"
    )
    on_shards = run_llava(_cfg(parts, parts["shards"], off), tmp_path / "shards", "pretrain")
    assert len(on_json["train"]["losses"]) == 3 and on_shards["train"]["losses"] == on_json["train"]["losses"]
    with pytest.raises(ValueError, match=r"llava\.pretrain\.data\.stream needs webdataset shards"):
        run_llava(_cfg(parts, parts["data"] / "llava_pretrain.json"), tmp_path / "refused", "pretrain")


@pytest.mark.parametrize("fmt", ["GIF", "TIFF", "BMP", "WEBP", "PNG", "JPEG"])
def test_every_image_type_round_trips_through_llava_shards_and_the_stream(
    parts, tmp_path: Path, fmt: str
) -> None:
    # LLaVA JSON pointing at .gif files (OCR-VQA converted so: haotian-liu/LLaVA issue #593) trains
    # from JSON; llava-shards keeps each file's type as its member's extension, so the stream must
    # count every type the reader decodes as the sample's image.
    from PIL import Image

    from llm2clip_vlm.data.images import load_rgb

    records = json.loads((parts["data"] / "llava_pretrain.json").read_text())[:8]
    ext = {"JPEG": "jpg", "TIFF": "tif"}.get(fmt, fmt.lower())
    (tmp_path / "img").mkdir()
    for r in records:
        name = f"img/{r['id']}.{ext}"
        Image.open(parts["data"] / r["image"]).convert("RGB").save(tmp_path / name, format=fmt)
        r["image"] = name
    (tmp_path / "data.json").write_text(json.dumps(records))
    from_json = load_llava_records(tmp_path / "data.json")
    paths = write_llava_shards(from_json, tmp_path / "shards", per_shard=4)
    with tarfile.open(paths[0]) as t:
        assert {m.name for m in t if m.name.startswith("000000000.")} == {
            "000000000.json",
            f"000000000.{ext}",
        }
    from_shards = load_llava_records(tmp_path / "shards")
    assert list(from_shards.has_image) == [True] * 8
    for a, b in zip(from_json, from_shards, strict=True):
        assert a.image.read_bytes() == b.image
        assert load_rgb(b.image).tobytes() == load_rgb(a.image).tobytes()
    extra = ["llava.pretrain.loop.max_steps=1"]
    metrics = run_llava(_cfg(parts, tmp_path / "shards", extra), tmp_path / "run", "pretrain")
    assert metrics["train"]["steps"] == 1 and all(loss == loss for loss in metrics["train"]["losses"])
