"""One progress style for every long loop, silent on non-main ranks, readable from a file.

On a terminal: a rich bar (count, elapsed, remaining, a free-text status such as the loss).
When stderr is not a terminal (``nohup``, slurm, CI, ``2> run.log``) rich bars do not render
until the end, so the same Progress instead logs one plain line per task every
``runtime.progress_seconds`` seconds and/or every ``runtime.progress_steps`` steps, and when the
task finishes::

    stage 1 SimCSE: step 40/160 (25%)  loss 2.7712  9.50 s/step  lr 2.00e-04  |  7.81 s/step, elapsed 5:12, ETA 15:37

The rate is measured over the steps done in this process (a resumed run does not count the steps
it restored), and the ETA is the remaining steps at that rate.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from llm2clip_vlm.logging import get_logger

log = get_logger(__name__)


@dataclass
class LineSchedule:
    """When a task writes a progress line to a non-terminal stderr (0 = not by that criterion)."""

    seconds: float = 30.0
    steps: int = 0


# Set once per process from the resolved config (``apply_runtime``), like the log level.
SCHEDULE = LineSchedule()


def configure_lines(seconds: float, steps: int) -> None:
    """Set how often long loops log a line when stderr is not a terminal (``runtime.progress_*``)."""
    if seconds < 0 or steps < 0:
        raise ValueError(f"progress intervals must be >= 0, got seconds={seconds}, steps={steps}")
    SCHEDULE.seconds, SCHEDULE.steps = float(seconds), int(steps)


def format_duration(seconds: float) -> str:
    """``h:mm:ss`` (or ``m:ss`` under an hour)."""
    s = max(0, int(round(seconds)))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@dataclass
class _LineState:
    started: float
    start_completed: float
    last_time: float
    last_completed: float
    done: bool = False


class LineProgress(Progress):
    """A rich Progress that, when ``lines`` is on, logs plain progress lines instead of drawing bars.

    Tasks may carry a ``unit`` field (``add_task(..., unit="caption")``; default ``step``).
    """

    def __init__(self, *columns: Any, lines: bool = False, schedule: LineSchedule | None = None, **kw: Any):
        super().__init__(*columns, **kw)
        self.lines = lines
        self.schedule = schedule or SCHEDULE
        self._line_states: dict[TaskID, _LineState] = {}

    def add_task(self, description: str, *args: Any, **kwargs: Any) -> TaskID:
        kwargs.setdefault("status", "")
        task_id = super().add_task(description, *args, **kwargs)
        if self.lines:
            now = time.monotonic()
            done = float(self._task(task_id).completed)
            self._line_states[task_id] = _LineState(now, done, now, done)
        return task_id

    def _task(self, task_id: TaskID) -> Any:
        return next(t for t in self.tasks if t.id == task_id)

    def update(self, task_id: TaskID, **kwargs: Any) -> None:  # type: ignore[override]
        super().update(task_id, **kwargs)
        self._maybe_line(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._maybe_line(task_id)

    def skip(self, task_id: TaskID, done: float) -> None:
        """Advance by work found already done (a cache hit, a complete shard): it moves the count
        but not the rate, which measures the work done here (the rate of 1500 cached images would
        read millions per second, and the ETA of the rest would be zero)."""
        state = self._line_states.get(task_id)
        if state is not None:
            state.start_completed += done
            state.last_completed += done
        super().advance(task_id, done)
        self._maybe_line(task_id)

    def _maybe_line(self, task_id: TaskID) -> None:
        state = self._line_states.get(task_id)
        if state is None or state.done:
            return
        task = self._task(task_id)
        now = time.monotonic()
        finished = task.total is not None and task.completed >= task.total
        due_time = self.schedule.seconds > 0 and now - state.last_time >= self.schedule.seconds
        due_steps = self.schedule.steps > 0 and task.completed - state.last_completed >= self.schedule.steps
        if not (finished or due_time or due_steps):
            return
        state.last_time, state.last_completed, state.done = now, float(task.completed), finished
        log.info(progress_line(task.description, task.completed, task.total, task.fields, now - state.started,
                               task.completed - state.start_completed))  # fmt: skip


def progress_line(
    description: str,
    completed: float,
    total: float | None,
    fields: dict[str, Any],
    elapsed: float,
    done_here: float,
) -> str:
    """One progress line: ``desc: step N/T (p%)  status  |  s/step, elapsed, ETA``."""
    unit = fields.get("unit", "step")
    count = f"{unit} {int(completed)}/{int(total)}" if total else f"{unit} {int(completed)}"
    if total:
        count += f" ({100 * completed / total:.0f}%)"
    status = str(fields.get("status", "")).strip()
    parts = [f"{description}: {count}"] + ([status] if status else [])
    timing = f"elapsed {format_duration(elapsed)}"
    if done_here > 0:
        per = elapsed / done_here
        rate = f"{per:.2f} s/{unit}" if per >= 0.1 else f"{1 / per:.1f} {unit}s/s"
        timing = f"{rate}, {timing}"
        if total and completed < total:
            timing += f", ETA {format_duration(per * (total - completed))}"
        elif total:
            timing += ", done"
    return "  ".join(parts) + "  |  " + timing


def make_progress(disable: bool | None = None, console: Console | None = None) -> LineProgress:
    """A Progress with count, elapsed/remaining time and a free-text status field.

    Use ``progress.add_task(description, total=N, status="")`` and update ``status`` with
    throughput or loss. Bars go to stderr unless ``console`` says otherwise: stdout carries
    command results (e.g. ``bench --json``). When that stream is not a terminal, no bar is drawn
    and the task logs progress lines instead (see the module docstring).
    """
    if disable is None:
        disable = int(os.environ.get("RANK", "0")) != 0
    console = console if console is not None else Console(stderr=True)
    lines = not disable and not console.is_terminal
    return LineProgress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        disable=disable or lines,
        transient=False,
        console=console,
        lines=lines,
    )
