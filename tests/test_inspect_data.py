"""`llm2clip-vlm inspect-data` on replicas of what the field's tools write (built from their source:
see ``tests/img2dataset_replica.py``; LLaVA's layout as ``llm2clip_vlm.data.synthetic_llava``
writes it from haotian-liu/LLaVA ``llava/train/train.py``): what it prints, its last line, and that
the recipe block it prints reads the data as it is."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from img2dataset_replica import samples, solid_images, write_img2dataset, write_sidecars
from typer.testing import CliRunner

from llm2clip_vlm import config_io
from llm2clip_vlm.cli import app
from llm2clip_vlm.data.captions import resolve_data
from llm2clip_vlm.data.errors import DataError
from llm2clip_vlm.recipe import RunConfig


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llm2clip_vlm.text.tiny import save_tiny_llm

    return save_tiny_llm(tmp_path_factory.mktemp("inspect-llm") / "llm")


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM2CLIP_VLM_CACHE", str(tmp_path / "cache"))


def _inspect(model: Path, *args: str, code: int = 0) -> str:
    result = CliRunner().invoke(app, ["inspect-data", *args, "--set", f"stage1.model={model}"])
    assert result.exit_code == code, result.output + repr(result.exception)
    assert "Traceback" not in result.output
    return result.output


def _block(output: str) -> dict:
    text = output.split("recipe block that reads it as it is:\n", 1)[1]
    return yaml.safe_load(text.rsplit("\n", 2)[0])


def _reads(block: dict, tmp_path: Path) -> RunConfig:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(block))
    return config_io.load(RunConfig, recipe, [])


def test_img2dataset_shards_with_sidecars(tmp_path: Path, tokenizer_model: Path) -> None:
    shards = write_img2dataset(tmp_path / "cc3m", samples(solid_images(10)), per_shard=4, failed_every=5)
    write_sidecars(shards, dim=24)
    out = _inspect(tokenizer_model, str(tmp_path / "cc3m"))
    assert "format webdataset" in out and "records: 8 usable of 8" in out
    assert "images: 8 found, 0 missing, 0 undecodable of 8 decoded" in out
    assert "LLM2CLIP side-cars: 3 of 3 shards, 24-d vectors" in out
    assert "duplicate keys: none" in out
    assert "short captions: 8 in 8 records (1.00 per record, max 1); tokens p50" in out
    assert out.rstrip().endswith("ready: the block above reads this data as it is")
    block = _block(out)
    # The side-cars embed shortSV/longSV: the block reads those two, so the store matches.
    assert block["data"]["train"]["caption_columns"] == {
        "shortSV_captions": "short",
        "longSV_captions": "long",
    }
    train, _ = resolve_data(_reads(block, tmp_path).data, tmp_path / "run")
    assert len(train) == 8 and train[0].long[0].startswith("long SV caption")


def test_img2dataset_without_sidecars_maps_every_dreamlip_column(
    tmp_path: Path, tokenizer_model: Path
) -> None:
    write_img2dataset(tmp_path / "files", samples(solid_images(5)), per_shard=4, output_format="files")
    out = _inspect(tokenizer_model, str(tmp_path / "files"))
    assert "format img2dataset-files" in out and "records: 5 usable of 5" in out
    block = _block(out)
    assert block["data"]["train"]["caption_columns"] == {
        "longIB_captions": "long", "longLLA_captions": "long", "longSV_captions": "long",
        "shortIB_captions": "short", "shortLLA_captions": "short", "shortSV_captions": "short",
    }  # fmt: skip
    train, _ = resolve_data(_reads(block, tmp_path).data, tmp_path / "run")
    assert len(train) == 5 and len(train[0].short) == 3 and len(train[0].long) == 3
    assert "ready" in out.splitlines()[-1]


def test_a_plain_img2dataset_run_reads_its_caption_column(tmp_path: Path, tokenizer_model: Path) -> None:
    items = samples(solid_images(3))
    for item in items:  # an img2dataset run on a url,caption list: no DreamLIP columns
        item["meta"] = {"url": item["meta"]["url"], "caption": item["meta"]["caption"]}
    write_img2dataset(tmp_path / "d", items, per_shard=4)
    out = _inspect(tokenizer_model, str(tmp_path / "d"))
    block = _block(out)
    assert block["data"]["train"]["caption_columns"] == {"caption": "short"}
    assert "long captions: 0 in 0 records" in out


def test_a_damaged_shard_and_duplicate_keys_are_what_to_fix(tmp_path: Path, tokenizer_model: Path) -> None:
    shards = write_img2dataset(tmp_path / "d", samples(solid_images(8)), per_shard=4)
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 3])
    out = _inspect(tokenizer_model, str(tmp_path / "d"), code=1)
    assert "damaged shard" in out and "00001.tar" in out
    last = out.rstrip().splitlines()[-1]
    assert last.startswith("fix first: damaged shard(s):") and "skip_bad" in last
    # Two img2dataset runs copied into one folder: the keys repeat.
    (tmp_path / "two").mkdir()
    write_img2dataset(tmp_path / "a", samples(solid_images(4)), per_shard=4)
    shutil.copy(tmp_path / "a" / "00000.tar", tmp_path / "two" / "00000.tar")
    shutil.copy(tmp_path / "a" / "00000.tar", tmp_path / "two" / "00001.tar")
    out = _inspect(tokenizer_model, str(tmp_path / "two"), code=1)
    assert "duplicate keys: 4" in out
    assert "set key_column to a unique column (img2dataset: key_column: url)" in out.rstrip().splitlines()[-1]


def test_missing_images_name_image_root(tmp_path: Path, tokenizer_model: Path) -> None:
    (tmp_path / "images").mkdir()
    rows = []
    for i, px in enumerate(solid_images(4)):
        from PIL import Image

        Image.fromarray(px).save(tmp_path / "images" / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": f"picture {i}"})
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = _inspect(tokenizer_model, str(tmp_path / "train.jsonl"), code=1)
    assert "4 missing" in out
    assert "set image_root to the folder the image paths are relative to" in out.rstrip().splitlines()[-1]
    out = _inspect(tokenizer_model, str(tmp_path / "train.jsonl"), "--image-root", str(tmp_path / "images"))
    block = _block(out)
    assert block["data"]["train"]["image_root"] == str(tmp_path / "images")
    train, _ = resolve_data(_reads(block, tmp_path).data, tmp_path / "run")
    assert len(train) == 4


def test_undecodable_images_and_long_captions(tmp_path: Path, tokenizer_model: Path) -> None:
    shards = write_img2dataset(tmp_path / "d", samples(solid_images(4)), per_shard=4)
    # One image's bytes replaced (same length, so the tar stays whole).
    import tarfile

    with tarfile.open(shards[0]) as t:
        jpg = next(m for m in t if m.name.endswith(".jpg"))
    data = bytearray(shards[0].read_bytes())
    data[jpg.offset_data : jpg.offset_data + jpg.size] = b"x" * jpg.size
    shards[0].write_bytes(bytes(data))
    out = _inspect(tokenizer_model, str(tmp_path / "d"), "--set", "stage1.max_length=8", "--all", code=1)
    assert "images: 4 found, 0 missing, 1 undecodable of 4 decoded" in out
    assert "% of the sampled long captions exceed max_length 8 tokens" in out
    assert "1 of 4 images checked do not decode" in out.rstrip().splitlines()[-1]


def test_llava_json_and_its_shards(tmp_path: Path, tokenizer_model: Path) -> None:
    from llm2clip_vlm.data.conversations import load_llava_records
    from llm2clip_vlm.data.synthetic_llava import write_llava_demo

    write_llava_demo(
        tmp_path / "llava", pretrain_images=6, instruct_images=6, heldout_images=2, image_size=16
    )
    data = tmp_path / "llava" / "llava_pretrain.json"
    out = _inspect(tokenizer_model, str(data))
    assert "llava, format llava json" in out and "records: 6 usable of 6" in out
    block = _block(out)
    assert block == {"llava": {"pretrain": {"data": {"path": str(data)}}}}
    result = CliRunner().invoke(
        app, ["llava-shards", str(data), "-o", str(tmp_path / "shards"), "--per-shard", "4"]
    )
    assert result.exit_code == 0, result.output
    out = _inspect(tokenizer_model, str(tmp_path / "shards"))
    assert "llava, format llava shards" in out and "records: 6 usable of 6" in out
    path = _block(out)["llava"]["pretrain"]["data"]["path"]
    assert len(load_llava_records(path)) == 6
    # Images not where the JSON says: the reader stops at once with one line that names
    # image_folder and the folder that holds the images (data/layouts' missing-images check).
    moved = tmp_path / "moved.json"
    moved.write_text(data.read_text())
    result = CliRunner().invoke(app, ["inspect-data", str(moved), "--set", f"stage1.model={tokenizer_model}"])
    assert isinstance(result.exception, DataError)  # cli.main prints it as one 'data error:' line
    line = str(result.exception)
    assert "\n" not in line and "set image_folder to the folder" in line and "image_folder: " in line


def test_several_paths_give_one_block(tmp_path: Path, tokenizer_model: Path) -> None:
    write_img2dataset(tmp_path / "cc3m", samples(solid_images(3)), per_shard=4)
    write_img2dataset(tmp_path / "cc12m", samples(solid_images(3, seed=2)), per_shard=4)
    out = _inspect(tokenizer_model, str(tmp_path / "cc3m"), str(tmp_path / "cc12m"))
    sets = _block(out)["data"]["train"]
    assert [s["path"] for s in sets] == [str(tmp_path / "cc3m"), str(tmp_path / "cc12m")]


def test_bad_arguments_are_one_line(tmp_path: Path, tokenizer_model: Path) -> None:
    out = _inspect(tokenizer_model, str(tmp_path / "nowhere"), code=2)
    assert "nowhere: no such file or folder" in out
    out = _inspect(tokenizer_model, str(tmp_path), "--caption-column", "x=medium", code=2)
    assert "write COLUMN=short or COLUMN=long" in out


def test_a_manifest_of_urls_names_img2dataset(tmp_path: Path, tokenizer_model: Path) -> None:
    (tmp_path / "urls.jsonl").write_text(
        json.dumps({"image": "http://example.com/1.jpg", "caption": "a"}) + "\n"
    )
    out = _inspect(tokenizer_model, str(tmp_path / "urls.jsonl"), code=1)
    last = out.rstrip().splitlines()[-1]
    assert "images are URLs, not files" in last and "img2dataset" in last and "image_root" not in last
