"""What a run's report shows beside its numbers: retrieval examples and generated answers.

Written at the end of a run into ``RUN/gallery/`` (small JPEG thumbnails + one JSON file each), so
the report needs neither the model nor the data set, which may be gone or elsewhere by then.

- ``retrieval.json`` (stage 2), per held-out set: held-out captions with their top-``k`` images
  (``answer`` = the caption's own image) and images with their top-``k`` captions (``correct``);
- ``answers.json`` (LLaVA): held-out questions, the expected answer, the model's answer, its image.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

GALLERY_DIR = "gallery"
RETRIEVAL_FILE = "retrieval.json"
ANSWERS_FILE = "answers.json"
THUMBNAIL = 160  # pixels, longest side


def _spread(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (deterministic, not just the first ones)."""
    k = min(k, n)
    return [round(i * (n - 1) / max(1, k - 1)) for i in range(k)] if k > 1 else list(range(k))


def _thumbnail(image: Any, path: Path) -> None:
    image = image.convert("RGB")
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=85)


def write_retrieval_gallery(
    run_dir: str | Path,
    heldout: Mapping[str, Any],
    similarities: Mapping[str, Any],
    load_image: Callable[[Any], Any],
    queries: int = 6,
    k: int = 5,
) -> Path:
    """Write ``RUN/gallery/retrieval.json`` and the thumbnails it names.

    Args:
        run_dir: the stage-2 run directory.
        heldout: set name -> an object with ``records`` (ImageCaptions, each with ``captions``) and
            ``caption_image`` (each caption's image index; captions in record order).
        similarities: set name -> ``[images, captions]`` similarity matrix (torch tensor).
        load_image: record -> PIL image.
        queries: captions (text -> image) and images (image -> text) shown per set.
        k: retrieved items shown per query.
    """
    import torch

    root = Path(run_dir) / GALLERY_DIR
    out: dict[str, Any] = {}
    for name, sim in similarities.items():
        hs = heldout[name]
        texts = [c.text for r in hs.records for c in r.captions]
        caption_image = hs.caption_image.tolist()
        sim = sim.float()
        kk = min(k, sim.shape[0])
        t2i = []
        for c in _spread(len(texts), queries):
            scores, top = torch.topk(sim[:, c], kk)
            t2i.append({
                "caption": texts[c], "answer": caption_image[c],
                "top": [[int(i), round(float(v), 4)] for v, i in zip(scores, top, strict=True)],
            })  # fmt: skip
        i2t = []
        for i in _spread(sim.shape[0], queries):
            scores, top = torch.topk(sim[i], min(k, sim.shape[1]))
            i2t.append({
                "image": i,
                "top": [{"caption": texts[int(c)], "correct": caption_image[int(c)] == i, "score": round(float(v), 4)}
                        for v, c in zip(scores, top, strict=True)],
            })  # fmt: skip
        shown = sorted(
            {i for q in t2i for i, _ in q["top"]} | {q["answer"] for q in t2i} | {q["image"] for q in i2t}
        )
        images = {}
        for i in shown:
            rel = f"{name}-{i}.jpg"
            _thumbnail(load_image(hs.records[i]), root / rel)
            images[str(i)] = rel
        out[name] = {"text_to_image": t2i, "image_to_text": i2t, "images": images}
    root.mkdir(parents=True, exist_ok=True)
    path = root / RETRIEVAL_FILE
    path.write_text(json.dumps(out, indent=1) + "\n")
    return path


def write_answer_gallery(
    run_dir: str | Path,
    examples: Sequence[Mapping[str, Any]],
    load_image: Callable[[Path], Any],
) -> Path:
    """Write ``RUN/gallery/answers.json``: each example's question, answers and thumbnail.

    ``examples``: dicts with ``question``, ``answer``, ``prediction``, ``question_type``,
    ``correct`` and ``image`` (a path or None for a text-only question).
    """
    root = Path(run_dir) / GALLERY_DIR
    rows = []
    for n, ex in enumerate(examples):
        row = {k: ex.get(k) for k in ("question", "answer", "prediction", "question_type", "correct")}
        if "blind_prediction" in ex:  # the same question asked blind (llava.evaluate)
            row["blind_prediction"] = ex["blind_prediction"]
        row["image"] = None
        if ex.get("image"):
            rel = f"answer-{n}.jpg"
            _thumbnail(load_image(Path(ex["image"])), root / rel)
            row["image"] = rel
        rows.append(row)
    root.mkdir(parents=True, exist_ok=True)
    path = root / ANSWERS_FILE
    path.write_text(json.dumps(rows, indent=1) + "\n")
    return path
