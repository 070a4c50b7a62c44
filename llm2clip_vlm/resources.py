"""A full disk or an unwritable folder, as typed errors that name the path and the space needed.

Writers wrap what they write in :func:`writing` (or call :func:`classify` on a failure): an
``OSError`` with ``ENOSPC``/``EDQUOT`` becomes :class:`DiskFullError`, one with ``EROFS``/
``EACCES``/``EPERM`` becomes :class:`NotWritableError`. Some writers hide the errno:
``torch.save`` reports a failed write as a ``RuntimeError`` ("PytorchStreamWriter failed writing
file ...") and safetensors as a ``SafetensorError``; such an error is a full disk when the disk
holding the path has less free space than the write needed (the check is on the disk's state, not
on the library's wording). The CLI prints either error as one line (:mod:`llm2clip_vlm.errors`);
writers write through temporary names, so the files finished before stay as they were.

A leaf module (imports nothing of the package): any layer can use it.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


def human_bytes(n: float | None) -> str:
    """``1536 -> '1.5 KiB'``; None -> 'unknown'."""
    if n is None:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the disk holding ``path`` (its nearest existing parent); None if unknown."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


class ResourceError(OSError):
    """The machine, not the input, stopped a write (full disk, read-only folder).

    Attributes:
        path: what was being written.
        exit_code: the CLI's status (1: the run's state; rerun once there is room).
    """

    exit_code = 1

    def __init__(self, message: str, path: str | Path, err: int) -> None:
        super().__init__(err, message, str(path))
        self.path = Path(path)
        self.message = message

    def __str__(self) -> str:
        return self.message


class DiskFullError(ResourceError):
    """No space left for a write; names the path, the space the write needed and what was free."""

    def __init__(self, path: str | Path, needed: int | None, free: int | None) -> None:
        self.needed, self.free = needed, free
        need = f"needs about {human_bytes(needed)}" if needed else "needs more space"
        super().__init__(
            f"{path}: no space left on its disk ({need}, {human_bytes(free)} free): free some space "
            "or write to another disk, then run the same command again (finished files are kept)",
            path,
            errno.ENOSPC,
        )


class NotWritableError(ResourceError):
    """The folder (or file) cannot be written: a read-only file system or no permission."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(
            f"{path}: cannot write here ({reason}): choose a writable output folder", path, errno.EROFS
        )


def classify(
    e: BaseException, path: str | Path, needed: int | Callable[[], int | None] | None = None
) -> ResourceError | None:
    """The :class:`ResourceError` ``e`` stands for while writing ``path`` (None: not a resource error).

    Args:
        e: what the write raised.
        path: what was being written (named in the message).
        needed: bytes the write needed (or a function computing them, called only on failure).
    """
    if isinstance(e, ResourceError):
        return e
    size = needed() if callable(needed) else needed
    where = getattr(e, "filename", None) or path
    if isinstance(e, OSError) and e.errno in FULL_ERRNOS:
        return DiskFullError(where, size, free_bytes(where))
    if isinstance(e, OSError) and e.errno in READ_ONLY_ERRNOS:
        return NotWritableError(where, e.strerror or os.strerror(e.errno or errno.EROFS))
    if not isinstance(e, OSError) and isinstance(e, (RuntimeError, _safetensor_error())):
        # torch.save / safetensors hide the errno: judge by the disk's free space.
        free = free_bytes(path)
        if free is not None and free < max(size or 0, 1 << 20):
            return DiskFullError(path, size, free)
    return None


@contextmanager
def writing(path: str | Path, needed: int | Callable[[], int | None] | None = None) -> Iterator[None]:
    """Context: a full disk or unwritable folder while writing ``path`` raises a ResourceError."""
    try:
        yield
    except (OSError, RuntimeError, _safetensor_error()) as e:
        typed = classify(e, path, needed)
        if typed is None or typed is e:
            raise
        raise typed from e


def _safetensor_error() -> type[BaseException]:
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - safetensors is a dependency
        return RuntimeError
    return SafetensorError
