"""The caption embedding store: values, indexing, resume after a kill, refusals, 2 processes."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from store_driver import make_encoder_dir, make_records

from llm2clip_vlm.data.records import Caption, ImageCaptions
from llm2clip_vlm.store import format as fmt
from llm2clip_vlm.store.config import EmbedConfig
from llm2clip_vlm.store.store import (
    EmbeddingStore,
    StoreConflictError,
    StoreInputError,
    StoreMismatchError,
    write_store,
)
from llm2clip_vlm.store.writer import bucket_batches, to_storage
from llm2clip_vlm.text.encoder import CaptionEncoder

DRIVER = Path(__file__).with_name("store_driver.py")


def texts_of(records: list[ImageCaptions]) -> list[str]:
    return [c.text for r in records for c in r.captions]


def store_files(path: Path) -> dict[str, bytes]:
    """Every file of a store by relative path (plan, manifest, metadata, shards, sidecars)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


CFG = EmbedConfig(dtype="fp32", batch_size=4, shard_size=8, precision="fp32")


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest single-threaded, and the 2-core machine is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def enc_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_encoder_dir(tmp_path_factory.mktemp("store-enc"))


@pytest.fixture(scope="module")
def encoder(enc_dir: Path) -> CaptionEncoder:
    return CaptionEncoder.from_pretrained(enc_dir, device="cpu")


@pytest.fixture(scope="module")
def records() -> list[ImageCaptions]:
    return make_records()


@pytest.fixture(scope="module")
def reference(encoder: CaptionEncoder, records: list[ImageCaptions]) -> np.ndarray:
    """Embeddings straight from ``encoder.encode`` (float32), in row order."""
    return encoder.encode(texts_of(records), batch_size=4).numpy()


@pytest.fixture(scope="module")
def full_store(tmp_path_factory: pytest.TempPathFactory, encoder: CaptionEncoder, records: list) -> Path:
    """An uninterrupted 1-process fp32 store (the reference for resume and 2-process runs)."""
    return write_store(encoder, records, tmp_path_factory.mktemp("full") / "store", CFG)


# --------------------------------------------------------------------------------------------
# Values and indexing
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("dtype", "rtol"), [("fp32", 1e-5), ("fp16", 2**-10), ("bf16", 2**-7)])
def test_round_trip_every_dtype(
    tmp_path: Path, encoder: CaptionEncoder, records: list, reference: np.ndarray, dtype: str, rtol: float
) -> None:
    out = write_store(encoder, records, tmp_path / "s", dataclasses.replace(CFG, dtype=dtype))
    store = EmbeddingStore.open(out, captions=records, encoder_identity=encoder.identity())
    n = len(texts_of(records))
    assert (store.num_rows, store.num_images, store.dim, store.dtype) == (
        n,
        len(records),
        encoder.hidden_size,
        dtype,
    )
    values = store[np.arange(n)]
    assert values.shape == (n, encoder.hidden_size)
    assert values.dtype == (np.float16 if dtype == "fp16" else np.float32)  # bf16 is widened to fp32
    # To the stored dtype's precision (relative rounding error <= 2^-mantissa bits).
    scale = np.abs(reference).max()
    np.testing.assert_allclose(values.astype(np.float32), reference, rtol=rtol, atol=rtol * scale * 1e-2)
    assert not np.array_equal(values[0], values[1])  # distinct captions, distinct vectors
    t = store.tensor([0, 5])
    assert t.dtype == {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    np.testing.assert_array_equal(t.float().numpy(), values[[0, 5]].astype(np.float32))
    m = store.manifest
    assert m["encoder_identity"] == encoder.identity() and m["pooling"] == "mean"
    assert [(s["start"], s["stop"]) for s in m["shards"]] == fmt.shard_ranges(n, CFG.shard_size)
    assert all(len(s["sha256"]) == 64 for s in m["shards"])
    assert (out / fmt.CAPTION_HASHES).is_file() and np.load(out / fmt.CAPTION_HASHES).shape == (n, 32)


def test_memory_mapped_reads_and_indexing(full_store: Path, records: list, reference: np.ndarray) -> None:
    store = EmbeddingStore.open(full_store)
    shard = store._shard(0)
    assert isinstance(shard, np.memmap)  # rows are read from the file, not loaded up front
    n = store.num_rows
    np.testing.assert_allclose(store[3], reference[3], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(store[-1], reference[-1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(store[5:19], reference[5:19], rtol=1e-5, atol=1e-6)  # crosses shard boundaries
    rows = [n - 1, 0, 9, 9, 17]
    np.testing.assert_allclose(store[rows], reference[rows], rtol=1e-5, atol=1e-6)
    with pytest.raises(IndexError):
        store[[n]]


def test_caption_rows(full_store: Path, records: list, reference: np.ndarray) -> None:
    store = EmbeddingStore.open(full_store)
    row = 0
    for i, rec in enumerate(records):
        for kind in ("short", "long"):
            expected = [row + j for j, c in enumerate(rec.captions) if c.kind == kind]
            got = store.caption_rows(i, kind)
            assert got.tolist() == expected
            np.testing.assert_allclose(store[got], reference[expected], rtol=1e-5, atol=1e-6)
        row += len(rec.captions)
    assert row == store.num_rows
    with pytest.raises(IndexError):
        store.caption_rows(len(records), "short")
    with pytest.raises(ValueError, match="kind"):
        store.caption_rows(0, "medium")


# --------------------------------------------------------------------------------------------
# Length bucketing
# --------------------------------------------------------------------------------------------
def test_bucket_batches_cover_every_row_once_by_length() -> None:
    lengths = [5, 30, 7, 30, 12, 3, 9, 21, 4]
    batches = bucket_batches(lengths, 4, bucket=True)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths, reverse=True)
    assert bucket_batches(lengths, 4, bucket=False) == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]


def test_bucketing_keeps_row_order_and_cuts_padding(
    tmp_path: Path, encoder: CaptionEncoder, records: list, reference: np.ndarray
) -> None:
    plain = write_store(
        encoder, records, tmp_path / "plain", dataclasses.replace(CFG, bucket_by_length=False)
    )
    bucketed = EmbeddingStore.open(write_store(encoder, records, tmp_path / "bucketed", CFG))
    unbucketed = EmbeddingStore.open(plain)
    # Same rows in the same order (each row is its caption's embedding), whatever the batching.
    np.testing.assert_allclose(bucketed[:], reference, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(unbucketed[:], reference, rtol=1e-5, atol=1e-6)
    tb, tu = bucketed.manifest["tokens"], unbucketed.manifest["tokens"]
    assert tb["real"] == tu["real"]
    assert tb["computed"] < tu["computed"]
    ids = encoder.tokenizer(texts_of(records), truncation=True, max_length=encoder.max_length)["input_ids"]
    assert max(len(x) for x in ids) == encoder.max_length  # the longest caption is cut, and counted so
    lengths = [len(x) for x in ids]
    assert tb["real"] == sum(lengths)
    # The cut captions are counted (issue 23: no caption is cut silently).
    whole = encoder.tokenizer(texts_of(records))["input_ids"]
    cut = sum(len(x) > encoder.max_length for x in whole)
    assert cut > 0 and tb["cut_captions"] == tu["cut_captions"] == cut


def test_padding_only_to_the_longest_gives_the_same_embeddings_with_fewer_tokens(
    tmp_path: Path, encoder: CaptionEncoder, records: list, reference: np.ndarray
) -> None:
    """Padding is masked out of attention and pooling, so the multiple the store pads its
    length-sorted batches to changes only float rounding (issue 28: the demo pads to 1, not 8)."""
    assert encoder.pad_to_multiple_of == 16  # as stage 1 padded (the encoder's record)
    padded = EmbeddingStore.open(
        write_store(encoder, records, tmp_path / "p16", dataclasses.replace(CFG, bucket_by_length=False))
    )
    cfg1 = dataclasses.replace(CFG, bucket_by_length=False, pad_to_multiple_of=1)
    tight = EmbeddingStore.open(write_store(encoder, records, tmp_path / "p1", cfg1))
    assert encoder.pad_to_multiple_of == 16  # restored after the pass
    np.testing.assert_allclose(tight[:], reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tight[:], padded[:], rtol=1e-5, atol=1e-5)
    t16, t1 = padded.manifest["tokens"], tight.manifest["tokens"]
    assert t1["real"] == t16["real"]
    assert t1["real"] < t1["computed"] < t16["computed"]  # unsorted batches still pad to their longest
    # Every computed token of a batch: its size times its longest caption (rounded up to 16 in p16).
    ids = encoder.tokenizer(texts_of(records), truncation=True, max_length=encoder.max_length)["input_ids"]
    batches = [[len(x) for x in ids[i : i + 4]] for i in range(0, len(ids), 4)]
    assert t1["computed"] == sum(len(b) * max(b) for b in batches)
    assert t16["computed"] == sum(len(b) * 16 * -(-max(b) // 16) for b in batches)
    # The setting is part of the plan (it changes rounding); unset, the plan is as before it existed.
    assert tight.manifest["pad_to_multiple_of"] == 1 and "pad_to_multiple_of" not in padded.manifest
    with pytest.raises(StoreConflictError, match="pad_to_multiple_of"):
        write_store(encoder, records, tmp_path / "p1", dataclasses.replace(cfg1, pad_to_multiple_of=8))
    with pytest.raises(StoreConflictError, match="pad_to_multiple_of: 1 there, unset"):
        write_store(encoder, records, tmp_path / "p1", dataclasses.replace(cfg1, pad_to_multiple_of=0))


# --------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------
class CrashingEncoder:
    """Delegates to a CaptionEncoder; raises on encode call ``crash_at`` (simulated kill)."""

    def __init__(self, inner: CaptionEncoder, crash_at: int | None = None) -> None:
        self.inner, self.crash_at, self.calls = inner, crash_at, 0

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self.inner, name)

    def encode(self, texts: list[str], **kw) -> torch.Tensor:  # noqa: ANN003
        self.calls += 1
        if self.calls == self.crash_at:
            raise KeyboardInterrupt("simulated kill")
        return self.inner.encode(texts, **kw)


def test_kill_after_shard_k_then_rerun_is_identical(
    tmp_path: Path, encoder: CaptionEncoder, records: list, full_store: Path
) -> None:
    out = tmp_path / "s"
    batches_per_shard = CFG.shard_size // CFG.batch_size
    # Die in the middle of shard 2 (0-based): shards 0 and 1 are complete, shard 2 is not.
    crashing = CrashingEncoder(encoder, crash_at=2 * batches_per_shard + 2)
    with pytest.raises(KeyboardInterrupt):
        write_store(crashing, records, out, CFG)
    assert sorted(p.name for p in (out / fmt.SHARD_DIR).glob("*.json")) == ["00000.json", "00001.json"]
    assert not (out / fmt.MANIFEST).exists()
    with pytest.raises(StoreMismatchError, match="incomplete store.*2 shards done"):
        EmbeddingStore.open(out)
    rerun = CrashingEncoder(encoder)
    write_store(rerun, records, out, CFG)
    n_batches = sum(
        -(-(b - a) // CFG.batch_size) for a, b in fmt.shard_ranges(len(texts_of(records)), CFG.shard_size)
    )
    assert rerun.calls == n_batches - 2 * batches_per_shard  # shards 0 and 1 were kept, not redone
    assert store_files(out) == store_files(full_store)


def test_sigkill_subprocess_then_rerun_is_identical(
    tmp_path: Path, enc_dir: Path, encoder: CaptionEncoder, records: list, full_store: Path
) -> None:
    recs = tmp_path / "records.json"
    recs.write_text(
        json.dumps([{"key": r.key, "captions": [[c.text, c.kind] for c in r.captions]} for r in records])
    )
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(dataclasses.asdict(CFG)))
    out = tmp_path / "s"
    proc = subprocess.Popen(
        [sys.executable, str(DRIVER), str(enc_dir), str(recs), str(out), str(cfg), "0.3"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while len(list((out / fmt.SHARD_DIR).glob("*.json"))) < 2:
            assert proc.poll() is None, "the writer exited before it could be killed"
            assert time.monotonic() < deadline, "no shard written within 60 s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / fmt.MANIFEST).exists()
    write_store(encoder, records, out, CFG)
    # Leftover temp files of the killed run do not count as part of the store.
    assert {k: v for k, v in store_files(out).items() if not k.endswith(".partial")} == store_files(
        full_store
    )


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------
def test_changed_caption_is_refused_naming_the_row(full_store: Path, records: list) -> None:
    changed = [ImageCaptions(r.key, r.image, list(r.captions), r.source) for r in records]
    row = sum(len(r.captions) for r in records[:4]) + len(records[4].captions) - 1
    last = changed[4].captions[-1]
    changed[4].captions[-1] = Caption(last.text + " today", last.kind)
    with pytest.raises(StoreMismatchError, match=rf"row {row} \(image 4 key 'img-004'.*today"):
        EmbeddingStore.open(full_store, captions=changed)
    swapped_kind = [ImageCaptions(r.key, r.image, list(r.captions), r.source) for r in records]
    c = swapped_kind[0].captions[0]
    swapped_kind[0].captions[0] = Caption(c.text, "long" if c.kind == "short" else "short")
    with pytest.raises(StoreMismatchError, match=r"row 0 \(image 0"):
        EmbeddingStore.open(full_store, captions=swapped_kind)
    with pytest.raises(StoreMismatchError, match="captions of"):
        EmbeddingStore.open(full_store, captions=records[:-1])
    renamed = [ImageCaptions(r.key, r.image, list(r.captions), r.source) for r in records]
    renamed[7] = ImageCaptions("other", "", list(records[7].captions))
    with pytest.raises(StoreMismatchError, match="image 7 has key 'other'"):
        EmbeddingStore.open(full_store, captions=renamed)
    EmbeddingStore.open(full_store, captions=records)  # the unchanged data is accepted


def test_changed_encoder_is_refused(
    tmp_path: Path, full_store: Path, encoder: CaptionEncoder, records: list
) -> None:
    other = CaptionEncoder.from_pretrained(make_encoder_dir(tmp_path / "other", seed=1), device="cpu")
    assert other.identity() != encoder.identity()
    with pytest.raises(StoreMismatchError, match=f"embedded by encoder {encoder.identity()[:16]}"):
        EmbeddingStore.open(full_store, encoder_identity=other.identity())
    # Writing into a store made by another encoder is refused too, naming the field.
    out = tmp_path / "s"
    write_store(encoder, records, out, CFG)
    with pytest.raises(StoreMismatchError, match="encoder_identity"):
        write_store(other, records, out, CFG)
    with pytest.raises(StoreMismatchError, match="dtype: 'fp32' there, 'fp16' now"):
        write_store(encoder, records, out, dataclasses.replace(CFG, dtype="fp16"))


def test_truncated_or_corrupted_shard_is_refused_and_rewritten(
    tmp_path: Path, encoder: CaptionEncoder, records: list, full_store: Path
) -> None:
    out = write_store(encoder, records, tmp_path / "s", CFG)
    shard = out / fmt.shard_name(1)
    good = shard.read_bytes()
    shard.write_bytes(good[:-10])
    with pytest.raises(StoreMismatchError, match=r"shard .*00001.npy is truncated"):
        EmbeddingStore.open(out)
    corrupt = bytearray(good)
    corrupt[-3] ^= 0xFF
    shard.write_bytes(bytes(corrupt))
    EmbeddingStore.open(out, verify_checksums=False)  # shape and size still fine ...
    with pytest.raises(StoreMismatchError, match=r"shard .*00001.npy is corrupt"):
        EmbeddingStore.open(out)  # ... but the checksum is not
    (out / fmt.shard_name(2)).unlink()
    with pytest.raises(StoreMismatchError, match=r"00002.npy \(rows 16-23\) is missing"):
        EmbeddingStore.open(out, verify_checksums=False)
    # A rerun recomputes exactly the damaged shards and gives the uninterrupted store back.
    write_store(encoder, records, out, CFG)
    assert store_files(out) == store_files(full_store)
    (out / fmt.MANIFEST).unlink()
    with pytest.raises(StoreMismatchError, match="incomplete store"):
        EmbeddingStore.open(out)
    with pytest.raises(StoreMismatchError, match="no such directory"):
        EmbeddingStore.open(tmp_path / "nothing")


def test_bad_caption_stops_naming_the_record(tmp_path: Path, encoder: CaptionEncoder, records: list) -> None:
    bad = list(records)
    bad[3] = ImageCaptions(
        "img-003", "", [Caption("a red star", "short"), Caption("  ", "long")], "train.jsonl:4"
    )
    with pytest.raises(
        StoreInputError, match=r"record 3 \(key 'img-003', train.jsonl:4\): caption 1 \(long\) is empty"
    ):
        write_store(encoder, bad, tmp_path / "s", CFG)
    bad[3] = ImageCaptions("img-003", "", [Caption(None, "short")], "train.jsonl:4")  # type: ignore[arg-type]
    with pytest.raises(StoreInputError, match="caption 0 is not text"):
        write_store(encoder, bad, tmp_path / "s", CFG)
    assert not (tmp_path / "s").exists()  # refused before anything was written


def test_fp16_overflow_is_refused() -> None:
    ok = to_storage(torch.tensor([[1.0, -2.5]]), "fp16", "shard 0")
    assert ok.dtype == np.float16 and ok.tolist() == [[1.0, -2.5]]
    with pytest.raises(ValueError, match="shard 3.*not finite in fp16.*bf16"):
        to_storage(torch.tensor([[1e6, 0.0]]), "fp16", "shard 3")
    bits = to_storage(torch.tensor([[1e6, 0.5]]), "bf16", "shard 3")
    assert bits.dtype == np.uint16
    np.testing.assert_allclose(fmt.to_float32(bits, "bf16"), [[1e6, 0.5]], rtol=2**-8)


# --------------------------------------------------------------------------------------------
# Two processes
# --------------------------------------------------------------------------------------------
def test_two_processes_write_the_same_store_as_one(
    tmp_path: Path, enc_dir: Path, records: list, full_store: Path
) -> None:
    recs = tmp_path / "records.json"
    recs.write_text(
        json.dumps([{"key": r.key, "captions": [[c.text, c.kind] for c in r.captions]} for r in records])
    )
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(dataclasses.asdict(CFG)))
    out = tmp_path / "s"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(DRIVER), str(enc_dir), str(recs), str(out), str(cfg)],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    n_shards = len(fmt.shard_ranges(len(texts_of(records)), CFG.shard_size))
    shares = [list(fmt.rank_shards(n_shards, r, 2)) for r in range(2)]
    assert shares[0] + shares[1] == list(range(n_shards)) and abs(len(shares[0]) - len(shares[1])) <= 1
    assert store_files(out) == store_files(full_store)


def test_store_errors_are_described_by_type_not_wording() -> None:
    from llm2clip_vlm.errors import describe
    from llm2clip_vlm.store.reader import StoreConflictError

    conflict = describe(StoreConflictError("out holds a store built from other inputs; remove it"))
    assert conflict is not None and conflict.message == "out holds a store built from other inputs; remove it"
    # Any other mismatch gets the way out, whatever words its message happens to use.
    other = describe(StoreMismatchError("shard x.npy is missing (remove nothing)"))
    assert other is not None and other.message.endswith("or pass the matching --store)")
    assert other.label == conflict.label == "store refused" and other.exit_code == conflict.exit_code == 1
