"""LLM2CLIP's side-cars across a list of training sets (``data.train: [cc3m, cc12m]``).

The paper trains on CC3M + CC12M: two img2dataset runs, each with the side-cars LLM2CLIP's
``llm2clip/data/extract_embedding.py`` (microsoft/LLM2CLIP) writes beside its shards
(``NNNNN_text_embeddings.tar``: per key ``KEY.shortSV_captions`` / ``KEY.longSV_captions``, one
float32 vector each). Both runs number their keys from ``000000000`` (rom1504/img2dataset
``img2dataset/downloader.py`` ``compute_key``), so the keys collide and the joined training set
names them ``<set>/<key>`` (``llm2clip_vlm/data/sets.py``). The replicas are
``tests/img2dataset_replica.py``'s, built from those tools' source.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from img2dataset_replica import CAPTION_COLUMNS, samples, solid_images, write_img2dataset, write_sidecars

from llm2clip_vlm.data.config import CaptionSetConfig


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM2CLIP_VLM_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from store_driver import make_encoder_dir

    return make_encoder_dir(tmp_path_factory.mktemp("sidecar-sets-encoder"))


def _set(path: Path, **kw) -> CaptionSetConfig:
    return CaptionSetConfig(path=str(path), caption_columns=dict(CAPTION_COLUMNS), **kw)


def _two_runs(root: Path, encoder: Path, second_sidecars: bool = True) -> dict[str, dict]:
    """Two img2dataset runs (keys colliding) with side-cars the encoder made; ``{set: vectors}``."""
    from llm2clip_vlm.text.encoder import CaptionEncoder

    enc = CaptionEncoder.from_pretrained(encoder)
    out = {}
    for name, n, seed, per_shard in (("cc3m", 6, 0, 4), ("cc12m", 5, 1, 2)):
        shards = write_img2dataset(
            root / name, samples(solid_images(n, seed=seed), start=100 * seed), per_shard
        )
        if name == "cc3m" or second_sidecars:
            out[name] = write_sidecars(shards, enc.hidden_size, encode=lambda t: enc.encode(t).numpy())
    return out


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "LLM2CLIP side-cars" in r.getMessage()]


def test_stage2_imports_every_sets_sidecars_under_namespaced_keys(
    tmp_path: Path, tiny_encoder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from fault_driver import stage2_cfg

    from llm2clip_vlm.commands import run_stage2
    from llm2clip_vlm.data.captions import load_caption_sets
    from llm2clip_vlm.store.store import EmbeddingStore
    from llm2clip_vlm.text.encoder import encoder_identity

    vectors = _two_runs(tmp_path, tiny_encoder)
    assert set(vectors["cc3m"]) & set(vectors["cc12m"])  # the two runs' keys collide
    cfg = stage2_cfg(["stage2.loop.max_steps=2", "stage2.batch_size=4"])
    cfg.data.train = [_set(tmp_path / "cc3m"), _set(tmp_path / "cc12m")]
    caplog.set_level("INFO")
    metrics = run_stage2(cfg, tmp_path / "s2", store_dir=tmp_path / "store", encoder_dir=tiny_encoder)
    lines = _lines(caplog)
    assert len(lines) == 1, lines
    assert "cc3m (2), cc12m (3)" in lines[0] and "5 side-cars" in lines[0] and "imported" in lines[0]
    assert metrics["train"]["steps"] == 2

    # The store follows the joined set: cc3m's records then cc12m's, keys "<set>/<key>", and
    # each row is the side-car's vector of that set's key (fp32: exactly).
    records = load_caption_sets(cfg.data.train)
    keys = [r.key for r in records]
    first = sorted(vectors["cc3m"])[0]  # compute_key: zero-padded, the same in both runs
    assert keys[0] == f"cc3m/{first}" and keys[6] == f"cc12m/{first}" and len(set(keys)) == 11
    store = EmbeddingStore.open(tmp_path / "store" / "train", captions=records)  # key + caption hashes
    assert store.num_images == 11 and store.encoder_identity == encoder_identity(tiny_encoder)
    expected = np.stack([
        vectors[r.key.split("/")[0]][r.key.split("/")[1]][field]
        for r in records for field in ("shortSV_captions", "longSV_captions")
    ])  # fmt: skip
    assert np.array_equal(store[np.arange(22)], expected)


def test_a_set_without_sidecars_or_with_other_settings_is_named_in_one_line(
    tmp_path: Path, tiny_encoder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from llm2clip_vlm.imports.sidecar import offer_sidecars

    _two_runs(tmp_path, tiny_encoder, second_sidecars=False)
    sets = [_set(tmp_path / "cc3m"), _set(tmp_path / "cc12m")]
    assert offer_sidecars(sets, tmp_path / "store", tiny_encoder) is None
    (line,) = _lines(caplog)
    assert "data.train set 'cc12m'" in line and "ignored" in line and "no side-cars" in line
    assert "'cc3m'" in line and "run `embed` for the list" in line
    assert not (tmp_path / "store").exists()

    # Both have side-cars, the second set caps its images: ignored, naming that set's setting.
    caplog.clear()
    _two_runs(tmp_path / "b", tiny_encoder)
    sets = [_set(tmp_path / "b" / "cc3m"), _set(tmp_path / "b" / "cc12m", name="web", max_images=2)]
    assert offer_sidecars(sets, tmp_path / "store", tiny_encoder) is None
    (line,) = _lines(caplog)
    assert "data.train set 'web'" in line and "data.train[1].max_images keeps part of the set" in line
    assert not (tmp_path / "store").exists()


def test_a_list_of_one_set_is_that_set(
    tmp_path: Path, tiny_encoder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from llm2clip_vlm.imports.sidecar import offer_sidecars
    from llm2clip_vlm.store.store import EmbeddingStore

    vectors = _two_runs(tmp_path, tiny_encoder)["cc3m"]
    caplog.set_level("INFO")
    summary = offer_sidecars([_set(tmp_path / "cc3m")], tmp_path / "store", tiny_encoder)
    assert summary is not None and summary["images"] == 6
    (line,) = _lines(caplog)
    assert line.startswith(f"LLM2CLIP side-cars beside {tmp_path / 'cc3m'}: 2 side-cars")
    from llm2clip_vlm.data.captions import load_caption_set

    records = load_caption_set(_set(tmp_path / "cc3m"))
    store = EmbeddingStore.open(tmp_path / "store" / "train", captions=records)  # unprefixed keys
    assert np.array_equal(
        store[np.arange(2)],
        np.stack([vectors[sorted(vectors)[0]][f] for f in ("shortSV_captions", "longSV_captions")]),
    )


def test_cli_import_embeddings_takes_a_recipes_list_of_sets(tmp_path: Path, tiny_encoder: Path) -> None:
    """``import-embeddings --recipe R`` (or ``PATH... --sets``) writes the one store stage 2 reads:
    rows in the joined order under ``<set>/<key>``, each the side-car's vector."""
    import yaml
    from typer.testing import CliRunner

    from llm2clip_vlm.cli import app
    from llm2clip_vlm.data.captions import load_caption_sets
    from llm2clip_vlm.store.store import EmbeddingStore
    from llm2clip_vlm.text.encoder import encoder_identity

    vectors = _two_runs(tmp_path, tiny_encoder)
    train = [
        {"path": str(tmp_path / "cc3m"), "caption_columns": dict(CAPTION_COLUMNS)},
        {"path": str(tmp_path / "cc12m"), "caption_columns": dict(CAPTION_COLUMNS), "weight": 2.0},
    ]
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"train": train}}))
    args = ["import-embeddings", "--recipe", str(recipe), "--encoder", str(tiny_encoder)]
    ok = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "store")])
    assert ok.exit_code == 0, ok.output
    assert "22 captions of 11 images" in ok.output
    records = load_caption_sets([_set(tmp_path / "cc3m"), _set(tmp_path / "cc12m", weight=2.0)])
    store = EmbeddingStore.open(tmp_path / "store" / "train", captions=records)  # keys + caption hashes
    assert store.encoder_identity == encoder_identity(tiny_encoder)
    expected = np.stack([
        vectors[r.key.split("/")[0]][r.key.split("/")[1]][field]
        for r in records for field in ("shortSV_captions", "longSV_captions")
    ])  # fmt: skip
    assert records[0].key.startswith("cc3m/") and records[6].key.startswith("cc12m/")
    assert np.array_equal(store[np.arange(22)], expected)

    # Several paths, each a set: the same store, row for row.
    paths = [str(tmp_path / "cc3m"), str(tmp_path / "cc12m")]
    two = CliRunner().invoke(app, ["import-embeddings", *paths, "--sets", "-o", str(tmp_path / "s2")])
    assert two.exit_code == 0, two.output
    again = EmbeddingStore.open(tmp_path / "s2" / "train", captions=records)
    assert np.array_equal(again[np.arange(22)], expected)

    # A set the side-cars cannot serve: one line naming it and the fix, no traceback, no store.
    recipe.write_text(yaml.safe_dump({"data": {"train": [train[0], {"path": str(tmp_path / "cc12m")}]}}))
    bad = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "s3")])
    assert bad.exit_code == 1 and "Traceback" not in bad.output
    line = " ".join(bad.output.split())
    assert "data.train[1] (cc12m): side-cars unusable" in line
    assert "set data.train[1].caption_columns to {shortSV_captions: short, longSV_captions: long}" in line
    assert not (tmp_path / "s3").exists()
    both = CliRunner().invoke(app, [*args, paths[0]])
    assert both.exit_code == 2 and "SHARDS or --recipe, not both" in both.output
