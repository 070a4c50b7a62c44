"""The blind baseline of LLaVA's held-out evaluation: the same questions with the image withheld.

A model built so that the image decides the answer (it reads the colour of the pixels it is given)
must lose its accuracy blind, by exactly the share of questions whose foreign image has another
colour; a question whose answer does not depend on the image must score the same blind. The
majority-answer baseline is checked against counts made by hand.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from llm2clip_vlm.data.conversations import LlavaRecord
from llm2clip_vlm.llava.blind import derangement
from llm2clip_vlm.llava.evaluate import answer_questions, majority_answers, score
from llm2clip_vlm.text.tiny import save_tiny_llm

COLOURS = {"red": (230, 20, 20), "blue": (20, 20, 230)}


def test_derangement_moves_every_key_and_keeps_shared_keys_together() -> None:
    keys = ["a", "b", "a", "c", "d", "b", "e"]
    m = derangement(keys, seed=3)
    assert m is not None and set(m) == set(keys) and set(m.values()) == set(keys)
    assert all(m[k] != k for k in m)
    assert derangement(keys, seed=3) == m  # seeded
    assert derangement(["x", "x"]) is None and derangement([]) is None
    assert derangement(["x", "y"]) == {"x": "y", "y": "x"}


class ColourReader(torch.nn.Module):
    """A "LLaVA" whose answer is decided by the image: ``red`` or ``blue`` from the pixels' colour,
    and ``yes`` to a question about whether there is a picture (an answer no image changes)."""

    def __init__(self, tokenizer: Any) -> None:
        super().__init__()
        self.tokenizer = tokenizer

    def generate(self, input_ids, attention_mask, pixel_values=None, max_new_tokens=8, **_: Any):
        rows = []
        for i, ids in enumerate(input_ids):
            prompt = self.tokenizer.decode(ids[attention_mask[i].bool()])
            if "picture" in prompt:
                word = "yes"
            else:
                r, _, b = pixel_values[i].mean(dim=(1, 2)).tolist()
                word = "red" if r > b else "blue"
            rows.append(
                self.tokenizer(word, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            )
        width = max(len(r) for r in rows)
        pad = self.tokenizer.eos_token_id
        new = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from transformers import AutoTokenizer, CLIPImageProcessor

    root = tmp_path_factory.mktemp("blind")
    tok = AutoTokenizer.from_pretrained(save_tiny_llm(root / "llm", hidden_size=64, seed=0))
    # The prompt is tokenized as LLaVA's tokenizer_image_token does, around an <image> token (the
    # model below reads pixels, not image tokens).
    tok.add_tokens(["<image>"], special_tokens=True)
    processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    records = []
    # 10 images, colours in a fixed order; a colour question on each, and a "picture" question on
    # the first 6 (the answer is "yes" whatever the image).
    order = ["red", "blue", "red", "red", "blue", "blue", "red", "blue", "red", "red"]
    for i, colour in enumerate(order):
        path = root / f"{i}.png"
        Image.new("RGB", (20, 12), COLOURS[colour]).save(path)
        questions = [("colour", "What colour is the shape?", colour)]
        if i < 6:
            questions.append(("exists", "Is there a picture?", "yes"))
        for qtype, q, a in questions:
            records.append(
                LlavaRecord(
                    id=f"{i}-{qtype}",
                    image=path,
                    source=f"test[#{i}]",
                    conversations=[{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}],
                    extra={"question_type": qtype, "answer": a},
                )  # fmt: skip
            )
    return {"tok": tok, "processor": processor, "records": records, "order": order, "root": root}


def _ask(world: dict[str, Any], blind: str, batch_size: int = 4) -> list[str]:
    return answer_questions(
        ColourReader(world["tok"]), world["tok"], world["processor"], world["records"],
        template="vicuna_v1", image_token_id=world["tok"].convert_tokens_to_ids("<image>"), image_seq_length=1, max_new_tokens=4,
        batch_size=batch_size, show_progress=False, blind=blind, blind_seed=7,
    )  # fmt: skip


def test_the_image_decides_colour_blind_drops_and_image_free_questions_do_not(world) -> None:
    records, order = world["records"], world["order"]
    sighted = _ask(world, "off")
    shuffled = _ask(world, "shuffle")
    assert _ask(world, "shuffle", batch_size=3) == shuffled  # batching changes nothing
    result = score(records, sighted, shuffled, "shuffle")
    colour, exists = result["per_type"]["colour"], result["per_type"]["exists"]
    assert colour["accuracy"] == 100.0 and exists["accuracy"] == 100.0
    # Expected blind accuracy by hand: a colour question is right blind only when the foreign image
    # it was given has its own image's colour.
    paths = [str(world["root"] / f"{i}.png") for i in range(len(order))]
    moved = derangement([str(r.image) for r in records], 7)
    assert moved is not None and all(moved[p] != p for p in paths)
    same = sum(order[paths.index(moved[p])] == order[i] for i, p in enumerate(paths))
    assert colour["blind_accuracy"] == pytest.approx(100.0 * same / 10)
    assert colour["blind_accuracy"] < colour["accuracy"] and colour["gap"] == pytest.approx(100 - 10 * same)
    assert exists["blind_accuracy"] == exists["accuracy"] == 100.0 and exists["gap"] == 0.0
    assert result["blind"] == "shuffle" and result["n"] == 16
    assert result["blind_accuracy"] == pytest.approx(100.0 * (same + 6) / 16)


def test_a_blank_image_gives_one_answer_whatever_the_image(world) -> None:
    # A blank image is the processor's mean colour: every colour question gets the same answer.
    blank = _ask(world, "blank")
    answers = {a.strip() for a, r in zip(blank, world["records"], strict=True) if r.id.endswith("colour")}
    assert len(answers) == 1
    result = score(world["records"], _ask(world, "off"), blank, "blank")
    # 6 of the 10 images are red.
    expected = 60.0 if answers == {"red"} else 40.0
    assert result["per_type"]["colour"]["blind_accuracy"] == expected and result["blind"] == "blank"


def test_majority_baseline_is_the_most_frequent_answer_of_each_type(world) -> None:
    records = world["records"]
    assert majority_answers(records) == {"colour": "red", "exists": "yes"}
    result = score(records, ["nonsense"] * len(records))
    assert result["per_type"]["colour"]["majority_accuracy"] == 60.0
    assert result["per_type"]["colour"]["majority_answer"] == "red"
    assert result["per_type"]["exists"]["majority_accuracy"] == 100.0
    assert result["majority_accuracy"] == pytest.approx(100.0 * 12 / 16)
    assert "blind_accuracy" not in result and result["accuracy"] == 0.0


def test_shuffle_needs_two_different_images(world) -> None:
    one = [r for r in world["records"] if r.image == world["records"][0].image]
    with pytest.raises(ValueError, match="two different images"):
        answer_questions(
            ColourReader(world["tok"]), world["tok"], world["processor"], one, template="vicuna_v1",
            image_token_id=world["tok"].convert_tokens_to_ids("<image>"), image_seq_length=1, show_progress=False, blind="shuffle",
        )  # fmt: skip


def test_lettered_choice_majority(tmp_path: Path) -> None:
    recs = [
        LlavaRecord(
            str(i),
            None,
            [{"from": "human", "value": "q"}, {"from": "gpt", "value": a}],
            "t",
            {"question_type": "choice", "answer": a},
        )  # fmt: skip
        for i, a in enumerate(["B", "A", "B", "C", "B."])
    ]
    r = score(recs, ["A"] * 5)["per_type"]["choice"]
    assert r["majority_answer"] == "b" and r["majority_accuracy"] == 60.0 and r["accuracy"] == 20.0


# ----------------------------------------------------------------------------------------------
# A real tiny LLaVA, trained through llava-finetune on a task only the image answers
# ----------------------------------------------------------------------------------------------
TRAIN_COLOURS = {
    "red": (220, 30, 30),
    "blue": (30, 30, 220),
}


def _colour_split(root: Path, name: str, colours: list[str], seed: int) -> Path:
    import random

    rng = random.Random(seed)
    (root / name).mkdir(parents=True)
    recs = []
    for i, c in enumerate(colours):
        jitter = tuple(max(0, min(255, v + rng.randint(-20, 20))) for v in TRAIN_COLOURS[c])
        Image.new("RGB", (32, 32), jitter).save(root / name / f"{i}.png")
        recs.append({"id": f"{name}{i}", "image": f"{name}/{i}.png", "question_type": "colour", "answer": c,
                     "conversations": [{"from": "human", "value": "<image>\nWhat colour is the image?"},
                                       {"from": "gpt", "value": c}]})  # fmt: skip
    (root / f"{name}.json").write_text(json.dumps(recs))
    return root / f"{name}.json"


def test_a_tiny_llava_trained_on_colours_loses_its_accuracy_blind(tmp_path: Path) -> None:
    """The answer is the image's colour (red or blue): 15 finetuning steps make the model read it
    (a scratch run of this set-up, 2026-12-06: 100 % sighted, 50 % blind, majority 50 %); blind it answers the colour of
    the image it was given, right only where that has its own image's colour. Where every
    held-out image shows the same thing (copies of one image), the foreign image carries the same
    answer and blind accuracy equals accuracy exactly."""
    import random

    from llm2clip_vlm import config_io
    from llm2clip_vlm.commands import run_llava
    from llm2clip_vlm.recipe import RunConfig
    from llm2clip_vlm.tower.synthetic import TowerShape, save_random_tower

    rng = random.Random(0)
    names = list(TRAIN_COLOURS)
    train = _colour_split(tmp_path, "train", [rng.choice(names) for _ in range(128)], 1)
    held = _colour_split(tmp_path, "held", [rng.choice(names) for _ in range(16)], 2)
    same = tmp_path / "same.json"  # 6 paths, one image
    records = json.loads(held.read_text())[:1] * 6
    for i, r in enumerate(records):
        (tmp_path / "held" / f"copy{i}.png").write_bytes((tmp_path / r["image"]).read_bytes())
    same.write_text(
        json.dumps([{**r, "id": f"c{i}", "image": f"held/copy{i}.png"} for i, r in enumerate(records)])
    )
    tower = save_random_tower(tmp_path / "tower", "clip", TowerShape(32, 8, 32, 2, 2, 64), seed=1)
    llm = save_tiny_llm(tmp_path / "llm", hidden_size=64, seed=2)

    def cfg(phase: str, steps: int, heldout: Path | str) -> RunConfig:
        p = f"llava.{phase}"
        return config_io.load(RunConfig, None, [
            f"llava.tower={tower}", f"llava.llm={llm}", f"{p}.data.path={train}", f"{p}.data.heldout_path={heldout}",
            f"{p}.batch_size=16", f"{p}.micro_batch_size=16", f"{p}.num_workers=0", f"{p}.loop.precision=fp32",
            f"{p}.loop.max_steps={steps}", f"{p}.eval_max_new_tokens=3", f"{p}.lr=3e-3", f"{p}.loop.warmup_ratio=0",
            f"{p}.gradient_checkpointing=false", f"{p}.template=vicuna_v1", f"{p}.max_length=256",
        ])  # fmt: skip

    run_llava(cfg("pretrain", 1, ""), tmp_path / "pre", "pretrain")
    metrics = run_llava(cfg("finetune", 15, held), tmp_path / "ft", "finetune", init=tmp_path / "pre")
    after = metrics["eval"]["after"]
    assert after["blind"] == "shuffle" and after["n"] == 16
    assert after["accuracy"] >= 90 and after["blind_accuracy"] <= after["accuracy"] - 25, (
        after["examples"],
        metrics["train"]["losses"][-3:],
    )
    answers = [r["answer"] for r in json.loads(held.read_text())]
    majority = max(answers.count(c) for c in names)
    assert after["per_type"]["colour"]["majority_accuracy"] == pytest.approx(100 * majority / 16)

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llm2clip_vlm.data.conversations import load_llava_records

    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "ft" / "model")
    proc = AutoProcessor.from_pretrained(tmp_path / "ft" / "model")
    copies = load_llava_records(same)
    kw = {"template": "vicuna_v1", "image_token_id": model.config.image_token_index, "max_new_tokens": 3,
          "image_seq_length": model.config.image_seq_length, "show_progress": False}  # fmt: skip
    sighted = answer_questions(model, proc.tokenizer, proc.image_processor, copies, **kw)
    blind = answer_questions(model, proc.tokenizer, proc.image_processor, copies, blind="shuffle", **kw)
    assert blind == sighted
    result = score(copies, sighted, blind)
    assert result["blind_accuracy"] == result["accuracy"] and result["gap"] == 0.0
