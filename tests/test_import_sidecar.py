"""import-embeddings: the official *_text_embeddings.tar side-cars -> our store, row for row."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from llm2clip_vlm.cli import app
from llm2clip_vlm.data.captions import load_caption_set
from llm2clip_vlm.data.config import CaptionSetConfig
from llm2clip_vlm.imports.checkpoint import ImportRefused
from llm2clip_vlm.imports.sidecar import import_sidecars, read_sidecar
from llm2clip_vlm.store.store import EmbeddingStore

DIM = 6


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def official_shard(root: Path, name: str, n: int, seed: int) -> tuple[Path, dict[str, np.ndarray]]:
    """An img2dataset shard (key.jpg + key.json with the DreamLIP fields) and the side-car that
    extract_embedding.py writes beside it: members <key>.shortSV_captions / <key>.longSV_captions,
    each vector.numpy().tobytes() of a float32 vector (webdataset's TarWriter names a member
    key + "." + field)."""
    rng = np.random.default_rng(seed)
    shard, vectors = root / f"{name}.tar", {}
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="JPEG")
    with tarfile.open(shard, "w") as img, tarfile.open(root / f"{name}_text_embeddings.tar", "w") as side:
        for i in range(n):
            key = f"{name}{i:04d}"
            _add(img, f"{key}.jpg", buf.getvalue())
            caps = {
                "raw_caption": f"raw {key}",
                "shortSV_captions": f"short {key}",
                "longSV_captions": f"a long caption of {key}",
            }
            _add(img, f"{key}.json", json.dumps(caps).encode())
            for field in ("shortSV_captions", "longSV_captions"):
                v = rng.standard_normal(DIM).astype(np.float32)
                vectors[f"{key}.{field}"] = v
                _add(side, f"{key}.{field}", v.tobytes())
    return shard, vectors


def test_sidecars_become_a_store_row_for_row(tmp_path: Path) -> None:
    a, va = official_shard(tmp_path, "00000", 3, 0)
    b, vb = official_shard(tmp_path, "00001", 2, 1)
    summary = import_sidecars([a, b], tmp_path / "store", shard_size=4)
    assert (summary["rows"], summary["images"], summary["dim"]) == (10, 5, DIM)
    # Stage 2 reads the same shards with the same reader: the store must match them row by row.
    records = [r for s in (a, b) for r in load_caption_set(
        CaptionSetConfig(path=str(s), format="webdataset", caption_columns={"shortSV_captions": "short", "longSV_captions": "long"}))]  # fmt: skip
    store = EmbeddingStore.open(tmp_path / "store" / "train", captions=records)
    expected = np.stack(
        [{**va, **vb}[f"{r.key}.{f}"] for r in records for f in ("shortSV_captions", "longSV_captions")]
    )
    assert np.array_equal(store[np.arange(10)], expected)  # fp32: exactly the side-car values
    assert store.encoder_identity.startswith("official-sidecars:")


def test_bad_sidecars_are_refused_by_name(tmp_path: Path) -> None:
    shard, _ = official_shard(tmp_path, "00000", 2, 0)
    side = tmp_path / "00000_text_embeddings.tar"
    with tarfile.open(side, "a") as t:
        _add(t, "000000001.txt", b"x")
    with pytest.raises(ImportRefused, match="000000001.txt"):
        read_sidecar(side)
    shard, _ = official_shard(tmp_path, "00000", 2, 0)
    with tarfile.open(side, "w") as t:  # one image's long vector missing
        _add(t, "000000000.shortSV_captions", np.zeros(DIM, np.float32).tobytes())
        _add(t, "000000000.longSV_captions", np.zeros(DIM, np.float32).tobytes())
        _add(t, "000000001.shortSV_captions", np.zeros(DIM, np.float32).tobytes())
    with pytest.raises(ImportRefused, match=r"'000000001' lacks longSV_captions"):
        import_sidecars([shard], tmp_path / "s")
    (tmp_path / "lonely.tar").write_bytes(shard.read_bytes())
    with pytest.raises(ImportRefused, match="no side-car lonely_text_embeddings.tar"):
        import_sidecars([tmp_path / "lonely.tar"], tmp_path / "s2")


def test_cli_import_embeddings(tmp_path: Path) -> None:
    shard, _ = official_shard(tmp_path, "00000", 2, 0)
    ok = CliRunner().invoke(app, ["import-embeddings", str(shard), "-o", str(tmp_path / "store")])
    assert ok.exit_code == 0, ok.output
    bad = CliRunner().invoke(
        app, ["import-embeddings", str(tmp_path / "none.tar"), "-o", str(tmp_path / "s")]
    )
    assert bad.exit_code == 1 and "none.tar" in bad.output


def test_import_streams_the_vectors_and_names_a_non_finite_one(tmp_path: Path) -> None:
    # The side-cars' vectors are read by seeking when each store shard is written (none is held
    # for the whole import); a NaN is refused naming the side-car and the key.
    shard, vectors = official_shard(tmp_path, "00000", 5, 0)
    side = tmp_path / "00000_text_embeddings.tar"
    with tarfile.open(side) as t:
        member = next(m for m in t if m.name == "00000" + "0003.longSV_captions")
    data = bytearray(side.read_bytes())
    data[member.offset_data : member.offset_data + 4] = np.float32("nan").tobytes()
    side.write_bytes(bytes(data))
    with pytest.raises(
        ImportRefused, match=r"00000_text_embeddings\.tar: the longSV_captions vector of '000000003'"
    ):
        import_sidecars([shard], tmp_path / "store", shard_size=4)
