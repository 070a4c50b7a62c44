"""Where stage 1's CRA pairs come from: a named held-out set, the first one with pairs, or a slice
of the training data held out of training; and what the CLI says when there is none."""

from __future__ import annotations

import json
from pathlib import Path

import cli_fork
import pytest

from llm2clip_vlm.data import DataError
from llm2clip_vlm.data.records import Caption, ImageCaptions
from llm2clip_vlm.text.cra import TRAIN_SLICE, caption_pairs, choose_cra_source


def records(n: int, short: int, long: int = 1, prefix: str = "img") -> list[ImageCaptions]:
    return [
        ImageCaptions(
            f"{prefix}{i}",
            f"/data/{prefix}{i}.png",
            [Caption(f"{prefix} {i} short {j}", "short") for j in range(short)]
            + [Caption(f"{prefix} {i} long {j}", "long") for j in range(long)],
        )
        for i in range(n)
    ]


def test_default_is_the_first_heldout_set_with_short_pairs() -> None:
    train = records(50, 2)
    heldout = {"docci": records(10, 0, prefix="d"), "coco": records(10, 5, prefix="c"), "f": records(10, 5)}
    src = choose_cra_source(train, heldout)
    assert src.name == "coco" and not src.from_training_data
    assert src.train_records == train  # nothing taken from training
    assert caption_pairs(src.records, 1000)[0] == ("c 0 short 0", "c 0 short 1")
    assert src.describe() == {"cra_set": "coco", "cra_from_training_data": False}


def test_a_named_set_is_used_and_bad_names_are_refused() -> None:
    train = records(50, 2)
    heldout = {
        "coco": records(10, 5, prefix="c"),
        "flickr": records(10, 5, prefix="f"),
        "urban": records(10, 0),
    }
    assert choose_cra_source(train, heldout, "flickr").name == "flickr"
    with pytest.raises(
        DataError, match=r"no held-out set named 'cocoo' \(held-out sets: coco, flickr, urban\)"
    ):
        choose_cra_source(train, heldout, "cocoo")
    with pytest.raises(DataError, match="'urban' has no two images with two or more short captions"):
        choose_cra_source(train, heldout, "urban")


def test_without_a_usable_heldout_set_a_training_slice_is_held_out() -> None:
    train = records(60, 2) + records(5, 1, prefix="one")  # the last 5 have a single short caption
    src = choose_cra_source(train, {"urban1k": records(10, 0)}, max_captions=1000)
    assert src.name == TRAIN_SLICE and src.from_training_data
    # At most 10 % of the 65 images (6), the last ones that have two short captions.
    assert [r.key for r in src.records] == [f"img{i}" for i in range(54, 60)]
    assert len(src.train_records) == 59
    assert not {r.key for r in src.records} & {r.key for r in src.train_records}  # left out of training
    assert src.describe() == {
        "cra_set": "train",
        "cra_from_training_data": True,
        "cra_held_out_of_training": 6,
    }
    # Deterministic, and capped by stage1.cra_captions (4 captions = 2 images).
    assert [r.key for r in choose_cra_source(train, {}, max_captions=1000).records] == [
        r.key for r in src.records
    ]
    assert [r.key for r in choose_cra_source(train, {}, max_captions=4).records] == ["img58", "img59"]


def test_no_pairs_anywhere_is_one_clear_error() -> None:
    with pytest.raises(DataError, match="no held-out set .* has two or more short captions per image"):
        choose_cra_source(records(30, 1), {"docci": records(5, 0)})


def test_cli_refuses_an_unknown_cra_set_in_one_line(tmp_path: Path) -> None:
    """Through the CLI: one line naming the setting and the sets, exit status 1, no traceback."""
    from llm2clip_vlm.data.synthetic import write_demo_dataset

    write_demo_dataset(tmp_path / "demo", train_images=8, heldout_images=4, show_progress=False)
    args = ["--set=data.demo_dir=" + str(tmp_path / "demo"), "--set=data.demo_train_images=8",
            "--set=data.demo_heldout_images=4", "--set=stage1.cra_set=coco"]  # fmt: skip
    # A new process, forked from tests/cli_fork.py's server (no warnings, COLUMNS=250).
    code, _, stderr = cli_fork.run(["stage1", "-o", str(tmp_path / "run"), *args], timeout=300)
    assert code == 1, stderr[-2000:]
    assert "stage1.cra_set: no held-out set named 'coco' (held-out sets: short, long)" in stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert json.loads((tmp_path / "demo" / "dataset.json").read_text())["train_images"] == 8
