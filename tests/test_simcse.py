"""Supervised SimCSE: the loss on a hand-checked example, and the batches it is fed."""

from __future__ import annotations

import math

import pytest
import torch

from llm2clip_vlm.data.records import Caption, ImageCaptions
from llm2clip_vlm.text.simcse import SimCSEBatches, similar_images
from llm2clip_vlm.training.losses import SupervisedSimCSELoss

INSTR = {"short": "S-instr", "long": "L-instr"}


def test_simcse_loss_hand_checked() -> None:
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # norms differ: the loss uses cosine similarity
    p = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    n = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    # Row 0 logits (scale 1): [cos(q0,p0), cos(q0,p1), cos(q0,n0), cos(q0,n1)] = [1, 0, 0, 1]
    # -> -log(e / (e + 1 + 1 + e)) = log(2 + 2/e); row 1 is symmetric.
    expected = math.log(2 + 2 / math.e)
    assert abs(SupervisedSimCSELoss(scale=1.0)(q, p, n).item() - expected) < 1e-6
    # Without hard negatives: row logits [1, 0] -> log(1 + 1/e).
    assert abs(SupervisedSimCSELoss(scale=1.0)(q, p).item() - math.log(1 + 1 / math.e)) < 1e-6
    # Scale 50 (temperature 0.02): the tie with the hard negative leaves log 2 (+ e^-50 terms).
    assert abs(SupervisedSimCSELoss()(q, p, n).item() - math.log(2)) < 1e-6


def family(i: int, colour: str) -> ImageCaptions:
    """Images 2k and 2k+1 are near duplicates: same scene, one colour changed."""
    shape = ["circle", "square", "star", "hexagon", "triangle", "heart"][i // 2]
    where = ["top", "bottom", "left", "right", "middle", "corner"][i // 2]
    return ImageCaptions(
        key=f"img{i}",
        image=f"/data/{i}.png",
        captions=[
            Caption(f"a {colour} {shape}", "short"),
            Caption(f"one {colour} {shape} in the {where}", "short"),
            Caption(f"a photo of a single {colour} {shape} drawn in the {where} of a white canvas", "long"),
        ],
    )


RECORDS = [family(i, "red" if i % 2 == 0 else "blue") for i in range(12)]


def test_similar_images_finds_the_near_duplicate() -> None:
    nn = similar_images(RECORDS, k=1)
    assert nn[:, 0].tolist() == [i ^ 1 for i in range(12)]  # 0<->1, 2<->3, ...


def test_batches_are_distinct_typed_and_deterministic() -> None:
    batches = SimCSEBatches(RECORDS, INSTR, seed=3, neighbours=1)
    assert batches.steps_per_epoch(4) == 3
    by_text = {c.text: (r.key, c.kind) for r in RECORDS for c in r.captions}
    seen = []
    for step in range(3):  # one epoch covers every image once
        batch = batches.batch(step, 4)
        assert batch == batches.batch(step, 4)  # a pure function of (seed, step)
        images = [by_text[t.query][0] for t in batch]
        assert len(set(images)) == 4  # B distinct images
        seen += images
        for t in batch:
            q_img, q_kind = by_text[t.query]
            p_img, p_kind = by_text[t.positive]
            n_img, n_kind = by_text[t.negative]
            assert q_img == p_img and t.query != t.positive
            assert n_img != p_img and n_kind == p_kind  # another image, the positive's type
            assert t.instruction == INSTR[q_kind]
    assert sorted(seen) == sorted(r.key for r in RECORDS)
    # Hard negatives come mostly from the near duplicate (90%, else random).
    negs = [(by_text[t.positive][0], by_text[t.negative][0]) for s in range(30) for t in batches.batch(s, 4)]
    twins = sum(int(p[3:]) ^ 1 == int(n[3:]) for p, n in negs)
    assert twins / len(negs) > 0.75
    # Process slices of the global batch reassemble it (what N processes see = what 1 sees).
    assert batches.batch(5, 4)[:2] + batches.batch(5, 4)[2:] == batches.batch(5, 4)
    assert SimCSEBatches(RECORDS, INSTR, seed=4).batch(0, 4) != batches.batch(0, 4)


def test_pairs_are_cross_kind_like_the_reference() -> None:
    """microsoft/LLM2CLIP llm_caption_contrastive/dataset/E5_cc3m.py:72-96 pairs short with long
    (coin flip for the query's kind) and :121-124 picks the instruction by the query's kind."""
    five_short_one_long = [
        ImageCaptions(
            key=f"img{i}",
            image=f"/data/{i}.png",
            captions=[Caption(f"short {j} of {i}", "short") for j in range(5)]
            + [Caption(f"the long caption of image {i}", "long")],
        )
        for i in range(4)
    ]
    only_short = ImageCaptions(
        key="img4", image="/data/4.png", captions=[Caption("a", "short"), Caption("b", "short")]
    )
    batches = SimCSEBatches([*five_short_one_long, only_short], INSTR, seed=0, hard_negatives=False)
    kind = {c.text: c.kind for r in [*five_short_one_long, only_short] for c in r.captions}
    query_kinds = []
    for step in range(200):
        for t in batches.batch(step, 5):
            if t.query in ("a", "b"):  # one kind only: two distinct captions of it
                assert {t.query, t.positive} == {"a", "b"} and t.instruction == "S-instr"
                continue
            assert kind[t.query] != kind[t.positive]  # always short <-> long
            assert t.instruction == INSTR[kind[t.query]]
            query_kinds.append(kind[t.query])
    # The query's kind is a fair coin (random.randint(0, 1) in the reference), not 5:1 as the
    # caption counts would give: 800 draws, so 0.5 +- 0.06 is > 3 standard deviations.
    assert abs(query_kinds.count("long") / len(query_kinds) - 0.5) < 0.06


def test_pairing_any_draws_any_two_captions_of_the_image() -> None:
    # RECORDS: 2 short + 1 long per image; any two of 3 captions -> short-short 1/3 of the time.
    batches = SimCSEBatches(RECORDS, INSTR, seed=0, hard_negatives=False, pairing="any")
    kind = {c.text: c.kind for r in RECORDS for c in r.captions}
    pairs = [(kind[t.query], kind[t.positive]) for step in range(100) for t in batches.batch(step, 6)]
    same = sum(q == p for q, p in pairs) / len(pairs)
    assert abs(same - 1 / 3) < 0.06  # 600 pairs: > 3 standard deviations
    assert all(t.query != t.positive for step in range(20) for t in batches.batch(step, 6))
    assert all(t.instruction == INSTR[kind[t.query]] for t in batches.batch(0, 6))
    with pytest.raises(ValueError, match="pairing must be"):
        SimCSEBatches(RECORDS, INSTR, pairing="short")


def test_pairing_same_kind_pairs_short_with_short_and_long_with_long() -> None:
    """``pairing="same_kind"``: the two captions of a pair are of one kind, the kind a fair coin
    among the kinds the image has two or more of; an image with one caption per kind pairs those."""

    def image(i: int, n_short: int, n_long: int) -> ImageCaptions:
        return ImageCaptions(
            key=f"img{i}",
            image=f"/data/{i}.png",
            captions=[Caption(f"short {j} of {i}", "short") for j in range(n_short)]
            + [Caption(f"the long caption {j} of image {i}", "long") for j in range(n_long)],
        )

    # Two of each kind (the poster and glyph worlds), three short and one long, one of each, only long.
    records = [image(0, 2, 2), image(1, 2, 2), image(2, 3, 1), image(3, 1, 1), image(4, 0, 3)]
    batches = SimCSEBatches(records, INSTR, seed=0, pairing="same_kind", neighbours=2)
    owner = {c.text: (r.key, c.kind) for r in records for c in r.captions}
    kinds = {r.key: {c.kind for c in r.captions} for r in records}
    pairs: dict[str, list[tuple[str, str]]] = {r.key: [] for r in records}
    for step in range(200):
        for t in batches.batch(step, 5):
            (q_img, q_kind), (p_img, p_kind) = owner[t.query], owner[t.positive]
            assert q_img == p_img and t.query != t.positive
            assert t.instruction == INSTR[q_kind]
            n_img, n_kind = owner[t.negative]  # type: ignore[index]
            # Another image's caption of the positive's kind (any kind if that image has none).
            assert n_img != p_img and (n_kind == p_kind or p_kind not in kinds[n_img])
            pairs[q_img].append((q_kind, p_kind))
    for key in ("img0", "img1"):  # 200 draws each: the coin is fair within 0.5 +- 0.12 (> 3 sd)
        assert all(q == p for q, p in pairs[key])
        assert abs(sum(q == "long" for q, _ in pairs[key]) / len(pairs[key]) - 0.5) < 0.12
    assert set(pairs["img2"]) == {("short", "short")}  # one long caption: it cannot pair with itself
    assert set(pairs["img4"]) == {("long", "long")}
    # One caption per kind: the image's only pair, either way round.
    assert set(pairs["img3"]) == {("short", "long"), ("long", "short")}
    # Every caption of a kind with two or more is drawn, as query and as positive; a lone caption
    # of its kind beside a pairable kind (img2's long one) never is.
    queries = {t.query for step in range(200) for t in batches.batch(step, 5)}
    positives = {t.positive for step in range(200) for t in batches.batch(step, 5)}
    everything = {c.text for r in records for c in r.captions}
    assert queries == positives == everything - {"the long caption 0 of image 2"}
    # The pairing is a pure function of (seed, step), like the others.
    assert SimCSEBatches(records, INSTR, seed=0, pairing="same_kind", neighbours=2).batch(
        7, 5
    ) == batches.batch(7, 5)
