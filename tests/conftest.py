"""Test-session set-up shared by every test module.

accelerate fixes one mixed precision per process (a singleton, see
``llm2clip_vlm.training.dist.make_accelerator``). Each test stands for a fresh program, so the
singletons an earlier test set up are dropped before it, as accelerate's own test suite does
(``AcceleratorState._reset_state`` is a test-only tool there too; the package never calls it).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _fresh_accelerate_state() -> Iterator[None]:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
