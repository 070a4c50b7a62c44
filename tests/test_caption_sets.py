"""Data as users hold it: lists of caption sets, layouts recognised by header, messages that name the fix.

The replicas come from the tools' own source (see :mod:`caption_sets_world`, which cites each file):
img2dataset's webdataset writer (rom1504/img2dataset ``img2dataset/writer.py``,
``img2dataset/downloader.py``) run as LLM2CLIP's ``llm2clip/data/download_dataset.sh`` runs it;
LLM2CLIP's ``llm_caption_contrastive/dataset/E5_cc3m.py`` caption pairs; LLaVA-Pretrain
(haotian-liu/LLaVA ``docs/Data.md``, ``scripts/v1_5/pretrain.sh``); ShareGPT4V
(ShareGPT4Omni/ShareGPT4V ``docs/Data.md``). Sampling weights follow open_clip's
``--train-data-upsampling-factors`` (mlfoundations/open_clip ``src/open_clip_train/params.py``,
``src/open_clip_train/data.py`` ``expand_urls``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from caption_sets_world import (
    write_caption_pairs,
    write_dreamlip_csv,
    write_img2dataset_run,
    write_llava_pretrain,
    write_sharegpt4v,
)

from llm2clip_vlm import config_io
from llm2clip_vlm.commands import check_caption_pairs
from llm2clip_vlm.data.captions import (
    data_counts,
    is_text_only,
    load_caption_set,
    load_caption_sets,
    record_index,
    resolve_data,
)
from llm2clip_vlm.data.config import CaptionSetConfig, DataConfig
from llm2clip_vlm.data.errors import DataError
from llm2clip_vlm.data.images import load_rgb
from llm2clip_vlm.data.stream import ShardStream
from llm2clip_vlm.recipe import RunConfig
from llm2clip_vlm.vision.data import GlobalBatchSampler, weighted_positions


@pytest.fixture
def two_runs(tmp_path: Path) -> tuple[Path, Path, list, list]:
    """CC3M and CC12M as two img2dataset runs: both number their keys from 000000000."""
    a = write_img2dataset_run(tmp_path / "cc3m", 25, seed=0, failed_every=7)
    b = write_img2dataset_run(tmp_path / "cc12m", 15, seed=1)
    return tmp_path / "cc3m", tmp_path / "cc12m", a, b


def test_two_img2dataset_runs_collide_in_one_path_and_read_as_a_list(two_runs) -> None:
    cc3m, cc12m, a, b = two_runs
    assert a[0][0] == b[0][0] == "000000000"
    # One glob over both runs: the repeat names both ways out.
    with pytest.raises(DataError) as e:  # skip_bad would drop one run's images: not offered
        load_caption_set(CaptionSetConfig(path=str(cc3m.parent / "*" / "*.tar")), skip_bad=True)
    msg = str(e.value)
    assert "duplicate key '000000000'" in msg and "(13 keys repeat across the files of" in msg
    assert "separate entries of data.train" in msg and "key_column (e.g. url)" in msg
    assert "skip_bad" not in msg
    # As a list: keys namespaced by the folder names, each set's DreamLIP columns recognised.
    train = load_caption_sets([CaptionSetConfig(path=str(cc3m)), CaptionSetConfig(path=str(cc12m))])
    assert len(train) == len(a) + len(b) == 37
    keys = [r.key for r in train]
    assert keys[: len(a)] == [f"cc3m/{k}" for k, _ in a] and keys[len(a) :] == [f"cc12m/{k}" for k, _ in b]
    first = train[len(a)]
    assert first.source == f"{cc12m.resolve()}/00000.tar:000000000"
    assert [c.kind for c in first.captions] == ["short", "long"] and "(SV)" in first.captions[1].text
    assert load_rgb(first.image, first.source).size == (40, 40)
    assert [(p.name, p.start, p.records) for p in train.parts] == [("cc3m", 0, 22), ("cc12m", 22, 15)]
    counts = data_counts(train, {})
    assert counts["train"]["sets"]["cc12m"] == {
        "path": str(cc12m),
        "records": 15,
        "skipped": 0,
        "weight": 1.0,
    }
    # The joined index is cached: a second read opens the same one.
    again = load_caption_sets([CaptionSetConfig(path=str(cc3m)), CaptionSetConfig(path=str(cc12m))])
    assert record_index(again).directory == record_index(train).directory


def test_a_list_of_one_set_is_that_set(two_runs, tmp_path: Path) -> None:
    cc3m = two_runs[0]
    single = load_caption_set(CaptionSetConfig(path=str(cc3m)), name="train")
    listed = load_caption_sets([CaptionSetConfig(path=str(cc3m))])
    assert record_index(listed).directory == record_index(single).directory  # the same index, no join
    assert [(r.key, r.captions, r.image, r.source) for r in listed] == [
        (r.key, r.captions, r.image, r.source) for r in single
    ]
    # Through a run's data resolution: the same set, the same counts, no sampling weights.
    one, _ = resolve_data(DataConfig(train=CaptionSetConfig(path=str(cc3m))), tmp_path / "a")
    listed_one, _ = resolve_data(DataConfig(train=[CaptionSetConfig(path=str(cc3m))]), tmp_path / "b")
    assert record_index(one).directory == record_index(listed_one).directory
    assert (
        data_counts(one, {})
        == data_counts(listed_one, {})
        == {"train": {"records": 22, "skipped": 0}, "heldout": {}}
    )
    assert weighted_positions(listed_one, range(len(listed_one)), 0, 0) is None
    # The recipe accepts a mapping or a list, and the resolved config.yaml round-trips both.
    for train in ({"path": str(cc3m)}, [{"path": str(cc3m)}, {"path": "x", "weight": 0.5, "name": "yfcc"}]):
        recipe = tmp_path / "r.yaml"
        recipe.write_text(yaml.safe_dump({"data": {"train": train}}))
        cfg = config_io.load(RunConfig, recipe)
        config_io.dump(cfg, tmp_path / "config.yaml")
        assert config_io.load(RunConfig, tmp_path / "config.yaml") == cfg
    assert cfg.data.train[1].weight == 0.5 and cfg.data.train[1].name == "yfcc"
    with pytest.raises(config_io.ConfigError, match=r"data.train\[0\].pth"):
        config_io.build(RunConfig, {"data": {"train": [{"pth": "a"}]}})


def _stream_ids(index, n: int, positions=None, count: int = 30, world: int = 1, rank: int = 0) -> list[int]:
    stream = ShardStream(
        index, n, lambda epoch, rid, data: (rid, len(data)), rank=rank, world=world, workers=1, seed=3,
        buffer=4, positions=positions,
    )  # fmt: skip
    out = []
    for item in stream.unit_samples(rank):
        out.append(item)
        if len(out) == count:
            break
    return out


def test_stream_over_joined_manifest_and_shards_resumes_exactly(two_runs, tmp_path: Path) -> None:
    cc3m, _, a, _ = two_runs
    pretrain = write_llava_pretrain(tmp_path, 12)
    train = load_caption_sets(
        [
            CaptionSetConfig(path=str(cc3m)),
            CaptionSetConfig(path=str(pretrain), image_root=str(pretrain.parent / "images")),
        ]
    )
    index = record_index(train)
    assert index.meta["kind"] == "mixed" and len(train) == len(a) + 12
    # DataLoader workers started with spawn get the index pickled: it maps the same tables again.
    import pickle

    again = pickle.loads(pickle.dumps(index.without_images()))
    assert [r.key for r in again] == [r.key for r in train] and again[0].image == b""
    # The join copies no table: its folder holds a meta.json only.
    assert [f.name for f in index.directory.iterdir()] == ["meta.json"]
    # A manifest record of the mixed index: its image path, its manifest named with the line.
    last = train[len(train) - 1]
    assert isinstance(last.image, str) and last.key.startswith("blip_laion_cc_sbu_558k/")
    assert last.source == f"{pretrain.resolve()}:12"
    # The stream: one source per shard / manifest; a resumed unit emits what the uninterrupted one would.
    whole = _stream_ids(index, len(train), count=60)
    assert sorted({rid for rid, *_ in whole}) == list(range(len(train)))  # an epoch covers both sets
    resumed = _stream_ids(index, len(train), positions={0: 25}, count=35)
    assert [x[:2] for x in resumed] == [x[:2] for x in whole[25:]]
    # Two processes read disjoint sources.
    r0 = {x[0] for x in _stream_ids(index, len(train), world=2, rank=0, count=10)}
    r1 = {x[0] for x in _stream_ids(index, len(train), world=2, rank=1, count=10)}
    assert not r0 & r1


def test_bad_records_are_skipped_and_counted_per_set(two_runs, tmp_path: Path) -> None:
    cc3m, cc12m, _, b = two_runs
    # A key whose image member is missing (a broken writer): bad in cc12m only.
    import tarfile

    with tarfile.open(cc12m / "00001.tar", "a") as tar:
        info = tarfile.TarInfo("000099999.txt")
        info.size = 3
        import io

        tar.addfile(info, io.BytesIO(b"cat"))
    cfgs = [CaptionSetConfig(path=str(cc3m)), CaptionSetConfig(path=str(cc12m))]
    with pytest.raises(DataError, match="000099999: no image member"):
        load_caption_sets(cfgs)
    data = DataConfig(train=cfgs, skip_bad=True, max_bad_fraction=0.2)
    train, _ = resolve_data(data, tmp_path / "out")
    assert [p.skipped for p in train.parts] == [0, 1] and len(train) == 22 + len(b)
    report = json.loads((tmp_path / "out" / "bad_records.json").read_text())
    assert report["train"]["skipped"][0]["record"].endswith("00001.tar:000099999")


def test_weights_sample_sets_like_open_clips_upsampling_factors(two_runs) -> None:
    cc3m, cc12m, _, _ = two_runs
    train = load_caption_sets(
        [CaptionSetConfig(path=str(cc3m), weight=0.5), CaptionSetConfig(path=str(cc12m), weight=2)]
    )
    usable = range(len(train))
    e0 = weighted_positions(train, usable, seed=0, epoch=0)
    e1 = weighted_positions(train, usable, seed=0, epoch=1)
    assert len(e0) == len(e1) == 11 + 30  # round(0.5 * 22) + 2 * 15
    assert ((e0 < 22).sum(), (e0 >= 22).sum()) == (11, 30)
    assert np.bincount(e0[e0 >= 22] - 22).tolist() == [2] * 15  # every CC12M image twice
    assert set(e0[e0 < 22]) != set(e1[e1 < 22])  # a fresh half of CC3M each epoch
    # The sampler cuts global batches from the weighted epoch, deterministically.
    sampler = GlobalBatchSampler(
        len(e0), 8, 0, 1, 0, 0, 10, epoch_positions=lambda e: weighted_positions(train, usable, 0, e)
    )
    batches = list(sampler)
    assert len(batches) == 10 and all(len(b) == 8 for b in batches)
    drawn = [i for b in batches[:5] for _, i in b]  # epoch 0: 5 full batches of 41
    assert set(drawn) <= set(e0.tolist())
    assert weighted_positions(load_caption_sets([CaptionSetConfig(path=str(cc3m))]), range(22), 0, 0) is None


def test_dreamlip_csv_with_urls_names_the_img2dataset_command(tmp_path: Path) -> None:
    csv_path = tmp_path / "cc3m" / "cc3m_3long_3short_1raw_captions_url.csv"
    write_dreamlip_csv(csv_path, 5)
    with pytest.raises(DataError) as e:
        load_caption_set(CaptionSetConfig(path=str(csv_path)))
    msg = str(e.value)
    assert "\n" not in msg and "holds URLs" in msg
    # The command download_dataset.sh runs (LLM2CLIP llm2clip/data/download_dataset.sh).
    assert '--url_col "Image Path" --caption_col "raw_caption" --output_format webdataset' in msg
    assert (
        """--save_additional_columns '["shortIB_captions", "longIB_captions", "shortSV_captions", """
        """"longSV_captions", "shortLLA_captions", "longLLA_captions"]'""" in msg
    )
    assert f"data.train.path: {tmp_path / 'cc3m' / 'cc3m_3long_3short_1raw_captions_url'}" in msg


def test_caption_pair_csv_is_a_text_only_set_for_stage1(tmp_path: Path) -> None:
    path = tmp_path / "cc3m_pairs.csv"
    write_caption_pairs(path, 6)
    cs = load_caption_set(CaptionSetConfig(path=str(path)), name="train")
    assert len(cs) == 6 and cs[0].image == "" and cs[0].key == "2"  # the CSV line
    assert [c.kind for c in cs[0].captions] == ["short", "long"]
    assert is_text_only(cs) == ["train"]
    check_caption_pairs(cs, {}, DataConfig())  # a short and a long per image: stage 1 can pair them


def test_stage2_refuses_a_text_only_set(tmp_path: Path) -> None:
    from llm2clip_vlm.commands import run_stage2

    path = tmp_path / "pairs.csv"
    write_caption_pairs(path, 6)
    cfg = config_io.build(RunConfig, {"data": {"train": {"path": str(path)}}})
    with pytest.raises(
        DataError, match=r"stage 2 needs images, and data.train set\(s\) train hold captions only"
    ):
        run_stage2(cfg, tmp_path / "s2", tmp_path / "store")


def test_stage1_with_one_caption_per_image_names_the_columns_to_map(two_runs) -> None:
    cc3m = two_runs[0]
    # img2dataset's KEY.txt only (the caption mapping was written by hand): one caption per image.
    cfg = CaptionSetConfig(path=str(cc3m), caption_columns={"caption": "short"})
    train = load_caption_set(cfg)
    with pytest.raises(DataError) as e:
        check_caption_pairs(train, {}, DataConfig(train=cfg))
    msg = str(e.value)
    assert "0 of 22 training images have them" in msg
    assert "map a second caption column in data.train.caption_columns (now {'caption': 'short'}" in msg
    assert "{shortSV_captions: short, longSV_captions: long}" in msg
    assert "caption-pair file" in msg and "data.heldout" in msg


def test_llava_pretrain_folder_reads_with_image_root_and_names_it_when_missing(tmp_path: Path) -> None:
    path = write_llava_pretrain(tmp_path, 8)
    with pytest.raises(DataError) as e:  # the JSON beside images/, image_root forgotten
        load_caption_set(CaptionSetConfig(path=str(path)), skip_bad=True)
    msg = str(e.value)
    assert "8 of 8 images do not exist" in msg and "set image_root" in msg and "skip_bad" not in msg
    assert f"image_root: {path.parent / 'images'}" in msg
    cs = load_caption_set(CaptionSetConfig(path=str(path), image_root=str(path.parent / "images")))
    assert len(cs) == 8 and [c.kind for c in cs[0].captions] == ["long"]  # the gpt answer, long by default
    first = json.loads(path.read_text())[0]
    assert cs[0].key == first["image"] and cs[0].captions[0].text == first["conversations"][1]["value"]
    short = load_caption_set(
        CaptionSetConfig(
            path=str(path), image_root=str(path.parent / "images"), caption_columns={"conversations": "short"}
        )
    )
    assert [c.kind for c in short[0].captions] == ["short"]


def test_sharegpt4v_json_reads_as_a_caption_set(tmp_path: Path) -> None:
    path = write_sharegpt4v(tmp_path, 9, text_only=2)
    with pytest.raises(DataError) as e:  # paths are relative to data/, the JSON is in data/sharegpt4v/
        load_caption_set(CaptionSetConfig(path=str(path)))
    assert f"image_root: {tmp_path / 'data'}" in str(e.value)
    cs = load_caption_set(CaptionSetConfig(path=str(path), image_root=str(tmp_path / "data")))
    assert len(cs) == 9 and not cs.skipped  # the text-only records are left out, not bad
    assert cs[1].key == "sam/images/000000000001.jpg"
    assert cs[0].captions[0].kind == "long" and cs[0].captions[0].text.endswith("no other objects.")


@pytest.mark.slow
def test_build_tower_on_cc3m_plus_cc12m_as_two_img2dataset_folders(two_runs, tmp_path: Path) -> None:
    """The paper's mix (CC3M + CC12M), as img2dataset wrote it, through every stage with no conversion."""
    from recipe_world import write_retrieval_sets
    from typer.testing import CliRunner

    from llm2clip_vlm.cli import app
    from llm2clip_vlm.store.store import EmbeddingStore
    from llm2clip_vlm.text.tiny import save_tiny_llm

    cc3m, cc12m, a, b = two_runs
    write_retrieval_sets(tmp_path, 8)  # data/eval/coco_karpathy_test.json: 5 short captions per image
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "data": {
                    "train": [{"path": str(cc3m)}, {"path": str(cc12m)}],
                    "heldout": {
                        "coco": {
                            "path": str(tmp_path / "data/eval/coco_karpathy_test.json"),
                            "caption_columns": {"captions": "short"},
                        }
                    },
                }
            }
        )
    )
    llm = save_tiny_llm(tmp_path / "llm")
    tiny = [
        f"stage1.model={llm}", "stage1.loop.max_steps=2", "stage1.batch_size=4", "stage1.cra_captions=8",
        "stage2.loop.max_steps=2", "stage2.batch_size=8", "stage2.embed_dim=32", "stage2.num_workers=0",
        "stage2.backbone.hidden_size=32", "stage2.backbone.num_layers=2", "stage2.backbone.num_heads=2",
        "stage2.backbone.image_size=32",
    ]  # fmt: skip
    run = tmp_path / "run"
    args = ["build-tower", str(recipe), "-o", str(run)]
    for s in tiny:
        args += ["--set", s]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["data"]["train"]["sets"] == {
        "cc3m": {"path": str(cc3m), "records": len(a), "skipped": 0, "weight": 1.0},
        "cc12m": {"path": str(cc12m), "records": len(b), "skipped": 0, "weight": 1.0},
    }
    assert metrics["stage1"]["data"]["train"]["records"] == len(a) + len(b)
    assert metrics["stage1"]["details"]["captions_over_max_length"]["count"] == 0
    assert "coco" in metrics["stage2"]["eval"]["after"]
    # One store row pair (shortSV, longSV) per image of both sets; the keys are namespaced.
    store = EmbeddingStore.open(run / "store" / "train", verify_checksums=False)
    assert store.num_images == len(a) + len(b) and store.num_rows == 2 * (len(a) + len(b))
    written = config_io.load(RunConfig, run / "config.yaml")
    assert [t.path for t in written.data.train] == [str(cc3m), str(cc12m)]


def test_cra_slice_of_a_list_of_sets_holds_out_namespaced_images(two_runs) -> None:
    from llm2clip_vlm.text.cra import choose_cra_source

    cc3m, cc12m, a, b = two_runs
    columns = {"shortIB_captions": "short", "shortSV_captions": "short", "longSV_captions": "long"}
    train = load_caption_sets(
        [
            CaptionSetConfig(path=str(cc3m), caption_columns=columns),
            CaptionSetConfig(path=str(cc12m), caption_columns=columns),
        ]
    )
    source = choose_cra_source(train, {}, max_captions=8)
    # 10 % of 37 images: the last 3, from the last set, named by their namespaced keys.
    assert source.from_training_data and source.held_out_keys == [f"cc12m/{k}" for k, _ in b[-3:]]
    assert len(source.train_records) == len(train) - 3
    assert not {r.key for r in source.train_records} & set(source.held_out_keys)


def test_over_long_captions_are_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    from llm2clip_vlm.data.records import Caption, ImageCaptions
    from llm2clip_vlm.text.lengths import over_long_captions

    def tokenizer(texts: list[str], truncation: bool, max_length: int) -> dict:  # one token per word
        return {"input_ids": [t.split()[:max_length] for t in texts]}

    records = [
        ImageCaptions(
            str(i), "", [Caption("a short one", "short"), Caption("w " * (3 + 10 * (i % 2)), "long")]
        )
        for i in range(10)
    ]
    with caplog.at_level("WARNING"):
        out = over_long_captions(tokenizer, records, max_length=8)
    assert out == {"count": 5, "captions": 20, "share": 0.25, "sampled": False}
    assert "5 of 20 captions (25.00%) are longer than stage1.max_length=8 tokens and are cut" in caplog.text


@pytest.mark.slow
def test_stage1_trains_on_a_caption_pair_file(tmp_path: Path) -> None:
    """LLM2CLIP's ``E5_cc3m.py`` input (``short_caption,long_caption``), no images, through ``stage1``."""
    from recipe_world import write_retrieval_sets
    from typer.testing import CliRunner

    from llm2clip_vlm.cli import app
    from llm2clip_vlm.text.tiny import save_tiny_llm

    write_caption_pairs(tmp_path / "cc3m_pairs.csv", 24)
    write_retrieval_sets(tmp_path, 8)
    llm = save_tiny_llm(tmp_path / "llm")
    sets_ = [
        f"stage1.model={llm}", f"data.train.path={tmp_path / 'cc3m_pairs.csv'}",
        f"data.heldout={{coco: {{path: {tmp_path / 'data/eval/coco_karpathy_test.json'}, caption_columns: {{captions: short}}}}}}",
        "stage1.loop.max_steps=2", "stage1.batch_size=4", "stage1.cra_captions=8", "stage1.max_length=32",
    ]  # fmt: skip
    args = ["stage1", "-o", str(tmp_path / "s1")]
    for s in sets_:
        args += ["--set", s]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    m = json.loads((tmp_path / "s1" / "metrics.json").read_text())
    assert (
        m["train"]["steps"] == 2
        and m["eval"]["cra_set"] == "coco"
        and m["data"]["train"] == {"records": 24, "skipped": 0}
    )


def test_llava_data_with_a_forgotten_image_folder_names_it(tmp_path: Path) -> None:
    from llm2clip_vlm.data.conversations import load_llava_records

    path = write_llava_pretrain(tmp_path, 6)
    with pytest.raises(DataError) as e:
        load_llava_records(path, skip_bad=True)
    msg = str(e.value)
    assert "6 of 6 images do not exist" in msg and "skip_bad" not in msg
    assert "set image_folder to the folder" in msg and f"image_folder: {path.parent / 'images'}" in msg
    assert len(load_llava_records(path, image_folder=path.parent / "images")) == 6
