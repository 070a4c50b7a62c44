"""SIGTERM / SIGINT while work is under way: finish the current unit, save, then stop with one line.

:class:`GracefulExit` turns the signals into a flag that a loop polls (a training step, an image
check); :class:`TrainingInterrupted` is what the loop raises once its work is safe, carrying the
shell status 128 + signal. A leaf (the standard library and our logging only), so the data layer
and the training loop share it without importing torch or each other.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from types import FrameType
from typing import Any

from llm2clip_vlm.logging import get_logger

log = get_logger(__name__)


class TrainingInterrupted(Exception):
    """SIGTERM/SIGINT arrived; the run stopped after a checkpoint was saved (rerun to resume).

    Attributes:
        signum: the signal received.
        checkpoint: the checkpoint the run can resume from (None if none could be written).
        exit_code: the conventional shell status, 128 + signum.
    """

    def __init__(self, signum: int, checkpoint: Path | None) -> None:
        self.signum, self.checkpoint = signum, checkpoint
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint"
        super().__init__(f"stopped by {name} after saving {where}; run the same command again to resume")


class GracefulExit:
    """Context manager: SIGTERM/SIGINT set a flag instead of killing the process.

    The loop finishes its current step, saves a checkpoint, and calls :meth:`raise_if_requested`.
    A second SIGINT (Ctrl-C twice) interrupts at once. Outside the main thread it does nothing
    (signal handlers can only be installed there).

    Args:
        signals: the signals to catch.
        agree: turns this process's flag into the decision of all processes (the training loop
            passes ``training.dist.any_rank``), so every rank stops at the same step; by default
            the flag itself (one process).
    """

    def __init__(
        self,
        signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT),
        agree: Callable[[bool], bool] | None = None,
    ) -> None:
        self.signals = tuple(signals)
        self.agree = agree
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signum
        log.warning(
            "received %s: finishing the current step, saving a checkpoint, then exiting",
            signal.Signals(signum).name,
        )

    def __enter__(self) -> GracefulExit:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def should_stop(self) -> bool:
        """Whether a signal arrived (in any process, with ``agree``: all of them stop together)."""
        flag = self.requested is not None
        return self.agree(flag) if self.agree is not None else flag

    def raise_if_requested(self, checkpoint: Path | None = None) -> None:
        """Raise :class:`TrainingInterrupted` if a signal arrived (call after saving)."""
        if self.should_stop():
            raise TrainingInterrupted(self.requested or signal.SIGTERM, checkpoint)
