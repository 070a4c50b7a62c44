"""The NaN guard: a non-finite loss, gradient norm or weight stops a run (or skips the step).

:class:`NonFiniteGuard` decides per step (stop with a message naming the step, or skip the
optimizer update and count it, under ``reliability.skip_nonfinite_steps``);
:func:`check_finite_weights` keeps NaN/inf weights out of a checkpoint, so the last good one is
never overwritten by a diverged run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from llm2clip_vlm.logging import get_logger

log = get_logger(__name__)


class NonFiniteError(FloatingPointError):
    """A NaN/inf loss, gradient or weight (the message names the step or the tensor)."""


def check_finite_weights(weights: Mapping[str, torch.Tensor], where: str = "") -> None:
    """Raise :class:`NonFiniteError` naming the first tensor holding NaN/inf."""
    for name, t in weights.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(
                f"{where + ': ' if where else ''}weight {name!r} holds NaN/inf; not saving it over the "
                "last good checkpoint (lower the learning rate, or resume from that checkpoint)"
            )


@dataclass
class NonFiniteGuard:
    """Decides what to do with a non-finite loss or gradient norm.

    Args:
        stage: named in messages.
        skip: skip such steps (no optimizer update) instead of stopping.
        max_skipped: even when skipping, stop after this many skipped steps in a run.
    """

    stage: str
    skip: bool = False
    max_skipped: int = 100
    skipped: list[int] = field(default_factory=list)

    def check(self, loss: float, step: int, grad_norm: float | torch.Tensor | None = None) -> bool:
        """True: take the optimizer step. False: skip it (counted). Raises when not skipping.

        Args:
            loss: the step's loss (the same value on every rank, e.g. after ``accelerator.reduce``).
            step: the 1-based number of the step, for the message.
            grad_norm: the total gradient norm if known (``clip_grad_norm_``'s return value).
        """
        norm = float(grad_norm) if grad_norm is not None else 0.0
        if np.isfinite(loss) and np.isfinite(norm):
            return True
        what = f"loss is {loss}" if not np.isfinite(loss) else f"gradient norm is {norm} (loss {loss:.4g})"
        if not self.skip:
            raise NonFiniteError(
                f"{self.stage}: {what} at step {step}; stopping without an update (the last "
                f"checkpoint is intact). Set reliability.skip_nonfinite_steps=true to skip such steps."
            )
        self.skipped.append(step)
        log.warning("%s: %s at step %d; step skipped (%d so far)", self.stage, what, step, len(self.skipped))
        if len(self.skipped) > self.max_skipped:
            raise NonFiniteError(
                f"{self.stage}: {len(self.skipped)} steps had a non-finite loss (last: step {step}); stopping"
            )
        return False
