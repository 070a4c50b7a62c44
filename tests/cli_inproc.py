"""Run the real CLI entry point (``llm2clip_vlm.cli.main``) in this process, for fault tests.

In-process so a test can monkeypatch a writer (a full disk, a read-only folder) and stay fast:
no interpreter and torch start-up per case. What it returns is what a user sees: the exit status
and stderr (rich prints there, at a width that keeps each message on one line).
"""

from __future__ import annotations

import io
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass


@dataclass
class Result:
    code: int
    out: str
    err: str

    def lines(self) -> list[str]:
        """The non-empty stderr lines, without log lines (timestamped INFO/WARNING)."""
        return [ln for ln in self.err.splitlines() if ln.strip() and " INFO " not in ln]


def run_main(*args: str) -> Result:
    """``llm2clip-vlm ARGS`` through :func:`llm2clip_vlm.cli.main`; never raises SystemExit."""
    import os
    import signal

    from accelerate.state import AcceleratorState, GradientState

    from llm2clip_vlm import cli

    AcceleratorState._reset_state(reset_partial_state=True)  # each call stands for a new process
    GradientState._reset_state()
    out, err = io.StringIO(), io.StringIO()
    argv, columns = sys.argv, os.environ.get("COLUMNS")
    sys.argv = ["llm2clip-vlm", *args]
    os.environ["COLUMNS"] = "400"
    code = 0
    sigterm = signal.getsignal(signal.SIGTERM)  # main() installs its own: give pytest's back
    try:
        with redirect_stdout(out), redirect_stderr(err):
            cli.console.file = err  # the console was made at import, for the real stderr
            try:
                cli.main()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        signal.signal(signal.SIGTERM, sigterm)
        cli.console.file = None  # type: ignore[assignment]  # back to sys.stderr at each print
        sys.argv = argv
        if columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = columns
    return Result(code, out.getvalue(), err.getvalue())


def one_line(r: Result, code: int, *needles: str) -> str:
    """Assert: exit ``code``, no traceback, and one stderr line holding every needle; that line."""
    assert r.code == code, f"exit {r.code}, expected {code}:\n{r.err[-3000:]}"
    assert "Traceback" not in r.err, r.err[-3000:]
    hits = [ln for ln in r.lines() if all(n in ln for n in needles)]
    assert len(hits) == 1, f"expected one line with {needles}:\n{r.err[-3000:]}"
    return hits[0].strip()
