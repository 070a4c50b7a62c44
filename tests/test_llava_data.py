"""LLaVA data: record checks and the bad-record policy, padding to square, batches and sampling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AddedToken, CLIPImageProcessor

from llm2clip_vlm.data.conversations import load_llava_records
from llm2clip_vlm.data.errors import DataError
from llm2clip_vlm.data.synthetic_llava import (
    ANSWERS,
    INSTRUCT_TURNS,
    QUESTION_TYPES,
    balanced_question,
    make_question,
    write_llava_demo,
)
from llm2clip_vlm.llava.data import Collator, LlavaDataset, ModalityBatchSampler, expand_to_square
from llm2clip_vlm.llava.templates import IGNORE_INDEX
from llm2clip_vlm.text.tiny import tiny_tokenizer


def _img(path: Path, size=(8, 8), colour=(200, 10, 10)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path.name


def _rec(i: int, image: str | None = "ok.png", q: str = "<image>\nWhat?", a: str = "red") -> dict:
    r = {"id": f"r{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
    if image is not None:
        r["image"] = image
    return r


BAD = {
    "missing image file": (_rec(1, image="nope.png"), "does not exist"),
    "unreadable image": (_rec(2, image="broken.png"), "cannot read image"),
    "no placeholder": (_rec(3, q="What?"), "no <image>"),
    "repeated placeholder": (_rec(4, q="<image><image>What?"), "2 times"),
    "empty conversation": ({"id": "r5", "image": "ok.png", "conversations": []}, "missing or empty"),
    "path outside folder": (_rec(6, image="../ok.png"), "leaves the image root"),
    "empty answer": (_rec(7, a=" "), "empty answer"),
}


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    _img(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return tmp_path


@pytest.mark.parametrize("case", list(BAD))
def test_each_bad_record_is_named_in_the_error(folder: Path, case: str) -> None:
    record, message = BAD[case]
    (folder / "data.json").write_text(json.dumps([_rec(0), record]))
    with pytest.raises(DataError, match=message) as e:
        load_llava_records(folder / "data.json")
    assert "data.json[#1]" in str(e.value) and f"id={record['id']}" in str(e.value)


def test_skip_bad_skips_counts_and_reports_then_stops_past_the_limit(folder: Path) -> None:
    from llm2clip_vlm.data.errors import BadRecords

    good = [_rec(100 + i) for i in range(93)] + [_rec(200, image=None, q="text only?")]
    (folder / "data.json").write_text(json.dumps(good + [r for r, _ in BAD.values()]))
    bad = BadRecords(skip_bad=True, max_bad_fraction=0.1)
    recs = load_llava_records(folder / "data.json", bad=bad)
    assert len(recs) == 94 and sum(r.has_image for r in recs) == 93
    assert len(bad.skipped) == len(BAD)
    assert {w.split("[#")[1].split("]")[0] for w, _ in bad.skipped} == {str(i) for i in range(94, 101)}
    with pytest.raises(DataError, match="7 of 101 records are bad"):
        load_llava_records(folder / "data.json", skip_bad=True, max_bad_fraction=0.05)


def test_malformed_json_names_the_line(folder: Path) -> None:
    (folder / "data.json").write_text('[{"id": 1,\n "conversations": ]')
    with pytest.raises(DataError, match=r"data.json: malformed JSON at line 2"):
        load_llava_records(folder / "data.json")
    (folder / "data.jsonl").write_text(json.dumps(_rec(0)) + "\n{broken\n")
    with pytest.raises(DataError, match=r"data.jsonl:2: malformed JSON"):
        load_llava_records(folder / "data.jsonl")
    assert len(load_llava_records(folder / "data.jsonl", skip_bad=True, max_bad_fraction=0.5)) == 1


def test_expand_to_square_pads_centred_with_the_mean_colour() -> None:
    img = Image.new("RGB", (6, 2), (255, 0, 0))
    sq = expand_to_square(img, (1, 2, 3))
    assert sq.size == (6, 6)
    assert sq.getpixel((0, 0)) == (1, 2, 3) and sq.getpixel((0, 5)) == (1, 2, 3)
    assert sq.getpixel((3, 2)) == (255, 0, 0) and sq.getpixel((3, 3)) == (255, 0, 0)
    assert expand_to_square(Image.new("RGB", (4, 4)), (9, 9, 9)).size == (4, 4)


def _dataset(folder: Path, records, max_length=64, seq=5):
    tok = tiny_tokenizer()
    tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    proc = CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
    image_id = tok.convert_tokens_to_ids("<image>")
    return (
        LlavaDataset(records, tok, proc, "vicuna_v1", image_id, seq, max_length, system="S."),
        tok,
        image_id,
    )


def test_samples_expand_the_image_and_batches_keep_pixels_with_their_rows(folder: Path) -> None:
    _img(folder / "blue.png", (12, 4), (0, 0, 255))
    data = [_rec(0), _rec(1, image=None, q="text?", a="no"), _rec(2, image="blue.png")]
    (folder / "data.json").write_text(json.dumps(data))
    ds, tok, image_id = _dataset(folder, load_llava_records(folder / "data.json"))
    s0, s1 = ds[0], ds[1]
    assert (s0.input_ids == image_id).sum() == 5 and (s1.input_ids == image_id).sum() == 0
    assert (s0.labels[s0.input_ids == image_id] == IGNORE_INDEX).all()
    assert s1.pixel_values is None and s0.pixel_values.shape == (3, 8, 8)
    batch = Collator(tok.pad_token_id or 1)([ds[0], ds[1], ds[2]])
    assert batch.image_rows.tolist() == [1, 0, 1] and batch.pixel_values.shape[0] == 2
    parts = batch.split(2)
    assert [len(p) for p in parts] == [2, 1]
    # The blue (padded) image travels with row 2, not with row 0.
    assert torch.equal(parts[1].pixel_values[0], batch.pixel_values[1])
    assert (
        torch.equal(parts[0].pixel_values[0], batch.pixel_values[0]) and parts[0].pixel_values.shape[0] == 1
    )
    assert sum(p.num_supervised for p in parts) == batch.num_supervised > 0


def test_truncation_is_counted_and_an_image_that_does_not_fit_is_refused(folder: Path) -> None:
    (folder / "data.json").write_text(json.dumps([_rec(0, a="a long answer " * 20)]))
    recs = load_llava_records(folder / "data.json")
    ds, tok, _ = _dataset(folder, recs, max_length=60)
    s = ds[0]
    assert s.truncated and len(s.input_ids) == 60
    ds, _, _ = _dataset(folder, recs, max_length=4, seq=5)
    with pytest.raises(DataError, match="do not fit in max_length 4"):
        ds[0]
    ds.skip_bad = True
    assert ds[0] is None
    assert Collator(0)([None, ds[0]]).dropped == 2


def test_modality_batches_are_pure_deterministic_and_sliced_per_rank() -> None:
    is_image = [i % 4 != 0 for i in range(40)]  # 30 image, 10 text records
    one = list(ModalityBatchSampler(is_image, 8, 0, 1, seed=3, start_step=0, total_steps=8))
    assert all(len(set(is_image[i] for i in b)) == 1 for b in one[:-1] if len(b) == 8)
    assert len(one[0]) == 8 and len({i for b in one[:4] for i in b}) == 32  # no repeats within an epoch
    ranks = [list(ModalityBatchSampler(is_image, 8, r, 2, 3, 0, 8)) for r in range(2)]
    assert [a + b for a, b in zip(*ranks, strict=True)] == one  # rank slices concatenate to the global batch
    resumed = list(ModalityBatchSampler(is_image, 8, 0, 1, 3, start_step=5, total_steps=8))
    assert resumed == one[5:]


def test_synthetic_llava_world_writes_answerable_records(tmp_path: Path) -> None:
    import random

    from llm2clip_vlm.data.synthetic import random_scene

    counts = write_llava_demo(
        tmp_path, pretrain_images=10, instruct_images=20, heldout_images=12, image_size=32
    )
    assert counts["llava_pretrain.json"] == 10 and counts["llava_heldout.json"] == 12
    assert counts["llava_instruct.json"] >= 20  # plus text-only records
    for name in counts:
        recs = load_llava_records(tmp_path / name)
        assert all(r.image is None or r.image.is_file() for r in recs)
    held = load_llava_records(tmp_path / "llava_heldout.json")
    assert all(r.extra["answer"] == r.conversations[1]["value"] for r in held)
    # Yes/no questions are balanced and every type can be asked of some scene.
    rng = random.Random(0)
    qas = [make_question(random_scene(rng), "yesno", rng) for _ in range(400)]
    answers = [qa[1] for qa in qas if qa is not None]
    assert len(answers) > 300 and 0.4 < answers.count("yes") / len(answers) < 0.6
    for qtype in QUESTION_TYPES:
        assert any(make_question(random_scene(rng), qtype, rng) for _ in range(20))
    # Deterministic per seed.
    write_llava_demo(
        tmp_path / "again", pretrain_images=10, instruct_images=20, heldout_images=12, image_size=32
    )
    assert (tmp_path / "again" / "llava_instruct.json").read_text() == (
        tmp_path / "llava_instruct.json"
    ).read_text()


def test_synthetic_llava_heldout_is_balanced_in_every_prefix(tmp_path: Path) -> None:
    """The held-out questions cycle through the types and each type's answers: any prefix scores
    about uniform chance for a constant answer (issue 29: the old first 200 had a 38 % majority
    letter, so a model answering "by habit" could pass for one that looks)."""
    import collections
    import json
    import random

    write_llava_demo(tmp_path, pretrain_images=2, instruct_images=30, heldout_images=96, image_size=16)
    held = json.loads((tmp_path / "llava_heldout.json").read_text())
    assert [r["question_type"] for r in held[:12]] == list(QUESTION_TYPES) * 2
    for n in (48, 96):
        per = collections.defaultdict(collections.Counter)
        for r in held[:n]:
            per[r["question_type"]][r["answer"]] += 1
        for qtype, counts in per.items():
            # n/6 questions of this type, spread over its answers as evenly as a cycle can.
            assert sum(counts.values()) == n // 6
            assert max(counts.values()) - min(counts[a] for a in ANSWERS[qtype]) <= 1, (qtype, counts)
    # Every answer of every type can be drawn; counts are checked against the scene itself.
    rng = random.Random(1)
    for qtype in QUESTION_TYPES:
        for answer in ANSWERS[qtype]:
            scene, question, got = balanced_question(qtype, answer, rng)
            assert got == answer and question.endswith(("phrase.", "yes or no.", "directly."))
            if qtype == "count":
                assert ANSWERS["count"][len(scene.objects) - 1] == answer
            if qtype == "colour":
                shape = question.split("What colour is the ")[1].split("?")[0]
                assert [o.colour for o in scene.objects if o.shape == shape] == [answer]
    # Instruction images carry INSTRUCT_TURNS question turns (fewer only when a scene allows fewer).
    instruct = [r for r in json.loads((tmp_path / "llava_instruct.json").read_text()) if "image" in r]
    turns = [len(r["conversations"]) // 2 for r in instruct]
    assert min(turns) >= 1 and max(turns) <= INSTRUCT_TURNS[1]
    assert sum(turns) / len(turns) >= INSTRUCT_TURNS[0]


def test_yes_no_and_choice_questions_ask_what_the_scene_shows() -> None:
    """Yes/no and choice are formats over contents (issue 29): yes/no asks MME's perception
    categories this world has (lmms-eval lmms_eval/tasks/mme/utils.py, eval_type_dict
    ["Perception"]: existence, count, position, color), choice the four open types with lettered
    options. Every answer is checked against the scene it was drawn from."""
    import collections
    import random

    from llm2clip_vlm.data.synthetic import COLOURS, NUMBER_WORDS, POSITIONS, SHAPES, random_scene
    from llm2clip_vlm.data.synthetic_llava import ASKS

    assert ASKS["yesno"] == ("existence", "count", "position", "colour")
    assert set(ASKS["choice"]) == {"colour", "shape", "position", "count"}
    rng = random.Random(3)
    answers: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for _ in range(600):
        scene = random_scene(rng)
        objs = scene.objects
        at = {POSITIONS[o.cell]: o for o in objs}
        for asks in ASKS["yesno"]:
            qa = make_question(scene, "yesno", rng, asks)
            if qa is None:
                continue
            q, a = qa[0].split("\n")[0], qa[1]
            answers[asks][a] += 1
            words = q.rstrip("?").split()
            if asks == "existence":  # "Is there a <shape> in the image?"
                truth = words[3] in {o.shape for o in objs}
            elif asks == "count":  # "Are there <n> shapes ..." / "Is there only one shape ..."
                n = 1 if "only one" in q else [k for k, w in NUMBER_WORDS.items() if w == words[2]][0]
                truth = n == len(objs)
            elif asks == "position":  # "Is the <colour> <shape> at the <cell>?"
                cell = q.rstrip("?").split(" at the ")[1]
                truth = cell in at and (at[cell].colour, at[cell].shape) == (words[2], words[3])
            else:  # "Is the <shape> <colour>?"
                assert words[2] in SHAPES and words[3] in COLOURS
                truth = [o.colour for o in objs if o.shape == words[2]] == [words[3]]
            assert a == ("yes" if truth else "no"), (q, a, objs)
        for asks in ASKS["choice"]:
            qa = make_question(scene, "choice", rng, asks)
            if qa is None:
                continue
            lines = qa[0].split("\n")
            options = {line[0]: line[3:] for line in lines[1:5]}
            assert sorted(options) == list("ABCD") and len(set(options.values())) == 4
            assert lines[-1].endswith("directly.")
            right = options[qa[1]]
            answers["choice-" + asks][qa[1]] += 1
            if asks == "count":
                assert right == NUMBER_WORDS[len(objs)]
            elif asks == "colour":
                shape = lines[0].split("What colour is the ")[1].rstrip("?")
                assert [o.colour for o in objs if o.shape == shape] == [right]
            elif asks == "shape":
                assert at[lines[0].split(" at the ")[1].rstrip("?")].shape == right
            else:
                colour, shape = lines[0].split("Where is the ")[1].rstrip("?").split()
                assert [POSITIONS[o.cell] for o in objs if (o.colour, o.shape) == (colour, shape)] == [right]
    # Both answers of every yes/no content, every letter of every choice content, about evenly.
    for key, counts in answers.items():
        assert min(counts.values()) > 0.6 * max(counts.values()), (key, counts)
        assert len(counts) == (2 if key in ASKS["yesno"] else 4), (key, counts)
    with pytest.raises(ValueError, match="asks about one of"):
        make_question(random_scene(rng), "yesno", rng, "shape")


def test_heldout_yes_no_and_choice_cycle_their_contents(tmp_path: Path) -> None:
    """Each yes/no and choice content gets each answer in the held-out split, in turn."""
    import json

    from llm2clip_vlm.data.synthetic_llava import ASKS, heldout_plan

    plan = [heldout_plan(i) for i in range(6 * 16)]
    for qtype in ASKS:
        rows = [(a, asks) for t, a, asks in plan if t == qtype]
        assert sorted(set(rows)) == sorted((a, k) for a in ANSWERS[qtype] for k in ASKS[qtype])
    write_llava_demo(tmp_path, pretrain_images=2, instruct_images=4, heldout_images=48, image_size=16)
    held = json.loads((tmp_path / "llava_heldout.json").read_text())
    assert [(r["question_type"], r["answer"], r.get("asks")) for r in held] == plan[:48]


def test_instruction_questions_follow_the_type_weights() -> None:
    """The instruction split asks the cell- and binding-types (weight 2) about twice as often as
    colour and count (weight 1): drawn without replacement, so a little less than twice."""
    import collections
    import random

    from llm2clip_vlm.data.synthetic import random_scene
    from llm2clip_vlm.data.synthetic_llava import QUESTION_WEIGHTS, _questions

    rng = random.Random(5)
    seen = collections.Counter(t for _ in range(3000) for t, _, _ in _questions(random_scene(rng), rng, 2))
    light = (seen["colour"] + seen["count"]) / 2
    for qtype in ("shape", "position", "yesno", "choice"):
        assert QUESTION_WEIGHTS[qtype] == 2.0 and 1.5 < seen[qtype] / light < 2.2, (qtype, seen)


def test_truncated_images_are_refused_even_when_another_library_allows_them(
    tmp_path: Path, monkeypatch
) -> None:
    from PIL import ImageFile

    from llm2clip_vlm.data.images import load_rgb

    Image.effect_noise((64, 64), 50).convert("RGB").save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as lmms-eval sets it on import
    with pytest.raises(DataError, match="cannot read image"):
        load_rgb(tmp_path / "cut.png", "rec#1")
