"""A tiny world in which every recipe of ``recipes/`` runs exactly as written.

The recipes name hub ids (``meta-llama/Meta-Llama-3-8B-Instruct``, ``openai/clip-vit-large-patch14-336``,
``google/siglip2-so400m-patch14-224``, the timm EVA02 name) and relative paths (``data/...``,
``checkpoints/...``, ``runs/...``). :func:`build_recipe_world` writes, under one folder, a tiny
random-weight stand-in of the same family at each model path and small data files in each recipe's
own format at each data path. A command run from that folder (as a user runs it from their
project) resolves every name the recipe uses to the stand-in: transformers, timm (``local-dir``)
and our model loader read an existing directory before they think of a hub.

Data written (images are small JPEGs, as the real sets ship them):

- ``data/cc3m/`` and ``data/cc12m/``: what LLM2CLIP's ``llm2clip/data/download_dataset.sh``
  writes, img2dataset webdataset runs of the DreamLIP files (``00000.tar`` with ``<key>.jpg`` +
  ``<key>.json`` holding the DreamLIP caption columns, one caption per cell, + ``<key>.txt``;
  ``00000.parquet``, ``00000_stats.json``); keys start at ``000000000`` in both;
- ``data/eval/coco_karpathy_test.json``, ``flickr30k_test.json`` (5 short ``captions`` per image),
  ``urban1k.json`` (one long ``caption``), ``docci_test.json`` (one long ``description``);
- ``data/llava-pretrain/blip_laion_cc_sbu_558k.json`` + ``images/00000/*.jpg`` (LCS-558K layout);
- ``data/llava-finetune/llava_v1_5_mix665k.json`` with ``coco/train2017`` and ``gqa/images``
  folders and text-only records (mix665k layout);
- stage 1's reference route: LoRA adapters of the Llama stand-in at LLM2Vec's adapter ids
  (``McGill-NLP/LLM2Vec-Meta-Llama-3-8B-Instruct-mntp``, ``-mntp-supervised``; peft's layout),
  ``cache/echo-data/<task>.jsonl`` for every E5 task (llm2vec's layout) and
  ``data/wikitext-103-raw/wiki.train.raw``.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

from PIL import Image

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60), "yellow": (230, 210, 40)}
SHAPES = ["circle", "square", "cross"]
POSITIONS = ["left", "right", "top", "bottom"]

# Model ids / local model paths the recipes name.
LLAMA3 = "meta-llama/Meta-Llama-3-8B-Instruct"
OPENAI_CLIP = "openai/clip-vit-large-patch14-336"
SIGLIP2 = "google/siglip2-so400m-patch14-224"
EVA02 = "eva02_large_patch14_clip_336.merged2b"
VICUNA = "checkpoints/vicuna-7b-v1.5"
CLIP_CHECKPOINT = "checkpoints/clip-vit-large-patch14-336"
LLM2VEC_ADAPTERS = (
    "McGill-NLP/LLM2Vec-Meta-Llama-3-8B-Instruct-mntp",
    "McGill-NLP/LLM2Vec-Meta-Llama-3-8B-Instruct-mntp-supervised",
)
E5_FOLDER = "cache/echo-data"
WIKITEXT = "data/wikitext-103-raw/wiki.train.raw"


def _scene(rng: random.Random) -> tuple[str, str, str]:
    return rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(POSITIONS)


def _jpeg(scene: tuple[str, str, str], size: int = 40) -> bytes:
    colour, shape, pos = scene
    img = Image.new("RGB", (size, size), (250, 250, 245))
    px = img.load()
    c = COLOURS[colour]
    half = size // 2
    x0 = {"left": 2, "right": half, "top": size // 4, "bottom": size // 4}[pos]
    y0 = {"left": size // 4, "right": size // 4, "top": 2, "bottom": half}[pos]
    for dy in range(half - 2):
        for dx in range(half - 2):
            inside = {
                "square": True,
                "circle": (dx - half / 2) ** 2 + (dy - half / 2) ** 2 < (half / 2 - 1) ** 2,
                "cross": abs(dx - half / 2) < 3 or abs(dy - half / 2) < 3,
            }[shape]
            if inside:
                px[x0 + dx, y0 + dy] = c
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _short(scene: tuple[str, str, str], i: int) -> str:
    colour, shape, pos = scene
    forms = [
        f"a {colour} {shape}",
        f"a {colour} {shape} on the {pos}",
        f"the {shape} is {colour}",
        f"{colour} {shape} at the {pos}",
        f"a picture of a {colour} {shape}",
    ]
    return forms[i % len(forms)]


def _long(scene: tuple[str, str, str]) -> str:
    colour, shape, pos = scene
    return f"a photograph showing one {colour} {shape} placed on the {pos} side of a pale, plain background"


def write_dreamlip(root: Path, n: int, seed: int = 0) -> None:
    """``data/cc3m`` (``n`` images) and ``data/cc12m`` (``n // 2``): two img2dataset runs of the
    DreamLIP files, as LLM2CLIP's ``download_dataset.sh`` leaves them (see ``caption_sets_world``).
    Both number their keys from ``000000000``."""
    from caption_sets_world import write_img2dataset_run

    write_img2dataset_run(root / "data" / "cc3m", n, seed=seed, per_shard=(n + 1) // 2)
    write_img2dataset_run(root / "data" / "cc12m", n // 2, seed=seed + 100, per_shard=n // 2)


def write_retrieval_sets(root: Path, n: int, seed: int = 1) -> None:
    """``data/eval``: COCO / Flickr30k (5 short captions each), Urban-1k and DOCCI (1 long)."""
    rng = random.Random(seed)
    base = root / "data" / "eval"
    for name, column in (
        ("coco_karpathy_test", "captions"),
        ("flickr30k_test", "captions"),
        ("urban1k", "caption"),
        ("docci_test", "description"),
    ):
        folder = base / name
        folder.mkdir(parents=True, exist_ok=True)
        records = []
        for i in range(n):
            scene = _scene(rng)
            (folder / f"{i:05d}.jpg").write_bytes(_jpeg(scene))
            caption = [_short(scene, j) for j in range(5)] if column == "captions" else _long(scene)
            records.append({"image": f"{name}/{i:05d}.jpg", column: caption})
        (base / f"{name}.json").write_text(json.dumps(records, indent=1))


def _conversations(scene: tuple[str, str, str], rng: random.Random) -> list[dict[str, str]]:
    colour, shape, pos = scene
    turns = [
        ("What colour is the shape?", colour),
        ("Which shape is in the image?", shape),
        (f"Is the {shape} on the {pos}? Answer yes or no.", "yes"),
    ]
    rng.shuffle(turns)
    out = [{"from": "human", "value": f"<image>\n{turns[0][0]}"}, {"from": "gpt", "value": turns[0][1]}]
    out += [{"from": "human", "value": turns[1][0]}, {"from": "gpt", "value": turns[1][1]}]
    return out


def write_llava_sets(root: Path, n: int, seed: int = 2) -> None:
    """LLaVA-Pretrain (LCS-558K layout) and mix665k (nested image folders, text-only records)."""
    rng = random.Random(seed)
    pre = root / "data" / "llava-pretrain"
    (pre / "images" / "00000").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        scene = _scene(rng)
        image = f"00000/{i:09d}.jpg"
        (pre / "images" / image).write_bytes(_jpeg(scene))
        records.append(
            {
                "id": f"{i:09d}",
                "image": image,
                "conversations": [
                    {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
                    {"from": "gpt", "value": _short(scene, i)},
                ],
            }
        )
    (pre / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(records))

    ft = root / "data" / "llava-finetune"
    records = []
    for i in range(n):
        scene = _scene(rng)
        folder = "coco/train2017" if i % 2 else "gqa/images"
        (ft / folder).mkdir(parents=True, exist_ok=True)
        image = f"{folder}/{i:012d}.jpg"
        (ft / image).write_bytes(_jpeg(scene))
        records.append({"id": str(i), "image": image, "conversations": _conversations(scene, rng)})
        if i % 4 == 3:  # ShareGPT-style text-only samples, as in mix665k
            records.append(
                {
                    "id": f"text-{i}",
                    "conversations": [
                        {"from": "human", "value": "Name a colour."},
                        {"from": "gpt", "value": rng.choice(list(COLOURS))},
                    ],
                }
            )
    (ft / "llava_v1_5_mix665k.json").write_text(json.dumps(records))


def write_models(root: Path) -> None:
    """Tiny random-weight stand-ins at every model id / path the recipes name."""
    from llm2clip_vlm.text.tiny import save_tiny_llm
    from llm2clip_vlm.tower.synthetic import TowerShape, save_random_tower

    # 64 wide: bitsandbytes' CPU 4-bit kernels work in blocks of 64 (the QLoRA recipe).
    save_tiny_llm(root / LLAMA3, hidden_size=64, seed=0)
    save_tiny_llm(root / VICUNA, hidden_size=64, seed=1)  # Llama architecture, <s>/</s> like Vicuna
    shape = TowerShape(
        image_size=32, patch_size=8, hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64
    )
    save_random_tower(root / OPENAI_CLIP, "clip", shape, seed=2)
    save_random_tower(root / CLIP_CHECKPOINT, "clip", shape, seed=2)
    save_random_tower(root / SIGLIP2, "siglip", shape, seed=3)


def write_timm_eva(root: Path) -> Path:
    """A tiny timm EVA (the EVA02 recipe's family) saved in timm's hub format (needs timm)."""
    import timm
    from timm.models import save_for_hf

    # The overrides go into config.json (model_args), so timm's local-dir loader rebuilds this size.
    args = {"img_size": 28, "embed_dim": 32, "depth": 2, "num_heads": 2}
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, num_classes=0, **args)
    path = root / EVA02
    path.mkdir(parents=True, exist_ok=True)
    save_for_hf(model, str(path), model_args=args, safe_serialization="only")
    return path


def write_llm2vec(root: Path, e5_records: int = 9) -> None:
    """LLM2Vec's two adapters of the Llama stand-in (bare decoder, as llm2vec trains them), the E5
    folder (every task of the reference, ``e5_records`` records each) and a wikitext file."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    from llm2clip_vlm.text.e5 import E5_EMBEDDING_PROMPTS

    for k, name in enumerate(LLM2VEC_ADAPTERS):
        bare = AutoModel.from_pretrained(root / LLAMA3)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
        peft = get_peft_model(bare, lora)
        torch.manual_seed(10 + k)
        with torch.no_grad():
            for pname, p in peft.named_parameters():
                if "lora_B" in pname:
                    p.normal_(0, 0.05)
        peft.save_pretrained(root / name)
    e5 = root / E5_FOLDER
    e5.mkdir(parents=True, exist_ok=True)
    rng = random.Random(5)
    for task in E5_EMBEDDING_PROMPTS:
        lines = []
        for _ in range(e5_records):
            a, b = _scene(rng), _scene(rng)
            rec = {"query": f"where is the {a[1]}", "positive": _long(a), "negative": _long(b)}
            lines.append(json.dumps(rec) + "\n")
        (e5 / f"{task}.jsonl").write_text("".join(lines))
    wiki = root / WIKITEXT
    wiki.parent.mkdir(parents=True, exist_ok=True)
    wiki.write_text("".join(f" {_long(_scene(rng))} , and the text goes on .\n" for _ in range(50)))


def build_recipe_world(root: Path, images: int = 40, heldout: int = 8) -> Path:
    """Write every model stand-in and data file the recipes name under ``root``; returns ``root``."""
    write_models(root)
    write_llm2vec(root)
    write_dreamlip(root, images)
    write_retrieval_sets(root, heldout)
    write_llava_sets(root, 16)
    return root
