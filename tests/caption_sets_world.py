"""Replicas of the data layouts users hold, written from the tools' own source (cited per writer).

- :func:`write_img2dataset_run`: one img2dataset ``--output_format webdataset`` run as LLM2CLIP's
  ``llm2clip/data/download_dataset.sh`` (microsoft/LLM2CLIP) starts it on a DreamLIP file. From
  rom1504/img2dataset ``img2dataset/writer.py`` (``WebDatasetSampleWriter``: shard
  ``{shard_id:0{oom_shard_count}d}.tar`` with ``KEY.jpg``, ``KEY.txt`` = the caption column,
  ``KEY.json`` = the meta row, plus ``{shard}.parquet`` of the meta rows) and
  ``img2dataset/downloader.py`` (``compute_key``: ``10**oom_sample_per_shard * shard_id + i``
  zero-padded, so every run's keys start at ``000000000``; meta adds ``key``, ``status``,
  ``error_message``, ``width``, ``height``, ``original_width``, ``original_height``); the
  ``url_col`` / ``caption_col`` become ``url`` / ``caption``; ``--save_additional_columns`` adds
  the six DreamLIP caption columns, one caption per cell (``extract_embedding.py`` encodes
  ``captions[key]`` as one text).
- :func:`write_dreamlip_csv`: the DreamLIP file itself (header of ``download_dataset.sh``:
  ``Image Path``, ``raw_caption``, ``short|long`` x ``IB|SV|LLA`` ``_captions``).
- :func:`write_caption_pairs`: the ``short_caption,long_caption`` CSV that
  ``llm_caption_contrastive/dataset/E5_cc3m.py`` reads (``cc3m[['short_caption', 'long_caption']]``).
- :func:`write_llava_pretrain`: LLaVA-Pretrain as haotian-liu/LLaVA ``docs/Data.md`` and
  ``scripts/v1_5/pretrain.sh`` use it: ``blip_laion_cc_sbu_558k.json`` beside an ``images/``
  folder given as ``--image_folder``; records ``{"id", "image": "00453/004539375.jpg",
  "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": caption}]}``.
- :func:`write_sharegpt4v`: ShareGPT4V's ``sharegpt4v_instruct_gpt4-vision_cap100k.json`` /
  ``share-captioner_coco_lcs_sam_1246k_1107.json`` (ShareGPT4Omni/ShareGPT4V ``docs/Data.md``):
  the same record shape, one human prompt and one long gpt description; the JSON lies in
  ``data/sharegpt4v/`` and its image paths (``coco/train2017/...``, ``sam/images/...``,
  ``llava/llava_pretrain/images/...``) are relative to ``data/``.
"""

from __future__ import annotations

import csv
import io
import json
import random
import tarfile
from pathlib import Path

from recipe_world import _jpeg, _long, _scene, _short

DREAMLIP_COLUMNS = [
    "shortIB_captions",
    "longIB_captions",
    "shortSV_captions",
    "longSV_captions",
    "shortLLA_captions",
    "longLLA_captions",
]


def dreamlip_row(scene: tuple[str, str, str], url: str) -> dict[str, str]:
    row = {"Image Path": url, "raw_caption": f"{scene[0]} {scene[1]} stock photo"}
    for j, column in enumerate(DREAMLIP_COLUMNS):
        row[column] = _short(scene, j) if column.startswith("short") else _long(scene) + f" ({column[4:-9]})"
    return row


def write_dreamlip_csv(path: Path, n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = [dreamlip_row(_scene(rng), f"http://example.com/img/{i}.jpg") for i in range(n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return rows


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_img2dataset_run(
    folder: Path, n: int, seed: int = 0, per_shard: int = 10, failed_every: int = 0
) -> list[tuple[str, tuple[str, str, str]]]:
    """One img2dataset webdataset run of a DreamLIP file into ``folder``; ``[(key, scene)]`` written.

    ``failed_every`` k: every k-th URL failed to download (no tar members, a meta row with
    ``status: failed_to_download``), as in every real run.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    oom_sample = len(str(per_shard - 1)) if per_shard > 1 else 1
    oom_sample = max(oom_sample, 4)  # ceil(log10(10000)) with img2dataset's default 10000 per shard
    shards = (n + per_shard - 1) // per_shard
    for s in range(shards):
        metas = []
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                if s * per_shard + i >= n:
                    break
                scene = _scene(rng)
                key = f"{10**oom_sample * s + i:0{oom_sample + 5}d}"
                dl = dreamlip_row(scene, f"http://example.com/{seed}/{s}/{i}.jpg")
                meta = {"url": dl.pop("Image Path"), "caption": dl.pop("raw_caption"), **dl, "key": key}
                failed = failed_every and (s * per_shard + i) % failed_every == failed_every - 1
                meta.update(
                    status="failed_to_download" if failed else "success",
                    error_message="HTTP Error 404" if failed else None,
                    width=None if failed else 40, height=None if failed else 40,
                    original_width=None if failed else 40, original_height=None if failed else 40,
                )  # fmt: skip
                metas.append(meta)
                if failed:
                    continue
                _add(tar, f"{key}.jpg", _jpeg(scene))
                _add(tar, f"{key}.txt", meta["caption"].encode())
                _add(tar, f"{key}.json", json.dumps(meta, indent=4).encode())
                written.append((key, scene))
        pq.write_table(pa.Table.from_pylist(metas), folder / f"{s:05d}.parquet")
        stats = {"count": len(metas), "successes": sum(m["status"] == "success" for m in metas)}
        (folder / f"{s:05d}_stats.json").write_text(json.dumps(stats, indent=4))
    return written


def write_caption_pairs(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["short_caption", "long_caption"])
        for _ in range(n):
            scene = _scene(rng)
            w.writerow([_short(scene, 0), _long(scene)])


def _conversation(scene: tuple[str, str, str], answer: str, prompt: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": answer}]


def write_llava_pretrain(root: Path, n: int, seed: int = 0) -> Path:
    """``root/LLaVA-Pretrain``: the 558k JSON beside ``images/``; returns the JSON's path."""
    rng = random.Random(seed)
    base = root / "LLaVA-Pretrain"
    records = []
    for i in range(n):
        scene = _scene(rng)
        rel = f"{i // 4:05d}/{i:09d}.jpg"
        (base / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / "images" / rel).write_bytes(_jpeg(scene))
        records.append(
            {
                "id": f"{i:09d}",
                "image": rel,
                "conversations": _conversation(scene, _short(scene, 0), "Describe the image briefly."),
            }
        )
    path = base / "blip_laion_cc_sbu_558k.json"
    path.write_text(json.dumps(records, indent=2))
    return path


def write_sharegpt4v(root: Path, n: int, seed: int = 0, text_only: int = 0) -> Path:
    """``root/data``: ShareGPT4V's caption JSON and its image folders; returns the JSON's path."""
    rng = random.Random(seed)
    base = root / "data"
    folders = ["coco/train2017", "sam/images", "llava/llava_pretrain/images/00000"]
    records = []
    for i in range(n):
        scene = _scene(rng)
        rel = f"{folders[i % 3]}/{i:012d}.jpg"
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_bytes(_jpeg(scene))
        answer = _long(scene) + ". The image is simple, with no other objects."
        records.append(
            {
                "id": f"{i:012d}",
                "image": rel,
                "conversations": _conversation(scene, answer, "What is in this image?"),
            }
        )
    for j in range(text_only):  # mix665k-style text-only turns (no "image")
        records.append(
            {
                "id": f"text-{j}",
                "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}],
            }
        )
    path = base / "sharegpt4v" / "sharegpt4v_instruct_gpt4-vision_cap100k.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=2))
    return path
