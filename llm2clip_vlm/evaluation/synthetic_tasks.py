"""Small local copies of MME, ScienceQA-IMG and VizWiz-VQA (val) drawn from the synthetic world.

Same columns (and column types) as the hub data sets lmms-eval reads, images stored as parquet
image structs (``{"bytes", "path"}``, the ``datasets`` Image feature), so the local tasks of
``local_tasks.py`` and lmms-eval's built-in prompt and metric functions run on them unchanged:

- ``mme.parquet`` (split test): ``question_id, image, question, answer, category``. Two yes/no
  questions per image (one "Yes", one "No"), MME's pairing that its "acc+" needs; perception
  categories ``existence, count, position, color``, cognition ``numerical_calculation``.
- ``scienceqa_img.parquet`` (split test): ``image, question, choices, answer (int8), hint, task,
  grade, subject, topic, category, skill, lecture, solution``; lettered multiple choice.
- ``vizwiz_vqa_val.parquet`` (split val): ``question_id, image, question, answers (10 strings),
  category`` (``other | number | yes/no | unanswerable``; the category carries VizWiz's
  answerable flag); annotators disagree on purpose, so VQA accuracy takes values between 0 and 1.

Deterministic per seed. The questions are answerable from the drawn scene, so a trained model can
score above chance; a random one scores like chance.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from llm2clip_vlm.data.synthetic import (
    BACKGROUNDS,
    COLOURS,
    NUMBER_WORDS,
    POSITIONS,
    SHAPES,
    Scene,
    draw_scene,
    random_scene,
)

MME_PERCEPTION = ("existence", "count", "position", "color")
MME_COGNITION = ("numerical_calculation",)
MME_CATEGORIES = MME_PERCEPTION + MME_COGNITION
MME_SUFFIX = " Please answer yes or no."
# VizWiz annotator agreement cycle: how many of the 10 answers are the right one.
VIZWIZ_AGREEMENT = (10, 7, 3, 2)


def _name(o: Any) -> str:
    return f"{o.colour} {o.shape}"


def _mme_pair(scene: Scene, category: str, rng: random.Random) -> list[tuple[str, str]]:
    """(question, answer) for one image: a true statement ("Yes") and a false one ("No")."""
    objs = list(scene.objects)
    o = rng.choice(objs)
    n = len(objs)
    if category == "existence":
        present = {(x.colour, x.shape) for x in objs}
        absent = rng.choice([(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present])
        return [
            (f"Is there a {_name(o)} in this image?", "Yes"),
            (f"Is there a {absent[0]} {absent[1]} in this image?", "No"),
        ]
    if category == "count":
        wrong = rng.choice([k for k in range(1, 6) if k != n])
        return [
            (f"Are there {NUMBER_WORDS.get(n, str(n))} shapes in this image?", "Yes"),
            (f"Are there {NUMBER_WORDS.get(wrong, str(wrong))} shapes in this image?", "No"),
        ]
    if category == "position":
        wrong = rng.choice([p for i, p in enumerate(POSITIONS) if i != o.cell])
        return [
            (f"Is the {_name(o)} at the {POSITIONS[o.cell]} of the image?", "Yes"),
            (f"Is the {_name(o)} at the {wrong} of the image?", "No"),
        ]
    if category == "color":
        wrong = rng.choice([c for c in COLOURS if c != o.colour])
        where = POSITIONS[o.cell]
        return [
            (f"Is the {o.shape} at the {where} {o.colour}?", "Yes"),
            (f"Is the {o.shape} at the {where} {wrong}?", "No"),
        ]
    if category == "numerical_calculation":
        k = rng.randint(1, 4)
        wrong = n + k + rng.choice([-1, 1, 2])
        return [
            (f"Is the number of shapes in the image plus {k} equal to {n + k}?", "Yes"),
            (f"Is the number of shapes in the image plus {k} equal to {wrong}?", "No"),
        ]
    raise ValueError(f"unknown MME category {category!r}")


def mme_rows(rng: random.Random, images_per_category: int, image_size: int) -> list[dict[str, Any]]:
    """MME-style rows; categories alternate image by image, the two questions of an image adjacent.

    Alternating keeps every category in a ``--limit``-ed run (lmms-eval takes the first N docs);
    an even limit keeps MME's pairs whole.
    """
    rows = []
    for i in range(images_per_category * len(MME_CATEGORIES)):
        category = MME_CATEGORIES[i % len(MME_CATEGORIES)]
        scene = random_scene(rng)
        image = draw_scene(scene, image_size)
        qid = f"{category}/{i // len(MME_CATEGORIES):04d}.png"
        pair = _mme_pair(scene, category, rng)
        if rng.random() < 0.5:  # MME lists either answer first
            pair.reverse()
        for question, answer in pair:
            rows.append(
                {
                    "question_id": qid,
                    "image": image,
                    "question": question + MME_SUFFIX,
                    "answer": answer,
                    "category": category,
                }  # fmt: skip
            )
    return rows


def _sqa_question(scene: Scene, rng: random.Random) -> tuple[str, list[str], int, str, str]:
    """(question, choices, answer index, topic, hint) about one scene."""
    kind = rng.choice(("shape", "colour", "count", "background"))
    o = rng.choice(scene.objects)
    if kind == "shape":
        right, pool, q = o.shape, SHAPES, f"Which shape is at the {POSITIONS[o.cell]} of the picture?"
        topic, hint = "geometry", "The picture shows coloured shapes on a three by three grid."
    elif kind == "colour":
        right, pool, q = o.colour, tuple(COLOURS), f"What colour is the {o.shape} at the {POSITIONS[o.cell]}?"
        topic, hint = "colours", ""
    elif kind == "count":
        right = str(len(scene.objects))
        pool, q = ("1", "2", "3", "4", "5"), "How many shapes are in the picture?"
        topic, hint = "counting", "Count every shape, whatever its size."
    else:
        right, pool, q = scene.background, tuple(BACKGROUNDS), "What colour is the background of the picture?"
        topic, hint = "colours", ""
    n_choices = rng.randint(2, 4)
    choices = [right, *rng.sample([p for p in pool if p != right], n_choices - 1)]
    rng.shuffle(choices)
    return q, choices, choices.index(right), topic, hint


def sqa_rows(rng: random.Random, n: int, image_size: int) -> list[dict[str, Any]]:
    """ScienceQA-IMG-style rows (lettered multiple choice with an image)."""
    rows = []
    for _ in range(n):
        scene = random_scene(rng)
        q, choices, answer, topic, hint = _sqa_question(scene, rng)
        rows.append(
            {
                "image": draw_scene(scene, image_size),
                "question": q,
                "choices": choices,
                "answer": answer,
                "hint": hint,
                "task": "closed choice",
                "grade": "grade2",
                "subject": "natural science",
                "topic": topic,
                "category": "Visual elements",
                "skill": "Identify shapes and colours",
                "lecture": "Shapes are drawn on a three by three grid; each cell holds at most one shape.",
                "solution": f"Look at the picture. The answer is {choices[answer]}.",
            }
        )
    return rows


def _vizwiz_question(scene: Scene, rng: random.Random, i: int) -> tuple[str, str, str, str]:
    """(question, right answer, a plausible wrong answer, category)."""
    o = rng.choice(scene.objects)
    kind = ("other", "number", "yes/no", "unanswerable")[i % 4]
    if kind == "other":
        wrong = rng.choice([c for c in COLOURS if c != o.colour])
        return f"what color is the {o.shape} at the {POSITIONS[o.cell]}?", o.colour, wrong, kind
    if kind == "number":
        n = len(scene.objects)
        return "how many shapes are there?", str(n), str(n % 4 + 1), kind
    if kind == "yes/no":
        c, s = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        present = any(x.colour == c and x.shape == s for x in scene.objects)
        return f"is there a {c} {s}?", "yes" if present else "no", "no" if present else "yes", kind
    return "what does the label on this bottle say?", "unanswerable", "unsuitable image", kind


def vizwiz_rows(rng: random.Random, n: int, image_size: int) -> list[dict[str, Any]]:
    """VizWiz-VQA-style rows: 10 answers per question with planned annotator agreement."""
    rows = []
    for i in range(n):
        scene = random_scene(rng)
        question, right, wrong, category = _vizwiz_question(scene, rng, i)
        agree = VIZWIZ_AGREEMENT[(i // 4) % len(VIZWIZ_AGREEMENT)]
        # The right answer `agree` times; the others split between a wrong answer and "unanswerable".
        others = [wrong if k % 2 == 0 else "unanswerable" for k in range(10 - agree)]
        if category == "unanswerable":
            others = ["unsuitable image"] * (10 - agree)
        answers = [right] * agree + others
        rng.shuffle(answers)
        rows.append(
            {
                "question_id": f"VizWiz_val_{i:08d}",
                "image": draw_scene(scene, image_size),
                "question": question,
                "answers": answers,
                "category": category,
            }  # fmt: skip
        )
    return rows


def _features(task: str) -> Any:
    from datasets import Features, Image, Sequence, Value

    s = Value("string")
    if task == "mme":
        return Features({"question_id": s, "image": Image(), "question": s, "answer": s, "category": s})
    if task == "scienceqa_img":
        cols = ("hint", "task", "grade", "subject", "topic", "category", "skill", "lecture", "solution")
        return Features(
            {
                "image": Image(),
                "question": s,
                "choices": Sequence(s),
                "answer": Value("int8"),
                **dict.fromkeys(cols, s),
            }
        )
    return Features(
        {"question_id": s, "image": Image(), "question": s, "answers": Sequence(s), "category": s}
    )


def write_eval_data(
    out: str | Path,
    seed: int = 0,
    mme_images_per_category: int = 4,
    scienceqa: int = 24,
    vizwiz: int = 24,
    image_size: int = 64,
) -> dict[str, int]:
    """Write ``mme.parquet``, ``scienceqa_img.parquet`` and ``vizwiz_vqa_val.parquet`` into ``out``.

    Args:
        out: output folder (a ``--data-dir`` for ``llm2clip-vlm eval``).
        seed: random seed (same seed, same files).
        mme_images_per_category: images per MME category (two questions each).
        scienceqa: ScienceQA-IMG questions.
        vizwiz: VizWiz questions.
        image_size: side of the square images in pixels.

    Returns:
        ``{task: rows}``.
    """
    from datasets import Dataset

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    tables = {
        "mme": mme_rows(rng, mme_images_per_category, image_size),
        "scienceqa_img": sqa_rows(rng, scienceqa, image_size),
        "vizwiz_vqa_val": vizwiz_rows(rng, vizwiz, image_size),
    }
    for task, rows in tables.items():
        columns = {k: [r[k] for r in rows] for k in rows[0]}
        Dataset.from_dict(columns, features=_features(task)).to_parquet(str(out / f"{task}.parquet"))
    return {task: len(rows) for task, rows in tables.items()}


__all__ = ["MME_COGNITION", "MME_PERCEPTION", "mme_rows", "sqa_rows", "vizwiz_rows", "write_eval_data"]
