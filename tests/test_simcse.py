"""Supervised SimCSE: the loss on a hand-checked example, and the batches it is fed."""

from __future__ import annotations

import math

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
