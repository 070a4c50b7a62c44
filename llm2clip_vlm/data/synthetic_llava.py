"""The synthetic world in LLaVA's data format: caption records for projector pretraining,
instruction records for finetuning, and held-out questions with known answers.

Scenes come from :mod:`llm2clip_vlm.data.synthetic` (coloured shapes on a 3x3 grid). Files::

    llava_pretrain.json   LCS-558K-style: "<image>\\n{instruction}" -> a short caption
    llava_instruct.json   mix665k-style: 1-3 question/answer turns per image (open questions on
                          colour, shape, position and count; yes/no; lettered multiple choice,
                          each of the two about one of :data:`ASKS`), plus text-only records
                          (no "image" key)
    llava_heldout.json    one question per held-out image, with "question_type", "answer" and,
                          for yes/no and choice, "asks": the types take turns and each type's
                          answers take turns, so every prefix of the file
                          (``heldout_max_samples``) is balanced and a constant answer scores
                          about uniform chance
    images/{pretrain,instruct,heldout}/*.png

Prompts follow LLaVA-1.5's short-answer instructions ("Answer the question using a single word
or phrase.", "Answer with the option's letter from the given choices directly."), the ones the
MME / ScienceQA / VizWiz evaluations use. Yes/no questions are balanced. Deterministic per seed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from llm2clip_vlm.data.synthetic import (
    COLOURS,
    NUMBER_WORDS,
    POSITIONS,
    SHAPES,
    Scene,
    draw_scene,
    indefinite_article,
    png_bytes,
    random_scene,
    short_captions,
)

SHORT_ANSWER = "Answer the question using a single word or phrase."
YES_NO = "Answer with yes or no."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."
QUESTION_TYPES = ("colour", "shape", "position", "count", "yesno", "choice")
# Every answer a question type can have (the held-out split cycles through them).
ANSWERS: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "position": POSITIONS,
    "count": tuple(NUMBER_WORDS.values()),
    "yesno": ("yes", "no"),
    "choice": ("A", "B", "C", "D"),
}
# What a yes/no or a multiple-choice question asks about. Yes/no: the categories of MME's
# perception questions that this world has (lmms-eval lmms_eval/tasks/mme/utils.py,
# eval_type_dict["Perception"]: existence, count, position, color). Choice: the four open types,
# as lettered options (ScienceQA-IMG's format). Version 3 asked yes/no only "is there a <colour>
# <shape>?" with near misses and choice only the shape at a named cell, the two hardest contents
# of this world: a finetuned demo LLaVA answered all 66 held-out yes/no questions "no" and all 66
# choice questions "B", sighted or blind, while it read colours and counts well above blind
# (issue 29, docs/BENCHMARKS.md "Yes/no and choice as formats").
ASKS: dict[str, tuple[str, ...]] = {
    "yesno": ("existence", "count", "position", "colour"),
    "choice": ("colour", "shape", "position", "count"),
}
# Question turns per instruction image (inclusive range). More turns would amortise the system
# prompt and image tokens over more answers, but (2, 4) is ~1.3x the tokens of a step and was not
# measured to help (issue 29).
INSTRUCT_TURNS = (1, 3)
# How often each type is drawn for an instruction image's turns (relative; drawn without
# replacement). Shape and position (a named cell, a colour bound to a shape) and the two answer
# formats twice as often as colour and count, which a finetune learns first (issue 29,
# docs/BENCHMARKS.md "A LLaVA whose LLM also learns from the captions"). Version 4 measured other
# weights (yes/no and choice 3, the rest 1): no better ("Yes/no and choice as formats").
QUESTION_WEIGHTS: dict[str, float] = {
    "colour": 1.0, "shape": 2.0, "position": 2.0, "count": 1.0, "yesno": 2.0, "choice": 2.0,
}  # fmt: skip
PRETRAIN_INSTRUCTIONS = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Give a short and clear explanation of the subsequent image.",
    "Summarize the visual content of the image.",
    "Write a terse but informative summary of the picture.",
)
TEXT_ONLY = (
    ("How many cells does a grid of three rows and three columns have?", "nine"),
    ("How many corners does a square have?", "four"),
    ("How many corners does a triangle have?", "three"),
    ("Which shape has no corners: a circle or a square?", "circle"),
    ("What do you call a shape with five points drawn as a twinkle?", "star"),
    ("Which cell is in the middle of a three by three grid?", "centre"),
    ("Is yellow a colour?", "yes"),
    ("Is a triangle a colour?", "no"),
)
SPEC_VERSION = 4


def _unique(scene: Scene, key: str) -> list[int]:
    """Indices of objects whose ``key`` attribute (or colour+shape pair) no other object shares."""

    def value(o: object) -> object:
        return (o.colour, o.shape) if key == "colour_shape" else getattr(o, key)

    values = [value(o) for o in scene.objects]
    return [i for i, v in enumerate(values) if values.count(v) == 1]


def make_question(
    scene: Scene, qtype: str, rng: random.Random, asks: str | None = None
) -> tuple[str, str] | None:
    """One ``(question, answer)`` of type ``qtype`` about ``scene``, or None if it cannot be asked
    unambiguously (e.g. a colour question needs an object whose shape is unique).

    Yes/no and multiple-choice questions are formats, not contents: each asks about one of
    :data:`ASKS` (drawn when ``asks`` is None), as MME's perception yes/no questions span
    existence, count, position and colour and ScienceQA's lettered options span any content."""
    objs = scene.objects
    if qtype in ("yesno", "choice"):
        asks = asks or rng.choice(ASKS[qtype])
        if asks not in ASKS[qtype]:
            raise ValueError(f"a {qtype} question asks about one of {', '.join(ASKS[qtype])}, not {asks!r}")
        return _yes_no(scene, asks, rng) if qtype == "yesno" else _choice(scene, asks, rng)
    if qtype == "count":
        return f"How many shapes are there in the image?\n{SHORT_ANSWER}", NUMBER_WORDS[len(objs)]
    if qtype == "colour":
        cands = _unique(scene, "shape")
        if not cands:
            return None
        o = objs[rng.choice(cands)]
        return f"What colour is the {o.shape}?\n{SHORT_ANSWER}", o.colour
    if qtype == "shape":
        o = rng.choice(objs)
        return f"What shape is at the {POSITIONS[o.cell]}?\n{SHORT_ANSWER}", o.shape
    if qtype == "position":
        cands = _unique(scene, "colour_shape")
        if not cands:
            return None
        o = objs[rng.choice(cands)]
        return f"Where is the {o.colour} {o.shape}?\n{SHORT_ANSWER}", POSITIONS[o.cell]
    raise ValueError(f"unknown question type {qtype!r}; known: {', '.join(QUESTION_TYPES)}")


def _yes_no(scene: Scene, asks: str, rng: random.Random) -> tuple[str, str] | None:
    """A yes/no question about ``asks`` (MME's perception categories), answered yes or no by a
    fair coin; the "no" questions name what the scene lacks: a shape it does not hold, another
    count, another cell, another colour."""
    objs = scene.objects
    yes = rng.random() < 0.5
    if asks == "existence":
        present = sorted({o.shape for o in objs})
        shape = rng.choice(present if yes else [s for s in SHAPES if s not in present])
        question = f"Is there {indefinite_article(shape)} {shape} in the image?"
    elif asks == "count":
        n = len(objs) if yes else rng.choice([k for k in NUMBER_WORDS if k != len(objs)])
        question = (
            "Is there only one shape in the image?"
            if n == 1
            else f"Are there {NUMBER_WORDS[n]} shapes in the image?"
        )
    elif asks == "position":
        cands = _unique(scene, "colour_shape")
        if not cands:
            return None
        o = objs[rng.choice(cands)]
        cell = o.cell if yes else rng.choice([c for c in range(len(POSITIONS)) if c != o.cell])
        question = f"Is the {o.colour} {o.shape} at the {POSITIONS[cell]}?"
    else:  # colour
        cands = _unique(scene, "shape")
        if not cands:
            return None
        o = objs[rng.choice(cands)]
        colour = o.colour if yes else rng.choice([c for c in COLOURS if c != o.colour])
        question = f"Is the {o.shape} {colour}?"
    return f"{question}\n{YES_NO}", "yes" if yes else "no"


def _choice(scene: Scene, asks: str, rng: random.Random) -> tuple[str, str] | None:
    """A question about ``asks`` with four lettered options in random order (the right one and
    three others of the same kind), answered by the right option's letter."""
    qa = make_question(scene, asks, rng)
    if qa is None:
        return None
    question, right = qa[0].split("\n")[0], qa[1]
    pool = list(ANSWERS[asks])
    options = [right, *rng.sample([a for a in pool if a != right], 3)]
    rng.shuffle(options)
    letters = "ABCD"
    lines = "\n".join(f"{letters[i]}. {opt}" for i, opt in enumerate(options))
    return f"{question}\n{lines}\n{LETTER_ANSWER}", letters[options.index(right)]


def _questions(scene: Scene, rng: random.Random, n: int) -> list[tuple[str, str, str]]:
    """Up to ``n`` questions of distinct types, drawn by :data:`QUESTION_WEIGHTS`."""
    out: list[tuple[str, str, str]] = []
    types = list(QUESTION_TYPES)
    while types and len(out) < n:
        qtype = rng.choices(types, weights=[QUESTION_WEIGHTS[t] for t in types])[0]
        types.remove(qtype)
        qa = make_question(scene, qtype, rng)
        if qa is not None:
            out.append((qtype, *qa))
    return out


def balanced_question(
    qtype: str, answer: str, rng: random.Random, asks: str | None = None
) -> tuple[Scene, str, str]:
    """A random scene and a ``qtype`` question about it (about ``asks``, for yes/no and choice)
    whose answer is ``answer`` (drawn by rejection: a few dozen scenes at most, nothing is
    rendered until one is kept)."""
    for _ in range(10_000):
        scene = random_scene(rng)
        qa = make_question(scene, qtype, rng, asks)
        if qa is not None and qa[1] == answer:
            return scene, *qa
    raise RuntimeError(f"no {qtype} question with answer {answer!r} in 10000 scenes")


def heldout_plan(i: int) -> tuple[str, str, str | None]:
    """The type, answer and (yes/no, choice) content of held-out question ``i``.

    Types in turn, each type's answers in turn, and for yes/no and choice each content in turn
    after a full round of answers: a held-out prefix of any length is balanced, so the
    majority-answer baseline stays near uniform chance and a model that answers by habit scores
    no more than that (issue 29); and every content gets every answer."""
    qtype = QUESTION_TYPES[i % len(QUESTION_TYPES)]
    k = i // len(QUESTION_TYPES)
    options = ANSWERS[qtype]
    asks = ASKS[qtype][(k // len(options)) % len(ASKS[qtype])] if qtype in ASKS else None
    return qtype, options[k % len(options)], asks


def write_llava_demo(
    out: str | Path,
    seed: int = 0,
    pretrain_images: int = 3000,
    instruct_images: int = 3000,
    heldout_images: int = 400,
    text_only_share: float = 0.1,
    image_size: int = 64,
) -> dict[str, int]:
    """Write the LLaVA-format demo splits into ``out``; returns the record count of each file."""
    out = Path(out)
    rng = random.Random(f"llava-{seed}")
    counts: dict[str, int] = {}
    for split, n in (
        ("pretrain", pretrain_images),
        ("instruct", instruct_images),
        ("heldout", heldout_images),
    ):
        img_dir = out / "images" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        records: list[dict[str, object]] = []
        for i in range(n):
            if split == "heldout":
                qtype, answer, asks = heldout_plan(i)
                scene, q, a = balanced_question(qtype, answer, rng, asks)
            else:
                scene = random_scene(rng)
            key = f"{split}-{i:06d}"
            image = f"images/{split}/{key}.png"
            (out / image).write_bytes(png_bytes(draw_scene(scene, image_size)))
            if split == "pretrain":
                instruction = rng.choice(PRETRAIN_INSTRUCTIONS)
                # LCS-558K puts the image before or after the instruction; both occur.
                human = f"<image>\n{instruction}" if rng.random() < 0.5 else f"{instruction}\n<image>"
                turns = [human, short_captions(scene, rng, 1)[0]]
                records.append({"id": key, "image": image, "conversations": _conv(turns)})
            elif split == "instruct":
                qas = _questions(scene, rng, rng.randint(*INSTRUCT_TURNS))
                turns = []
                for j, (_, q, a) in enumerate(qas):
                    turns += [f"<image>\n{q}" if j == 0 else q, a]
                records.append({"id": key, "image": image, "conversations": _conv(turns)})
                if rng.random() < text_only_share:
                    q, a = rng.choice(TEXT_ONLY)
                    records.append({"id": f"text-{i:06d}", "conversations": _conv([q, a])})
            else:
                records.append(
                    {
                        "id": key,
                        "image": image,
                        "conversations": _conv([f"<image>\n{q}", a]),
                        "question_type": qtype,
                        "answer": a,
                        **({"asks": asks} if asks else {}),
                    }
                )
        name = {"pretrain": "llava_pretrain.json", "instruct": "llava_instruct.json"}.get(
            split, "llava_heldout.json"
        )
        (out / name).write_text(json.dumps(records, indent=1))
        counts[name] = len(records)
    spec = {
        "seed": seed,
        "pretrain_images": pretrain_images,
        "instruct_images": instruct_images,
        "heldout_images": heldout_images,
        "text_only_share": text_only_share,
        "image_size": image_size,
        "version": SPEC_VERSION,
    }
    (out / "llava_dataset.json").write_text(json.dumps({**spec, "records": counts}, indent=2))
    return counts


def _conv(turns: list[str]) -> list[dict[str, str]]:
    return [{"from": "human" if k % 2 == 0 else "gpt", "value": t} for k, t in enumerate(turns)]
