"""``llm2clip-vlm bench data``: what the data path costs per record, at N synthetic records.

For each reader (JSONL, DreamLIP CSV, parquet, webdataset shards, the same shards as a list of
three sets whose keys collide as three img2dataset runs' do, LLaVA JSON) and for stage-2 start-up
(over the shards, and over the list of sets), at ``N`` tiny records generated on the fly (a few distinct 32 px JPEGs referenced by
every manifest row; shards hold one tiny JPEG per record), each measurement runs in a **fresh
process** so its peak RSS is its own:

- ``cold``: the first start (the index is built): seconds, peak RSS growth per record;
- ``warm``: a second start (the index is reused): seconds and µs per record, RSS growth per record;
- ``cache``: bytes the index and the image check wrote, per record;
- stage-2 start-up: index warm, store opened with the cheap check (what a store above 256 MiB
  gets), image check cached, up to the first streamed batch and the first map-style batch; and the
  full store check (``verify-store`` + every caption) on its own;
- loader throughput: 384 px JPEGs (~40 KB) decoded and processed at 336 px (CLIP processor), per
  worker (a worker = one process; DataLoader workers scale it on more cores);
- the content identity of the images a manifest names (what a rerun compares,
  :func:`llm2clip_vlm.identity.images_identity`): sampled (1024 images, whatever N) and full
  (every image hashed) over the N-record JSONL, and full over files of 384 px JPEGs (~40 KB,
  page cache warm), per record, with the figure extrapolated to 10M records.

RSS growth is the peak RSS during the work (``VmHWM``, reset after the imports) minus the RSS
after the imports, divided by N.
"""

from __future__ import annotations

import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llm2clip_vlm.bench.harness import (
    BenchReport,
    Timing,
    current_peak_rss,
    device_name,
    reset_peak_rss,
    resolve_device,
)
from llm2clip_vlm.data.captions import (
    CaptionSet,
    index_caption_set,
    load_caption_set,
    load_caption_sets,
    open_image,
)
from llm2clip_vlm.data.check import check_caption_images
from llm2clip_vlm.data.config import CaptionSetConfig
from llm2clip_vlm.data.conversations import load_llava_records
from llm2clip_vlm.data.errors import BadRecords
from llm2clip_vlm.data.images import load_rgb
from llm2clip_vlm.data.records import keep_captions
from llm2clip_vlm.data.stream import ShardStream
from llm2clip_vlm.identity import images_identity
from llm2clip_vlm.store.config import EmbedConfig
from llm2clip_vlm.store.store import EmbeddingStore, write_store
from llm2clip_vlm.vision.data import Stage2TrainData, train_loader


@dataclass(frozen=True)
class DataPreset:
    records: int
    throughput_images: int


PRESETS: dict[str, DataPreset] = {
    "10k": DataPreset(10_000, 256),
    "100k": DataPreset(100_000, 256),
    "1m": DataPreset(1_000_000, 256),
    "tiny": DataPreset(2_000, 32),  # for tests
}

READERS = ("jsonl", "csv", "parquet", "shards", "sets", "llava")
SETS = 3  # the "sets" reader: the N records split over this many img2dataset-like folders


# ----------------------------------------------------------------------------------------------
# Synthetic data
# ----------------------------------------------------------------------------------------------
def _jpeg(size: int, seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([(x * 255 // size), (y * 255 // size), ((x + y) * 127 // size)], -1)
    noise = rng.integers(-20, 20, (size, size, 3))  # ~38 KB at 384 px, like CC3M JPEGs
    img = np.clip(base + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def write_data(root: Path, n: int) -> dict[str, Path]:
    """N records in every format under ``root`` (DreamLIP-style columns)."""
    root.mkdir(parents=True, exist_ok=True)
    images = [f"img{i}.jpg" for i in range(8)]
    for i, name in enumerate(images):
        (root / name).write_bytes(_jpeg(32, i))
    paths = {k: root / f"m.{k}" for k in ("jsonl", "csv", "parquet")}
    paths["llava"] = root / "llava.json"

    def short(i: int) -> str:
        return json.dumps([f"a photo {i}", f"an image number {i}"])

    with open(paths["jsonl"], "w") as f:
        for i in range(n):
            f.write(
                json.dumps(
                    {
                        "image": images[i % 8],
                        "key": f"k{i}",
                        "shortSV_captions": short(i),
                        "longSV_captions": f"a long caption of image {i}",
                    }
                )
                + "\n"
            )
    import csv

    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "key", "shortSV_captions", "longSV_captions"])
        for i in range(n):
            w.writerow([images[i % 8], f"k{i}", short(i), f"a long caption of image {i}"])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table(
            {
                "image": [images[i % 8] for i in range(n)],
                "key": [f"k{i}" for i in range(n)],
                "shortSV_captions": [short(i) for i in range(n)],
                "longSV_captions": [f"a long caption of image {i}" for i in range(n)],
            }
        ),
        paths["parquet"],
    )
    conv = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A picture."}]
    with open(paths["llava"], "w") as f:
        f.write("[")
        for i in range(n):
            f.write(
                ("," if i else "") + json.dumps({"id": str(i), "image": images[i % 8], "conversations": conv})
            )
        f.write("]")
    tiny = [_jpeg(32, i) for i in range(8)]

    def write_shards(folder: Path, first: int, stop: int, keys_from: int) -> None:
        """Records ``first .. stop-1`` as shards of 10k, keys numbered from ``keys_from``."""
        folder.mkdir(parents=True, exist_ok=True)
        per = 10_000
        for s in range(first, stop, per):
            with tarfile.open(folder / f"s-{(s - first) // per:05d}.tar", "w") as tar:
                for i in range(s, min(stop, s + per)):
                    meta = json.dumps(
                        {"shortSV_captions": short(i), "longSV_captions": f"a long caption of image {i}"}
                    )
                    key = f"{i - first + keys_from:09d}"
                    for name, data in ((f"{key}.jpg", tiny[i % 8]), (f"{key}.json", meta.encode())):
                        info = tarfile.TarInfo(name)
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))

    write_shards(root / "shards", 0, n, 0)
    paths["shards"] = root / "shards"
    # The same records as three img2dataset runs: each numbers its keys from 000000000.
    cuts = [n * k // SETS for k in range(SETS + 1)]
    for k in range(SETS):
        write_shards(root / "sets" / f"set{k}", cuts[k], cuts[k + 1], 0)
    paths["sets"] = root / "sets"
    return paths


CAPTIONS = {"shortSV_captions": "short", "longSV_captions": "long"}


def _load(path: str) -> CaptionSet:
    """The bench's caption set: one file or folder, or (the ``sets`` folder) its sub-folders as a list."""
    folder = Path(path)
    if folder.name == "sets" and folder.is_dir():
        subs = sorted(p for p in folder.iterdir() if p.is_dir())
        return load_caption_sets([CaptionSetConfig(path=str(p), caption_columns=CAPTIONS) for p in subs])
    return load_caption_set(CaptionSetConfig(path=path, key_column="key", caption_columns=CAPTIONS))


# ----------------------------------------------------------------------------------------------
# Child processes (one measurement each)
# ----------------------------------------------------------------------------------------------
def _baseline() -> int:
    """Resident bytes now, with the peak counter reset: what the work adds is measured from here.

    The modules the readers import lazily are imported first, so their code is not counted.
    """
    import PIL.Image  # noqa: F401
    import pyarrow  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import torch  # noqa: F401

    reset_peak_rss()
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _rss_parts() -> dict[str, int]:
    """Resident bytes now, split: anonymous (the heap, arrays) and file-backed (mapped files)."""
    with open("/proc/self/status") as f:
        return {
            line.split(":")[0]: int(line.split()[1]) * 1024
            for line in f
            if line.startswith(("RssAnon", "RssFile"))
        }


def _maxrss() -> int:
    return current_peak_rss() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child_read(reader: str, path: str) -> dict[str, Any]:
    base = _baseline()
    t0 = time.perf_counter()
    if reader == "llava":
        recs = load_llava_records(path, verify_images=True)
        n = len(recs)
        _ = recs[n - 1]
    else:
        cs = _load(path)
        n = len(cs)
        _ = cs[n - 1]
    return {"seconds": time.perf_counter() - t0, "rss_growth": _maxrss() - base, "records": n}


class _FakeEncoder:
    """Writes a real store (dim 8, zeros) without a model: the store's cost is what is measured."""

    max_length = 32
    hidden_size = 8

    class _Tok:
        def __call__(self, texts: list[str], **_: Any) -> dict[str, Any]:
            return {"input_ids": [[0] * len(t.split()) for t in texts]}

    tokenizer = _Tok()

    def identity(self) -> str:
        return "bench-fake-encoder"

    def encode(self, texts: list[str], batch_size: int = 64, instruction: str | None = None) -> Any:
        import torch

        return torch.zeros(len(texts), 8)


def _child_store(path: str, store: str) -> dict[str, Any]:
    cs = _load(path)
    base = _baseline()
    t0 = time.perf_counter()
    write_store(
        _FakeEncoder(),
        cs,
        store,
        EmbedConfig(dtype="fp16", batch_size=4096, shard_size=200_000, precision="fp32"),
    )
    return {"seconds": time.perf_counter() - t0, "rss_growth": _maxrss() - base, "records": len(cs)}


def _child_stage2(path: str, store: str, stream: bool) -> dict[str, Any]:
    """Stage-2 start-up of the data path, up to the first batch (index, check cache warm)."""
    import torch

    def processor(images: Any, return_tensors: str) -> dict[str, Any]:
        return {"pixel_values": torch.zeros(1, 3, 8, 8)}

    base = _baseline()
    parts = _rss_parts()
    t0 = time.perf_counter()
    cs = _load(path)
    records = keep_captions(cs, 0)
    # The cheap open, as every store above 256 MiB gets (the bench's dim-8 store is smaller).
    emb = EmbeddingStore.open(
        store, captions=records, encoder_identity="bench-fake-encoder", verify_checksums=False
    )
    dataset = Stage2TrainData(records, emb, processor, open_image, 0.5, 0)
    if not stream:
        check_caption_images(records, BadRecords(), workers=4)
    # stage2.batch_size=64, no workers; data.shuffle_buffer's default when streaming
    loader = train_loader(
        dataset, batch_size=64, rank=0, world=1, start_step=0, total_steps=10, num_workers=0,
        pin_memory=False, shuffle_buffer=2000 if stream else 0,
    )  # fmt: skip
    next(iter(loader))
    seconds, after = time.perf_counter() - t0, _rss_parts()
    return {
        "seconds": seconds,
        "rss_growth": _maxrss() - base,
        # At the first batch: what the process allocated, and the pages of mapped files it touched
        # (the index, the store: shared page cache, at most the files' size, dropped under pressure).
        "anon_growth": after["RssAnon"] - parts["RssAnon"],
        "file_growth": after["RssFile"] - parts["RssFile"],
        "records": len(records),
    }


def _child_verify(path: str, store: str) -> dict[str, Any]:
    """The full store check (``verify-store`` plus every caption against the data)."""
    cs = _load(path)
    base = _baseline()
    t0 = time.perf_counter()
    EmbeddingStore.open(store, captions=cs, verify_checksums=True)
    return {"seconds": time.perf_counter() - t0, "rss_growth": _maxrss() - base, "records": len(cs)}


def _child_throughput(shard_dir: str, images: int) -> dict[str, Any]:
    """Images/s of one worker: read from a shard, decode a 384 px JPEG, CLIP-process at 336 px."""
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    index = index_caption_set(CaptionSetConfig(path=shard_dir))

    def transform(epoch: int, rid: int, data: bytes) -> tuple[Any, ...]:
        return (proc(images=load_rgb(data), return_tensors="pt")["pixel_values"][0],)

    stream = ShardStream(index, len(index), transform, rank=0, world=1, workers=1, seed=0, buffer=64)
    it = stream.unit_samples(0)
    for _ in range(8):  # warm-up
        next(it)
    t0 = time.perf_counter()
    for _ in range(images):
        next(it)
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "images_per_s": images / seconds,
        "bytes_per_image": index.column("size").mean(),
    }


def _child_identity(path: str, mode: str) -> dict[str, Any]:
    """The images' content identity of a manifest (index warm): seconds and records."""
    cs = load_caption_set(CaptionSetConfig(path=path, key_column="key", caption_columns=CAPTIONS))

    class Paths:  # the records' image paths, built on access (as the commands do)
        def __len__(self) -> int:
            return len(cs)

        def __getitem__(self, i: int) -> str:
            return str(cs[i].image)

    t0 = time.perf_counter()
    images_identity(Paths(), mode)  # type: ignore[arg-type]
    return {"seconds": time.perf_counter() - t0, "records": len(cs)}


def _write_image_files(root: Path, images: int) -> Path:
    """``images`` distinct 384 px JPEGs as files and a JSONL manifest naming them."""
    folder = root / "files384"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "m.jsonl", "w") as f:
        for i in range(images):
            (folder / f"{i:06d}.jpg").write_bytes(_jpeg(384, i))
            f.write(
                json.dumps({"image": f"{i:06d}.jpg", "key": f"k{i}", "shortSV_captions": '["a picture"]'})
                + "\n"
            )
    return folder / "m.jsonl"


def _write_throughput_shard(root: Path, images: int) -> Path:
    folder = root / "shards384"
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / "t-00000.tar", "w") as tar:
        for i in range(images):
            for name, data in ((f"{i:06d}.jpg", _jpeg(384, i)), (f"{i:06d}.txt", b"a picture")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return folder


def _spawn(task: str, args: list[Any], cache: Path) -> dict[str, Any]:
    env = dict(os.environ, LLM2CLIP_VLM_CACHE=str(cache), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "llm2clip_vlm.bench.data", task, json.dumps(args)],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(
            f"bench data {task} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr else proc.returncode}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _bytes_under(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


# ----------------------------------------------------------------------------------------------
# The suite
# ----------------------------------------------------------------------------------------------
def run(
    preset: str, *, device: str | None = None, warmup: int | None = None, repeats: int | None = None
) -> BenchReport:
    """Measure every reader and stage-2 start-up at the preset's N (see the module docstring)."""
    p = PRESETS[preset]
    n = p.records
    results: dict[str, Any] = {"records": n}
    timings: list[Timing] = []
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        paths = write_data(root / "data", n)
        results["generate_seconds"] = round(time.perf_counter() - t0, 2)
        for reader in READERS:
            cache = root / f"cache-{reader}"
            cold = _spawn("read", [reader, str(paths[reader])], cache)
            cache_bytes = _bytes_under(cache)
            warm = _spawn("read", [reader, str(paths[reader])], cache)
            results[reader] = {
                "cold_seconds": round(cold["seconds"], 3),
                "cold_rss_bytes_per_record": round(cold["rss_growth"] / n, 1),
                "warm_seconds": round(warm["seconds"], 4),
                "warm_us_per_record": round(1e6 * warm["seconds"] / n, 3),
                "warm_rss_bytes_per_record": round(warm["rss_growth"] / n, 1),
                "cache_bytes_per_record": round(cache_bytes / n, 1),
                "input_bytes_per_record": round(
                    _bytes_under(paths[reader]) / n
                    if paths[reader].is_dir()
                    else paths[reader].stat().st_size / n,
                    1,
                ),
            }
            timings.append(Timing(f"{reader} warm start", [warm["seconds"]], items_per_call=n))
        # Stage-2 start-up over the shards (index and image check warm, a store written once).
        cache = root / "cache-shards"
        store = root / "store"
        wrote = _spawn("store", [str(paths["shards"]), str(store)], cache)
        results["store"] = {
            "write_seconds": round(wrote["seconds"], 2),
            "bytes_per_record": round(_bytes_under(store) / n, 1),
        }
        full = _spawn("verify", [str(paths["shards"]), str(store)], cache)
        results["store"]["full_check_us_per_record"] = round(1e6 * full["seconds"] / n, 2)
        results["store"]["full_check_rss_bytes_per_record"] = round(full["rss_growth"] / n, 1)
        # The same records as a list of 3 sets (keys namespaced): their own store and index cache.
        cache_sets, store_sets = root / "cache-sets", root / "store-sets"
        _spawn("store", [str(paths["sets"]), str(store_sets)], cache_sets)
        for data_path, data_store, data_cache, stream in (
            (paths["shards"], store, cache, True),
            (paths["shards"], store, cache, False),
            (paths["sets"], store_sets, cache_sets, True),
            (paths["sets"], store_sets, cache_sets, False),
        ):
            suffix = "_sets" if data_path == paths["sets"] else ""
            name = ("stage2_stream" if stream else "stage2_map") + suffix
            _spawn("stage2", [str(data_path), str(data_store), stream], data_cache)  # warms the check cache
            s = _spawn("stage2", [str(data_path), str(data_store), stream], data_cache)
            results[name] = {
                "seconds_to_first_batch": round(s["seconds"], 3),
                "us_per_record": round(1e6 * s["seconds"] / n, 3),
                "rss_bytes_per_record": round(s["rss_growth"] / n, 1),
                "anon_bytes_per_record": round(s["anon_growth"] / n, 1),
                "mapped_file_bytes_per_record": round(s["file_growth"] / n, 1),
            }
            timings.append(Timing(f"{name} start", [s["seconds"]], items_per_call=n))
        results["cache_bytes_per_record_stage2"] = round(_bytes_under(cache) / n, 1)
        shard384 = _write_throughput_shard(root, p.throughput_images)
        tp = _spawn("throughput", [str(shard384), p.throughput_images], root / "cache-tp")
        results["loader"] = {
            "images_per_s_per_worker": round(tp["images_per_s"], 1),
            "jpeg_bytes": int(tp["bytes_per_image"]),
            "workers_for_2000_per_s": int(np.ceil(2000 / tp["images_per_s"])),
        }
        # Content identity: warm the JSONL index first (the identity reads it as a run does).
        cache = root / "cache-jsonl"
        identity: dict[str, Any] = {}
        for mode in ("sampled", "full"):
            r = _spawn("identity", [str(paths["jsonl"]), mode], cache)
            identity[f"{mode}_seconds"] = round(r["seconds"], 3)
            identity[f"{mode}_us_per_record"] = round(1e6 * r["seconds"] / n, 3)
        manifest = _write_image_files(root, p.throughput_images)
        r = _spawn("identity", [str(manifest), "full"], root / "cache-files")
        identity["full_40kb_us_per_record"] = round(1e6 * r["seconds"] / r["records"], 1)
        identity["full_40kb_seconds_at_10m"] = round(10 * r["seconds"] / r["records"] * 1e6, 0)
        identity["sampled_seconds_at_10m"] = round(identity["sampled_seconds"], 3)  # independent of N
        results["content_identity"] = identity
    return BenchReport(
        suite="data",
        preset=preset,
        device=device_name(resolve_device("cpu")),
        settings={"records": n, "readers": list(READERS), "throughput_images": p.throughput_images},
        timings=timings,
        results=results,
        memory_note="RSS growth per record = (peak RSS during the work - RSS after the imports) / N, in a fresh process",
    )


def _main() -> None:
    task, args = sys.argv[1], json.loads(sys.argv[2])
    fn = {
        "read": _child_read,
        "store": _child_store,
        "verify": _child_verify,
        "stage2": _child_stage2,
        "throughput": _child_throughput,
        "identity": _child_identity,
    }[task]
    import logging

    logging.disable(logging.WARNING)
    print(json.dumps(fn(*args)))


if __name__ == "__main__":
    _main()
