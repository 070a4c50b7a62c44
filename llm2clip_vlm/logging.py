"""Rank-aware logging: library code logs through :func:`get_logger`, never reads RANK itself.

Only the main process prints INFO; other ranks print warnings and errors, prefixed with their
rank, so a multi-process run stays readable.
"""

from __future__ import annotations

import logging
import os

from rich.console import Console
from rich.logging import RichHandler

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
        handler = RichHandler(
            console=Console(stderr=True), show_path=False, rich_tracebacks=False, markup=False
        )
        fmt = "%(message)s" if rank == 0 else f"[rank {rank}] %(message)s"
        handler.setFormatter(logging.Formatter(fmt))
        root.addHandler(handler)
        root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
        root.propagate = False
        _CONFIGURED = True
    return logging.getLogger(name if name.startswith("llm2clip_vlm") else f"llm2clip_vlm.{name}")
