"""Errors a user can fix, and how the CLI turns any exception into one line (or a bug report).

Every error a user can act on (a wrong path, a refused input, a run directory that belongs to
another command) becomes ONE line naming the file/record, what is wrong and, where there is one,
what to do (:func:`describe`). Anything else is a bug of ours: the CLI prints the traceback and
says so (:func:`bug_report`), so the two are never confused.

Library code raises :class:`UserError` (or a subclass) for a new kind of user-fixable problem;
the older error types of each layer (``DataError``, ``StoreMismatchError``, ``CheckpointError``...)
are mapped here by type, so nothing below the CLI has to know how messages are printed.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
from dataclasses import dataclass


class UserError(Exception):
    """A problem with the user's input or command line; the message says what to change.

    Attributes:
        exit_code: the process status the CLI exits with (2: usage/input, 1: data/run state).
    """

    exit_code = 2


class PickleRefusedError(UserError, OSError):
    """Weights that exist only as pickles, refused without ``reliability.allow_pickle_weights``.

    Also an ``OSError``: what transformers raises for a folder without usable weights.
    """


class MissingDependencyError(UserError, ImportError):
    """An optional dependency the input needs is not installed (e.g. timm for an EVA02 tower); the
    message says what to ``pip install``. Also an ``ImportError``, for callers that catch that."""


class RunDirError(UserError):
    """The output directory cannot be used for this run (a file, another command's, changed config)."""


class BadInputFileError(UserError, ValueError):
    """A file a command reads is damaged or is not what the option expects (the message names it).

    E.g. a safetensors file with a broken header, a ``config.json`` that is not JSON, a tower
    folder given where an LLM is expected, a weight of the wrong shape.
    """

    exit_code = 1


class Terminated(BaseException):
    """SIGTERM arrived outside a training loop (which checkpoints first and stops on its own).

    A BaseException, like KeyboardInterrupt: ``except Exception`` blocks do not swallow it.
    """

    exit_code = 128 + signal.SIGTERM

    def __str__(self) -> str:
        return (
            "stopped by SIGTERM (files finished before it are kept; partial ones are left as "
            "temporary files and ignored); run the same command again to continue"
        )


def exit_on_sigterm(at_start: bool = False) -> None:
    """Make SIGTERM raise :class:`Terminated` in this process (the CLI calls it at start-up).

    A training loop replaces the handler while it runs (it saves a checkpoint first, see
    ``signals.GracefulExit``) and puts this one back after. A forked child (a
    DataLoader worker) that receives SIGTERM dies of it as before: only the main process prints.

    Args:
        at_start: while the CLI's modules load (nothing written yet, and an exception there would
            end in a traceback): print the line and exit at once.
    """
    owner = os.getpid()

    def handle(signum: int, frame: object) -> None:
        if os.getpid() != owner:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if at_start:
            sys.stderr.write(f"{Terminated()}\n")
            os._exit(Terminated.exit_code)
        raise Terminated

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handle)


HINT_PICKLE = (
    "convert the weights to safetensors, or allow pickles with --set reliability.allow_pickle_weights=true"
)


@dataclass
class Described:
    """What the CLI prints for a known error: a label, the message and the exit status."""

    label: str
    message: str
    exit_code: int
    style: str = "red"


def describe(e: BaseException) -> Described | None:
    """One line for an error the user can fix; None for anything else (a bug).

    Imports lazily: the types live in modules that pull in torch, and ``--help`` must stay fast.
    """
    from llm2clip_vlm.config_io import ConfigError
    from llm2clip_vlm.data.errors import DataError
    from llm2clip_vlm.resources import FULL_ERRNOS, ResourceError, classify
    from llm2clip_vlm.signals import TrainingInterrupted
    from llm2clip_vlm.training.checkpoint import CheckpointError
    from llm2clip_vlm.training.dist import PrecisionConflictError
    from llm2clip_vlm.training.guards import NonFiniteError

    if isinstance(e, TrainingInterrupted):  # SIGTERM/SIGINT: a checkpoint was saved first
        return Described("", str(e), e.exit_code, style="yellow")
    if isinstance(e, UserError):
        return Described("error", str(e), e.exit_code)
    if isinstance(e, (ConfigError, PrecisionConflictError)):
        return Described("config error", str(e), 2)
    if isinstance(e, DataError):  # names the file/record and the problem
        return Described("data error", str(e), 1)
    if isinstance(e, (CheckpointError, NonFiniteError)):
        return Described("error", str(e), 1)
    if isinstance(e, ResourceError):  # a full disk, a read-only folder: names the path and space
        return Described("error", str(e), e.exit_code)
    # Any other full disk or read-only file system (EACCES stays "permission denied" below: it
    # is as likely a file the command could not read).
    if isinstance(e, OSError) and e.errno in (*FULL_ERRNOS, errno.EROFS):
        typed = classify(e, e.filename or "the output folder")
        if typed is not None:
            return Described("error", str(typed), typed.exit_code)
    store = _store_error(e)
    if store is not None:
        return store
    if isinstance(e, (FileExistsError, NotADirectoryError, IsADirectoryError)):
        where = e.filename or ""
        what = {
            FileExistsError: "exists and is not a directory",
            NotADirectoryError: "is not a directory",
            IsADirectoryError: "is a directory, a file was expected",
        }[type(e)]
        return Described(
            "error", f"{where} {what} (give a directory path that is free or a run of this command)", 2
        )
    if isinstance(e, FileNotFoundError):
        message = f"{e.filename}: no such file or directory" if e.filename else str(e)
        return Described("error", f"{message} (check the path)", 2)
    if isinstance(e, PermissionError):
        return Described("error", f"{e.filename or e}: permission denied", 2)
    return None


def _store_error(e: BaseException) -> Described | None:
    from llm2clip_vlm.store.format import StoreInputError
    from llm2clip_vlm.store.reader import StoreConflictError, StoreMismatchError

    if isinstance(e, StoreMismatchError):
        # A conflicting output folder already says what to do; any other mismatch gets the way out.
        hint = (
            ""
            if isinstance(e, StoreConflictError)
            else " (run `llm2clip-vlm embed` with this data and encoder, or pass the matching --store)"
        )
        return Described("store refused", f"{e}{hint}", 1)
    if isinstance(e, StoreInputError):
        return Described("store error", str(e), 1)
    return None


def bug_report(e: BaseException) -> str:
    """The line printed under the traceback of an unexpected error."""
    return (
        f"llm2clip-vlm: this is a bug (an unexpected {type(e).__name__}), not a problem with your "
        "input: please report it with the traceback above"
    )


# The status of a bug: EX_SOFTWARE from sysexits.h ("internal software error").
BUG_EXIT_CODE = 70
