"""The stage-2 collapse warning: features all alike for a while -> one warning naming the fix."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from llm2clip_vlm.vision.collapse import CollapseWatch, mean_pairwise_cosine


def test_mean_pairwise_cosine_matches_the_pairwise_definition() -> None:
    f = F.normalize(torch.randn(7, 5, generator=torch.Generator().manual_seed(0)), dim=1)
    sim = f @ f.T
    expected = (sim.sum() - sim.diag().sum()) / (7 * 6)
    assert mean_pairwise_cosine(f) == pytest.approx(expected.item(), abs=1e-6)
    assert mean_pairwise_cosine(F.normalize(torch.ones(4, 3), dim=1)) == pytest.approx(1.0)


def test_collapse_is_reported_once_after_patience_steps(caplog: pytest.LogCaptureFixture) -> None:
    g = torch.Generator().manual_seed(1)
    healthy = F.normalize(torch.randn(16, 8, generator=g), dim=1)
    same = F.normalize(torch.ones(16, 8) + 1e-4 * torch.randn(16, 8, generator=g), dim=1)
    watch = CollapseWatch(patience=3)
    with caplog.at_level(logging.WARNING):
        # Collapsed images with healthy captions are not a collapse; a healthy step resets the count.
        assert not any(watch.update(k, same, healthy) for k in range(5))
        assert not watch.update(5, same, same) and not watch.update(6, same, same)
        assert not watch.update(7, healthy, healthy)
        fired = [watch.update(k, same, same) for k in range(8, 14)]
    assert fired == [False, False, True, False, False, False]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        len(warnings) == 1
        and "collapsed (step 10)" in warnings[0]
        and "stage2.loop.warmup_steps" in warnings[0]
    )
