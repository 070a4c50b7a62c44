"""One progress-bar style for every long loop (rich), silent on non-main ranks."""

from __future__ import annotations

import os

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def make_progress(disable: bool | None = None, console: Console | None = None) -> Progress:
    """A rich Progress with count, elapsed/remaining time and a free-text status field.

    Use ``progress.add_task(description, total=N, status="")`` and update ``status`` with
    throughput or loss. Bars go to stderr unless ``console`` says otherwise: stdout carries
    command results (e.g. ``bench --json``).
    """
    if disable is None:
        disable = int(os.environ.get("RANK", "0")) != 0
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        disable=disable,
        transient=False,
        console=console if console is not None else Console(stderr=True),
    )
