"""Rank-aware logging: library code logs through :func:`get_logger`, never reads RANK itself.

Only the main process prints INFO; other ranks print warnings and errors, prefixed with their
rank, so a multi-process run stays readable. On a terminal, records go through rich; when stderr
is a file or a pipe (``nohup``, slurm, CI), one plain line per record with a timestamp, so the
log reads and greps well. The first call also silences known third-party noise
(:mod:`llm2clip_vlm.noise`).
"""

from __future__ import annotations

import logging
import os
import sys

from rich.console import Console
from rich.logging import RichHandler

from llm2clip_vlm.noise import quiet_third_party

_CONFIGURED = False


def _rank() -> int:
    # accelerate / torchrun set these before the process group exists.
    for var in ("RANK", "LOCAL_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def get_logger(name: str) -> logging.Logger:
    """A logger under the ``llm2clip_vlm`` namespace, configured once per process."""
    global _CONFIGURED
    if not _CONFIGURED:
        root = logging.getLogger("llm2clip_vlm")
        rank = _rank()
        # stderr: stdout carries command results (``bench --json`` must parse).
        console = Console(stderr=True)
        prefix = "" if rank == 0 else f"[rank {rank}] "
        handler: logging.Handler
        if console.is_terminal:
            handler = RichHandler(console=console, show_path=False, rich_tracebacks=False, markup=False)
            handler.setFormatter(logging.Formatter(f"{prefix}%(message)s"))
        else:
            handler = _StderrHandler()
            handler.setFormatter(
                logging.Formatter(f"%(asctime)s %(levelname)s {prefix}%(message)s", "%Y-%m-%d %H:%M:%S")
            )
        root.addHandler(handler)
        root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
        root.propagate = False
        quiet_third_party()
        _CONFIGURED = True
    return logging.getLogger(name if name.startswith("llm2clip_vlm") else f"llm2clip_vlm.{name}")


class _StderrHandler(logging.StreamHandler):
    """A StreamHandler on whatever ``sys.stderr`` is at emit time (tests and tools swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)
