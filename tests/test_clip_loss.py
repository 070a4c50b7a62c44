"""ClipLoss and SigLipLoss against values worked out by hand (1 process)."""

from __future__ import annotations

import math

import torch

from llm2clip_vlm.training.losses import ClipLoss, SigLipLoss


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_clip_loss_hand_checked() -> None:
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    scale = torch.tensor(2.0)
    # logits_per_image = 2 * I T^T = [[2, 1.2], [0, 1.6]]; per text = its transpose [[2, 0], [1.2, 1.6]].
    # CE of a 2-way row with correct logit a, other b is log(1 + e^(b - a)).
    per_image = (_softplus(1.2 - 2.0) + _softplus(0.0 - 1.6)) / 2
    per_text = (_softplus(0.0 - 2.0) + _softplus(1.2 - 1.6)) / 2
    expected = (per_image + per_text) / 2
    got = ClipLoss()(image, text, scale)
    assert abs(float(got) - expected) < 1e-6


def test_clip_loss_perfect_and_swapped_pairs() -> None:
    eye = torch.eye(4)
    scale = torch.tensor(100.0)
    assert float(ClipLoss()(eye, eye, scale)) < 1e-6  # matched pairs, huge margin: ~0
    swapped = eye[[1, 0, 3, 2]]
    # Every correct logit is 0 and one wrong logit is 100: loss ~= 100.
    assert abs(float(ClipLoss()(eye, swapped, scale)) - 100.0) < 1e-3


def test_siglip_loss_hand_checked() -> None:
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    scale, bias = torch.tensor(2.0), torch.tensor(-1.0)
    # logits = 2 * I T^T - 1 = [[1, 0.2], [-1, 0.6]]; -log sigmoid(z * l) = softplus(-z * l).
    logits = [[1.0, 0.2], [-1.0, 0.6]]
    total = sum(_softplus(-(1 if i == j else -1) * logits[i][j]) for i in range(2) for j in range(2))
    got = SigLipLoss()(image, text, scale, bias)
    assert abs(float(got) - total / 2) < 1e-6


def test_clip_loss_gradient_reaches_the_logit_scale() -> None:
    torch.manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    ClipLoss()(image, text, log_scale.exp()).backward()
    assert log_scale.grad is not None and float(log_scale.grad.abs()) > 0
