"""Opening a large store is cheap (sizes, shapes, a sample of rows); the full check is on demand."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from store_driver import make_encoder_dir
from typer.testing import CliRunner

import llm2clip_vlm.store.reader as reader
from llm2clip_vlm.cli import app
from llm2clip_vlm.data.records import Caption, ImageCaptions, keep_captions
from llm2clip_vlm.store import format as fmt
from llm2clip_vlm.store.config import EmbedConfig
from llm2clip_vlm.store.store import EmbeddingStore, StoreMismatchError, write_store
from llm2clip_vlm.text.encoder import CaptionEncoder

CFG = EmbedConfig(dtype="fp32", batch_size=4, shard_size=8, precision="fp32")


@pytest.fixture(scope="module")
def enc_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_encoder_dir(tmp_path_factory.mktemp("enc"))


@pytest.fixture(scope="module")
def encoder(enc_dir: Path) -> Iterator[CaptionEncoder]:
    torch.set_num_threads(1)
    yield CaptionEncoder.from_pretrained(enc_dir, device="cpu")


def _records(n: int) -> list[ImageCaptions]:
    return [
        ImageCaptions(
            f"img-{i:03d}",
            f"/x/{i}.png",
            [Caption(f"a thing {i}", "short"), Caption(f"a long thing {i}", "long")],
        )
        for i in range(n)
    ]


def test_cheap_open_reads_no_shard_and_still_refuses_what_is_cheap_to_see(
    tmp_path: Path, encoder: CaptionEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = _records(20)
    out = write_store(encoder, records, tmp_path / "s", CFG)
    monkeypatch.setattr(reader, "FULL_CHECK_BYTES", 0)  # as if the store were large
    hashed: list[str] = []
    real = reader.file_sha256
    monkeypatch.setattr(reader, "file_sha256", lambda p: (hashed.append(str(p)), real(p))[1])
    EmbeddingStore.open(out, captions=records)
    assert hashed == []  # no shard re-hashed
    with pytest.raises(StoreMismatchError, match="captions of"):
        EmbeddingStore.open(out, captions=records[:-1])
    changed = list(records)
    changed[0] = ImageCaptions(
        "img-000", "/x/0.png", [Caption("another text", "short"), records[0].captions[1]]
    )
    with pytest.raises(StoreMismatchError, match=r"row 0 \(image 0 key 'img-000'.*sampled"):
        EmbeddingStore.open(out, captions=changed)
    renamed = [*records[:-1], ImageCaptions("other", "/x/19.png", records[-1].captions)]
    with pytest.raises(StoreMismatchError, match="image 19 has key 'other'"):
        EmbeddingStore.open(out, captions=renamed)
    moved = list(records)  # same totals, one caption moved from image 5 to image 6
    moved[5] = ImageCaptions("img-005", "", records[5].captions[:1])
    moved[6] = ImageCaptions("img-006", "", [*records[6].captions, records[5].captions[1]])
    with pytest.raises(StoreMismatchError, match="image 5 has a different number of captions"):
        EmbeddingStore.open(out, captions=keep_captions(moved, 0))
    # A flipped byte keeps sizes and shapes: only the full check (verify-store) finds it.
    shard = out / fmt.shard_name(1)
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    EmbeddingStore.open(out)
    result = CliRunner().invoke(app, ["verify-store", str(out)])
    assert result.exit_code == 1 and "00001.npy is corrupt" in result.output.replace("\n", "")
    shard.unlink()
    with pytest.raises(StoreMismatchError, match=r"00001.npy \(rows 8-15\) is missing"):
        EmbeddingStore.open(out)


def test_verify_store_command_passes_a_good_store(tmp_path: Path, encoder: CaptionEncoder) -> None:
    out = write_store(encoder, _records(6), tmp_path / "s", CFG)
    result = CliRunner().invoke(app, ["verify-store", str(out)])
    assert result.exit_code == 0 and "ok (6 images, 12 captions" in result.output


@pytest.mark.slow  # torchrun, 2 processes: ~1 min on a shared 2-core CPU
def test_two_processes_embed_captions_streamed_from_shards(
    tmp_path: Path, enc_dir: Path, encoder: CaptionEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses
    import io
    import json
    import os
    import subprocess
    import sys
    import tarfile

    from llm2clip_vlm.data.captions import load_caption_set
    from llm2clip_vlm.data.config import CaptionSetConfig

    monkeypatch.setenv("LLM2CLIP_VLM_CACHE", str(tmp_path / "cache"))
    shards = tmp_path / "shards"
    shards.mkdir()
    records = _records(24)
    for s in range(3):
        with tarfile.open(shards / f"s-{s}.tar", "w") as tar:
            for r in records[8 * s : 8 * s + 8]:
                caps = {"short_captions": r.short, "long_captions": r.long}
                for name, data in (
                    (f"{r.key}.jpg", b"\xff" * 5000),
                    (f"{r.key}.json", json.dumps(caps).encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    one = write_store(encoder, load_caption_set(CaptionSetConfig(path=str(shards))), tmp_path / "one", CFG)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(dataclasses.asdict(CFG)))
    driver = Path(__file__).with_name("store_driver.py")
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver),
         str(enc_dir), str(shards), str(tmp_path / "two"), str(cfg)],
        env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]

    def files(path: Path) -> dict[str, bytes]:
        return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}

    assert files(tmp_path / "two") == files(one)  # each rank wrote its share; the same store
    EmbeddingStore.open(tmp_path / "two", captions=load_caption_set(CaptionSetConfig(path=str(shards))))
